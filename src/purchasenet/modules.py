"""LightningModules for the binary (will this visitor buy?) and multiclass (segment) tasks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryCalibrationError,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
)

from purchasenet.calibration import ECE_BINS
from purchasenet.errors import ConfigError
from purchasenet.inference import BUNDLE_KEY
from purchasenet.nets import MAX_MEMBERS, build_net

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]

DEFAULT_ACTIVATION = {"_target_": "torch.nn.ReLU"}
Batch = tuple[torch.Tensor, torch.Tensor]


def _as_list(value: Any) -> list:
    try:
        return list(value)
    except TypeError:
        return [value, None]


class PurchaseClassifier(L.LightningModule):
    """An MLP, or an ensemble of ``members`` MLPs, trained on encoded rows.

    The subclasses define the task's loss and metrics. An ensemble scores with its members'
    mean logit, and every member learns from its own loss on the same mini-batches.

    ``bundle`` holds everything serving needs besides the weights (feature encoder, class
    names, configuration); it is written into every checkpoint as plain data.
    """

    task = ""

    def __init__(
        self,
        input_size: int,
        class_names: Sequence[str],
        hidden_sizes: Sequence[int] = (16, 16),
        activation: Mapping[str, Any] | None = None,
        dropout: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        class_weights: Sequence[float] | None = None,
        members: int = 1,
        gradient_clip_val: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_sizes, (str, bytes)) or not all(
            isinstance(size, int) and size > 0 for size in _as_list(hidden_sizes)
        ):
            raise ConfigError(
                f"model.hidden_sizes must be a list of positive layer widths, e.g. [16,16] or "
                f"[] for none; got {hidden_sizes!r}"
            )
        if isinstance(members, bool) or not isinstance(members, int) or not (
            1 <= members <= MAX_MEMBERS
        ):
            raise ConfigError(
                f"model.members must be a whole number of networks from 1 to {MAX_MEMBERS}; "
                f"got {members!r}"
            )
        if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, (int, float))
            or not gradient_clip_val > 0
        ):
            raise ConfigError(
                f"model.gradient_clip_val must be a positive number or null; "
                f"got {gradient_clip_val!r}"
            )
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        net_config = self.net_config()
        try:
            self.net = build_net(net_config)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=0.01)
        self.scheduler_factory = scheduler
        if class_weights is not None:
            self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
        else:
            self.class_weights = None
        # Calibration fitted after training (see purchasenet.calibration); neutral until then.
        self.temperature = 1.0
        self.threshold = 0.5
        metrics = self.build_metrics(len(class_names))
        self.train_metrics = metrics.clone(prefix="train/")
        self.train_loss = MeanMetric()
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        for evaluation in (self.val_metrics, self.test_metrics):
            evaluation.add_metrics(self.evaluation_metrics(len(class_names)))
        self.val_acc_best = MaxMetric()
        self.bundle: dict[str, Any] = {}

    @staticmethod
    def output_size(num_classes: int) -> int:
        raise NotImplementedError

    def build_metrics(self, num_classes: int) -> MetricCollection:
        raise NotImplementedError

    def evaluation_metrics(self, num_classes: int) -> dict[str, Any]:
        """Metrics computed on validation and test only (ranking and calibration quality)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics read: probabilities (binary) or class probabilities."""
        raise NotImplementedError

    def net_config(self) -> dict[str, Any]:
        config = {
            "input_size": self.hparams.input_size,
            "output_size": self.output_size(len(self.hparams.class_names)),
            "hidden_sizes": list(self.hparams.hidden_sizes),
            "activation": dict(self.hparams.activation or DEFAULT_ACTIVATION),
            "dropout": self.hparams.dropout,
        }
        if self.hparams.members > 1:
            config["members"] = self.hparams.members
        return config

    def stage_metrics(self, stage: str) -> MetricCollection:
        return getattr(self, f"{stage}_metrics")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of each network: (members, rows, outputs); one member for a single MLP."""
        return self.net.member_logits(inputs)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        # The temperature is 1 while fitting; after calibration the loss is that of the
        # probabilities served.
        loss = self.loss(logits / self.temperature, targets)
        self.stage_metrics(stage).update(self.scores(logits.detach()), targets)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=len(targets),
            sync_dist=True,
        )
        return loss

    def training_step(self, chunk: list[Batch] | Batch, batch_idx: int) -> None:
        """One optimizer step per mini-batch of the chunk (see ``PurchaseDataModule``).

        Optimization is manual so that one Lightning step can hold many optimizer steps; the
        optimizer's hooks (gradient flow, for one) still run at every mini-batch.
        """
        batches = [chunk] if isinstance(chunk, tuple) else chunk
        optimizer = self.optimizers()
        loss_sum = torch.zeros(())
        rows = 0
        scores, seen = [], []
        members = self.hparams.members
        for inputs, targets in batches:
            member_logits = self.member_logits(inputs)
            # The mean over members of each member's mean loss; times the number of members,
            # its gradient for every member's weights is that of the member's own loss.
            loss = self.loss(member_logits.flatten(0, 1), targets.repeat(members))
            optimizer.zero_grad()
            self.manual_backward(loss * members)
            if self.hparams.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val)
            optimizer.step()
            logits = member_logits.mean(dim=0)
            loss_sum += loss.detach() * len(targets)
            rows += len(targets)
            scores.append(self.scores(logits.detach()))
            seen.append(targets)
        self.train_metrics.update(torch.cat(scores), torch.cat(seen))
        self.train_loss.update(loss_sum / rows, weight=rows)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        # Computed here, where every process arrives in the same order, and not by a
        # synchronised self.log: the progress bar, on the first process only, would read such
        # a value first and wait on the others, which wait in these computations (deadlock).
        values = {**self.train_metrics.compute(), "train/loss": self.train_loss.compute()}
        self.log_dict(values)
        self.train_metrics.reset()
        self.train_loss.reset()
        # Manual optimization leaves the learning-rate schedule to the module; validation of
        # this epoch has already run, so a plateau schedule can read its loss.
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if "val/loss" in self.trainer.callback_metrics:
                scheduler.step(self.trainer.callback_metrics["val/loss"])
        elif scheduler is not None:
            scheduler.step()

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory(params=self.parameters())
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model.optimizer: {error}") from None
        if self.scheduler_factory is None:
            return optimizer
        # Stepped once per epoch by on_train_epoch_end (a plateau schedule on val/loss).
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[BUNDLE_KEY] = {**self.bundle, "task": self.task, "net": self.net_config()}

    def on_fit_start(self) -> None:
        # Calibration belongs to the weights it was fitted for; fitting changes them.
        self.use_calibration(1.0, 0.5)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bundle = dict(checkpoint.get(BUNDLE_KEY, {}))
        bundle = self.bundle
        self.use_calibration(bundle.get("temperature", 1.0), bundle.get("threshold", 0.5))

    def use_calibration(self, temperature: float, threshold: float) -> None:
        """Score with ``logits / temperature`` and decide at ``threshold`` from now on."""
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.bundle.update(temperature=self.temperature, threshold=self.threshold)
        for stage in ("train", "val", "test"):
            for metric in self.stage_metrics(stage).values():
                if hasattr(metric, "threshold"):
                    metric.threshold = self.threshold


