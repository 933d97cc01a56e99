"""Evaluate a checkpoint on the data it was trained with, from the checkpoint alone.

The checkpoint's bundle holds the resolved training config: the data set is rebuilt from it
(synthetic data from their seed, CSV files from their path and split seeds) and scored with the
checkpoint's own encoder and network, as serving would. Lightning is not needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
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
from purchasenet.datasets import TARGET, PurchaseDataset
from purchasenet.errors import CheckpointError, ConfigError, DataError
from purchasenet.inference import PurchaseModel

SPLITS = ("train", "val", "test")
DATASETS_MODULE = "purchasenet.datasets."


def rebuild_dataset(config: Mapping[str, Any], checkpoint: str | Path) -> PurchaseDataset:
    """The data set described by a checkpoint's training config."""
    spec = dict(config.get("data", {}).get("dataset") or {})
    target = str(spec.get("_target_", ""))
    if not target:
        raise CheckpointError(f"{checkpoint} holds no data configuration to evaluate on")
    # Only our own data set classes: a checkpoint must not be able to name code to run.
    if not target.startswith(DATASETS_MODULE):
        raise CheckpointError(
            f"{checkpoint}: data set {target!r} is not one of {DATASETS_MODULE}*; refusing it"
        )
    return instantiate(spec, _convert_="all")


def score(model: PurchaseModel, frame: pd.DataFrame, class_weights=None) -> dict[str, float]:
    """Loss and metrics of ``model`` on ``frame``, under the names training logs them with."""
    inputs = torch.from_numpy(model.encoder.transform(frame))
    targets = torch.tensor(frame[TARGET].to_numpy(), dtype=torch.long)
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    with torch.inference_mode():
        logits = model.net(inputs) / model.temperature

    if model.task == "binary":
        logits = logits.squeeze(-1)
        pos_weight = None if weights is None else weights[1] / weights[0]
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=pos_weight)
        scores = torch.sigmoid(logits)
        metrics = {
            "acc": BinaryAccuracy(threshold=model.threshold),
            "auroc": BinaryAUROC(),
            "f1": BinaryF1Score(threshold=model.threshold),
            "average_precision": BinaryAveragePrecision(),
            "ece": BinaryCalibrationError(ECE_BINS),
        }
    else:
        loss = F.cross_entropy(logits, targets, weight=weights)
        scores = torch.softmax(logits, dim=-1)
        classes = len(model.class_names)
        metrics = {
            "acc": MulticlassAccuracy(classes, average="micro"),
            "f1_macro": MulticlassF1Score(classes, average="macro"),
            "ece": MulticlassCalibrationError(classes, ECE_BINS),
        }
    values = {name: float(metric(scores, targets)) for name, metric in metrics.items()}
    return {"loss": float(loss), **values}


def evaluate_checkpoint(
    checkpoint: str | Path, split: str = "test"
) -> tuple[PurchaseModel, dict[str, float], int]:
    """The checkpoint's model, its metrics on ``split`` as ``<split>/<name>``, and the row count."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    model = PurchaseModel.from_checkpoint(checkpoint)
    config = model.metadata.get("config") or {}
    dataset = rebuild_dataset(config, checkpoint)
    trained_on = model.metadata["data"].get("fingerprint")
    if trained_on is not None and dataset.fingerprint() != trained_on:
        warnings.warn(
            f"{getattr(dataset, 'path', 'the data file')} has changed since training (its "
            "sha256 differs), so the split and these metrics may not match training's",
            stacklevel=2,
        )
    frame = getattr(dataset.load(), split)
    if list(dataset.class_names) != list(model.class_names):
        raise DataError(
            f"{getattr(dataset, 'path', 'the data set')}: the target now holds the classes "
            f"{list(dataset.class_names)}, the checkpoint was trained on "
            f"{list(model.class_names)}; evaluate on the data it was trained with"
        )
    class_weights = config.get("model", {}).get("class_weights")
    metrics = score(model, frame, class_weights)
    return model, {f"{split}/{name}": value for name, value in sorted(metrics.items())}, len(frame)
