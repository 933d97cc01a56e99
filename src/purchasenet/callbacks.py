"""Callbacks that show what a run learned: gradient flow, figures, HParams and a run summary.

All of them write on the main process only, so a run on several processes logs once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch import nn

from purchasenet import figures
from purchasenet.datasets import TARGET
from purchasenet.errors import ConfigError
from purchasenet.features import NUMERIC
from purchasenet.nets import ACTIVATIONS, BatchedLinear
from purchasenet.reports import write_summary

log = logging.getLogger(__name__)


def named_layers(net: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """The network's linear layers, named ``hidden_1`` … ``hidden_k`` and ``output``.

    In an ensemble each holds that layer of every member, and its norms and histograms
    cover them all.
    """
    linears = [module for module in net if isinstance(module, (nn.Linear, BatchedLinear))]
    names = [f"hidden_{number}" for number in range(1, len(linears))] + ["output"]
    return list(zip(names, linears))


def hidden_activations(net: nn.Sequential, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each hidden layer's output after its activation, for ``inputs``, in evaluation mode."""
    names = [name for name, _ in named_layers(net)][:-1]
    outputs: dict[str, torch.Tensor] = {}
    was_training = net.training
    net.eval()
    with torch.no_grad():
        values = inputs
        for module in net:
            values = module(values)
            if type(module).__name__ in ACTIVATIONS:
                outputs[names[len(outputs)]] = values.detach().cpu()
    net.train(was_training)
    return outputs


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also keeps its record when the run folder was copied.

    Resumed from ``checkpoints/<copy>/last.ckpt``, Lightning would forget the best score, as
    the stored folder is the original's, and the next epoch would replace the copy's
    ``best.ckpt`` even when worse. Here the record carries over whenever the copy holds the
    recorded file.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored_folder = state_dict.get("dirpath")
        recorded = Path(str(state_dict.get("best_model_path") or ""))
        here = Path(self.dirpath) / recorded.name if self.dirpath and recorded.name else None
        moved = stored_folder is not None and self.dirpath is not None and (
            Path(stored_folder).resolve() != Path(self.dirpath).resolve()
        )
        if not (moved and here is not None and here.is_file()):
            super().load_state_dict(state_dict)
            return
        state = dict(state_dict, dirpath=self.dirpath, best_model_path=str(here))
        state["kth_best_model_path"] = str(here)
        state["best_k_models"] = {str(here): state_dict.get("best_model_score")}
        state["last_model_path"] = ""
        super().load_state_dict(state)