class BinaryPurchaseClassifier(PurchaseClassifier):
    """Will this visitor buy? One logit, BCE-with-logits loss, sigmoid purchase probability."""

    task = "binary"

    @staticmethod
    def output_size(num_classes: int) -> int:
        if num_classes != 2:
            raise ConfigError(
                f"model=binary needs a data set with 2 classes, this one has {num_classes}; "
                "use model=multiclass"
            )
        return 1

    def build_metrics(self, num_classes: int) -> MetricCollection:
        return MetricCollection(
            {"acc": BinaryAccuracy(), "auroc": BinaryAUROC(), "f1": BinaryF1Score()}
        )

    def evaluation_metrics(self, num_classes: int) -> dict[str, Any]:
        # Targets are float 0/1 for the BCE loss; the argument check would insist on integers.
        return {
            "average_precision": BinaryAveragePrecision(validate_args=False),
            "ece": BinaryCalibrationError(ECE_BINS),
        }

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos_weight = None
        if self.class_weights is not None:
            pos_weight = self.class_weights[1] / self.class_weights[0]
        return F.binary_cross_entropy_with_logits(
            logits.squeeze(-1), targets, pos_weight=pos_weight
        )

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.squeeze(-1) / self.temperature)


class SegmentClassifier(PurchaseClassifier):
    """Which behaviour segment? One logit per class, cross-entropy loss, softmax probabilities."""

    task = "multiclass"

    @staticmethod
    def output_size(num_classes: int) -> int:
        if num_classes < 3:
            raise ConfigError(
                f"model=multiclass needs a data set with 3 or more classes, this one has "
                f"{num_classes}; use model=binary"
            )
        return num_classes

    def build_metrics(self, num_classes: int) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            }
        )

    def evaluation_metrics(self, num_classes: int) -> dict[str, Any]:
        return {"ece": MulticlassCalibrationError(num_classes, ECE_BINS)}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=self.class_weights)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=-1)
