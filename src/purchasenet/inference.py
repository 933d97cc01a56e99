"""Load a trained checkpoint with plain PyTorch and score raw feature columns.

This path never imports Lightning: the server, batch prediction and evaluation of a stored
model start quickly and read checkpoints with ``weights_only=True``, so a checkpoint that
carries pickled code is refused instead of run.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purchasenet.errors import CheckpointError
from purchasenet.features import FeatureEncoder
from purchasenet.nets import MLP

BUNDLE_KEY = "purchasenet"
BUNDLE_VERSION = 1


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely; raise :class:`CheckpointError` with a readable reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint ({reason})"
        ) from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or BUNDLE_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} is not a purchasenet checkpoint (no {BUNDLE_KEY!r} section); "
            "train one with scripts/train.py"
        )
    return checkpoint


@dataclass
class PurchaseModel:
    """A trained classifier ready to score raw columns: encoder, network and decision rule."""

    encoder: FeatureEncoder
    net: MLP
    task: str
    class_names: list[str]
    threshold: float = 0.5
    temperature: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PurchaseModel:
        checkpoint = read_checkpoint(path)
        bundle = checkpoint[BUNDLE_KEY]
        net = MLP(**bundle["net"])
        weights = {
            key.removeprefix("net."): value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith("net.")
        }
        try:
            net.load_state_dict(weights)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: weights do not match the stored network: {error}")
        net.eval()
        return cls(
            encoder=FeatureEncoder.from_state_dict(bundle["encoder"]),
            net=net,
            task=bundle["task"],
            class_names=list(bundle["class_names"]),
            threshold=float(bundle.get("threshold", 0.5)),
            temperature=float(bundle.get("temperature", 1.0)),
            metadata={
                "checkpoint": str(path),
                "run_name": bundle.get("run_name"),
                "dataset": bundle.get("dataset"),
                "target": bundle.get("target"),
                "test_metrics": dict(bundle.get("test_metrics", {})),
                "net": dict(bundle["net"]),
                "config": bundle.get("config", {}),
            },
        )

    @property
    def feature_names(self) -> list[str]:
        return self.encoder.names

    @torch.inference_mode()
    def probabilities_from_inputs(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Purchase probability per row (binary) or class probabilities per row (multiclass)."""
        logits = self.net(torch.as_tensor(inputs, dtype=torch.float32)) / self.temperature
        if self.task == "binary":
            return torch.sigmoid(logits.squeeze(-1)).numpy()
        return torch.softmax(logits, dim=-1).numpy()

    def predict_proba(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        return self.probabilities_from_inputs(self.encoder.transform(columns))

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Binary: 1.0 where the purchase probability reaches the threshold; else class index."""
        if self.task == "binary":
            return (probabilities >= self.threshold).astype(np.float64)
        return probabilities.argmax(axis=-1)

    def labels(self, decisions: np.ndarray) -> list[str]:
        return [self.class_names[int(d)] for d in decisions]