def tensorboard_writer(trainer: L.Trainer):
    """The run's TensorBoard ``SummaryWriter`` on the main process; None elsewhere or unlogged."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def encoded_split(trainer: L.Trainer, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """A whole split of the data module (every row, whatever the number of processes)."""
    datamodule = trainer.datamodule
    frame = getattr(datamodule.splits, split)
    inputs = torch.from_numpy(datamodule.encoder.transform(frame))
    return inputs, frame[TARGET].to_numpy()


def _check_interval(key: str, value: int) -> int:
    if int(value) < 0:
        raise ConfigError(f"callbacks.{key} must be 0 (off) or a number of epochs, got {value}")
    return int(value)


class GradientFlow(Callback):
    """Logs how strongly each layer learns, so that a vanishing gradient shows in TensorBoard.

    Every optimiser step adds each linear layer's weight-gradient norm to ``grad_norm/<layer>``
    (averaged over the epoch). Every ``histogram_every_n_epochs`` epochs and after fitting, the
    weights (``weights/<layer>``) and the hidden layers' outputs on validation rows
    (``activations/<layer>``) go in as histograms.
    """

    def __init__(self, histogram_every_n_epochs: int = 5, activation_rows: int = 2000) -> None:
        self.histogram_every_n_epochs = _check_interval(
            "gradient_flow.histogram_every_n_epochs", histogram_every_n_epochs
        )
        self.activation_rows = int(activation_rows)
        self._histograms_at: int | None = None
        self._layers: list = []
        self._norm_sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._layers = list(named_layers(pl_module.net))
        self._norm_sums = {}
        self._steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Summed here and logged once per epoch: a log call per step would cost more than
        # the step itself for these networks.
        with torch.no_grad():
            for name, layer in self._layers:
                if layer.weight.grad is not None:
                    norm = layer.weight.grad.norm()
                    total = self._norm_sums.get(name)
                    self._norm_sums[name] = norm if total is None else total + norm
        self._steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._steps:
            means = {f"grad_norm/{name}": total / self._steps
                     for name, total in self._norm_sums.items()}
            pl_module.log_dict(means, on_step=False, on_epoch=True, batch_size=1)
        every = self.histogram_every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0:
            self.log_histograms(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._histograms_at != trainer.global_step:
            self.log_histograms(trainer, pl_module)

    def log_histograms(self, trainer, pl_module) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        step = trainer.global_step
        for name, layer in named_layers(pl_module.net):
            writer.add_histogram(f"weights/{name}", layer.weight.detach().cpu(), step)
        inputs, _ = encoded_split(trainer, "val")
        inputs = inputs[: self.activation_rows].to(pl_module.device)
        for name, values in hidden_activations(pl_module.net, inputs).items():
            writer.add_histogram(f"activations/{name}", values, step)
        self._histograms_at = step


class TrainingFigures(Callback):
    """Draws what the model learned into TensorBoard's Images and PR Curves dashboards.

    After fitting, and every ``every_n_epochs`` epochs when set, on validation rows: the
    decision boundary (data of two numeric features), the predicted probability over the
    feature (one numeric feature), the confusion matrix (multiclass) or the precision-recall
    curve (binary). After the test of the best checkpoint, the last two on test rows.
    """

    def __init__(self, every_n_epochs: int = 0, max_points: int = 400) -> None:
        self.every_n_epochs = _check_interval("figures.every_n_epochs", every_n_epochs)
        self.max_points = int(max_points)
        self._drawn: set[tuple[str, int]] = set()

    def on_validation_end(self, trainer, pl_module) -> None:
        every = self.every_n_epochs
        if not trainer.sanity_checking and every and (trainer.current_epoch + 1) % every == 0:
            self.draw(trainer, pl_module, "val")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self.draw(trainer, pl_module, "test")

    def draw(self, trainer, pl_module, split: str) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or (split, step) in self._drawn:
            return
        self._drawn.add((split, step))
        datamodule = trainer.datamodule
        class_names = datamodule.class_names

        def predict_proba(columns: Mapping[str, np.ndarray]) -> np.ndarray:
            inputs = torch.from_numpy(datamodule.encoder.transform(columns))
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                scores = pl_module.scores(pl_module(inputs.to(pl_module.device)))
            pl_module.train(was_training)
            return scores.cpu().numpy()

        frame = getattr(datamodule.splits, split)
        if split == "val":
            self._draw_shape(writer, step, predict_proba, frame, datamodule, class_names)
        probabilities = predict_proba(frame)
        targets = frame[TARGET].to_numpy()
        if probabilities.ndim == 1:
            writer.add_pr_curve(f"pr_curve/{split}", targets, probabilities, step)
        else:
            figure = figures.confusion_matrix(targets, probabilities.argmax(axis=1), class_names)
            writer.add_image(f"figures/confusion_matrix/{split}", figures.to_image(figure), step,
                             dataformats="HWC")

    def _draw_shape(self, writer, step, predict_proba, frame, datamodule, class_names) -> None:
        features = datamodule.encoder.features
        if any(feature.spec.kind != NUMERIC for feature in features):
            return
        names = [feature.spec.name for feature in features]
        if len(names) == 2:
            figure = figures.decision_boundary(predict_proba, frame, names, class_names,
                                               max_points=self.max_points)
            tag = "figures/decision_boundary"
        elif len(names) == 1:
            # The observed shares come from the training rows: more of them, less noise.
            figure = figures.probability_curve(predict_proba, datamodule.splits.train, names[0],
                                               class_names)
            tag = "figures/probability_curve"
        else:
            return
        writer.add_image(tag, figures.to_image(figure), step, dataformats="HWC")


def _setting(config: Any, key: str, fallback: str = "null") -> bool | int | float | str:
    """The value at ``key`` as the HParams dashboard can show it: a number, a string or a bool.

    Config groups (``activation=relu``) and keys outside the config (``experiment=…``) show the
    ``fallback``, the text the command line gave.
    """
    value = OmegaConf.select(config, key, default=None)
    if OmegaConf.is_list(value):
        return str(OmegaConf.to_container(value))
    if value is None or OmegaConf.is_dict(value):
        return fallback
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def hydra_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job; empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def hydra_job_folder() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


class HyperparameterSummary(Callback):
    """Puts the run's settings and final metrics into TensorBoard's HParams dashboard.

    The settings are ``keys`` plus every key the command line set, so the runs of a sweep can
    be sorted and filtered by what was swept. The dashboard reads each metric's last value
    from the run's own scalars, so the test metrics written after fitting are included.
    """

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self.keys = list(keys)

    def settings(self, config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
        resolved = OmegaConf.create(dict(config))
        values = {key: _setting(resolved, key) for key in self.keys}
        for override in hydra_overrides():
            key, _, text = override.lstrip("+~").partition("=")
            if not key.startswith("hydra."):
                values[key] = _setting(resolved, key, fallback=text)
        return values

    def on_fit_end(self, trainer, pl_module) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        validation = sorted(key for key in trainer.callback_metrics if key.startswith("val/"))
        tests = [key.replace("val/", "test/") for key in validation if not key.endswith("_best")]
        metrics = {key: 0.0 for key in [*validation, *tests, "time/fit_seconds"]}
        experiment, start, end = hparams(self.settings(pl_module.bundle.get("config", {})),
                                         metrics)
        file_writer = writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        writer.flush()


class RunSummary(Callback):
    """Keeps every epoch's metrics and writes ``summary.json`` for comparison reports.

    The summary (command-line overrides, per-epoch history, test metrics of the best checkpoint,
    fit time) goes into ``dirpath`` and, inside a Hydra job, into the job's folder as well. A
    resumed run continues the history saved in its checkpoint; the training metrics of the
    epoch the checkpoint was written in are missing from it.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.history: list[dict[str, float]] = []
        self.earlier_fit_seconds = 0.0
        self._stage: str | None = None
        self._fit_started: float | None = None
        self._epoch_ended: int | None = None
        self._summary: dict[str, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(record) for record in self.history],
                "fit_seconds": self.fit_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Testing a stored checkpoint restores callbacks too; the history so far must stay.
        if self._stage == "fit":
            self.history = [dict(record) for record in state_dict.get("history", [])]
            self.earlier_fit_seconds = float(state_dict.get("fit_seconds", 0.0))

    def fit_seconds(self) -> float:
        running = time.perf_counter() - self._fit_started if self._fit_started else 0.0
        return self.earlier_fit_seconds + running

    def _record(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        record = next((r for r in self.history if r["epoch"] == epoch), None)
        if record is None:
            record = {"epoch": epoch}
            self.history.append(record)
        record.update({key: float(value) for key, value in metrics.items()})

    def _record_finished_epoch(self, trainer) -> None:
        if self._epoch_ended is None:
            return
        metrics = trainer.callback_metrics
        self._record(self._epoch_ended,
                     {key: value for key, value in metrics.items() if not key.startswith("test/")})
        self._epoch_ended = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._stage != "fit":
            return
        self._record(trainer.current_epoch, {key: value for key, value
                                             in trainer.callback_metrics.items()
                                             if key.startswith("val/")})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_ended = trainer.current_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record_finished_epoch(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record_finished_epoch(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.earlier_fit_seconds = self.fit_seconds()
        self._fit_started = None
        checkpoint = trainer.checkpoint_callback
        bundle = getattr(pl_module, "bundle", {})
        self._summary = {
            "run_name": bundle.get("run_name") or self.dirpath.name,
            "dataset": bundle.get("dataset"),
            "task": pl_module.task,
            "bayes_accuracy": bundle.get("data", {}).get("bayes_accuracy"),
            "overrides": hydra_overrides(),
            "epochs": trainer.current_epoch,
            "fit_seconds": self.earlier_fit_seconds,
            "log_dir": str(self.dirpath),
            "checkpoint": getattr(checkpoint, "best_model_path", "") or "",
            "history": self.history,
            "test": {},
        }
        self.write(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        if not self._summary:
            return
        self._summary["test"] = {key: float(value) for key, value
                                 in trainer.callback_metrics.items() if key.startswith("test/")}
        self.write(trainer)

    def write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        job_folder = hydra_job_folder()
        write_summary(self._summary, [self.dirpath, *([job_folder] if job_folder else [])])
