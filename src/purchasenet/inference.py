"""Load a trained checkpoint with plain PyTorch and score raw feature columns.

This path never imports Lightning: the server, batch prediction and evaluation of a stored
model start quickly and read checkpoints with ``weights_only=True``, so a checkpoint that
carries pickled code is refused instead of run.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from purchasenet.errors import CheckpointError
from purchasenet.features import CATEGORICAL, FeatureEncoder
from purchasenet.nets import build_net

BUNDLE_KEY = "purchasenet"
BUNDLE_VERSION = 1
# Inputs are clamped this many training standard deviations from the training mean, so no
# input, however large, overflows float32 on its way into the network.
MAX_STANDARD_DEVIATIONS = 1e6


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely; raise :class:`CheckpointError` with a readable reason."""
    path = Path(path)
    if path.is_dir() and (path / "best.ckpt").is_file():
        path = path / "best.ckpt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size > 0:
        with path.open("rb") as handle:
            # torch.save writes a zip archive; older files are a bare pickle.
            head = handle.read(2)
        checkpoint_like = head == b"PK" or head[:1] == b"\x80"
        if not checkpoint_like:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint file; use a best.ckpt or last.ckpt "
                "written by scripts/train.py"
            )
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of files it is about to refuse anyway.
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {path}: it holds {_refused_content(error)}, and unpickling it "
            "could run code; use only checkpoints written by scripts/train.py"
        ) from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        if path.stat().st_size == 0:
            reason = "the file is empty"
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(BUNDLE_KEY), dict):
        raise CheckpointError(
            f"{path} is not a purchasenet checkpoint (no {BUNDLE_KEY!r} section); "
            "train one with scripts/train.py"
        )
    return checkpoint


def _refused_content(error: pickle.UnpicklingError) -> str:
    """What the safe unpickler refused, e.g. ``GLOBAL posix.system``, in a few words."""
    content = "objects other than tensors and plain data"
    found = re.search(r"GLOBAL [\w.]+", str(error)) or re.search(r"operand \d+", str(error))
    if found is None:
        return content
    what = found.group(0).replace("operand", "pickle opcode")
    return f"{content} ({what})"


@dataclass
class PurchaseModel:
    """A trained classifier ready to score raw columns: encoder, network and decision rule."""

    encoder: FeatureEncoder
    net: torch.nn.Module
    task: str
    class_names: list[str]
    threshold: float = 0.5
    temperature: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> PurchaseModel:
        checkpoint = read_checkpoint(path)
        try:
            return cls._from_bundle(checkpoint[BUNDLE_KEY], checkpoint.get("state_dict"), path)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            # A dict that merely carries our section name, or one from an incompatible version.
            reason = f"missing entry {error}" if isinstance(error, KeyError) else str(error)
            raise CheckpointError(
                f"{path} is not a usable purchasenet checkpoint ({reason}); "
                "train one with scripts/train.py"
            ) from None

    @classmethod
    def _from_bundle(
        cls, bundle: Mapping[str, Any], state_dict: Mapping[str, Any] | None, path: str | Path
    ) -> PurchaseModel:
        net = build_net(bundle["net"])
        weights = {
            key.removeprefix("net."): value
            for key, value in dict(state_dict or {}).items()
            if key.startswith("net.")
        }
        try:
            net.load_state_dict(weights)
        except RuntimeError as error:
            raise CheckpointError(
                f"{path}: weights do not match the stored network: {error}"
            ) from None
        net.eval()
        task = bundle["task"]
        if task not in ("binary", "multiclass"):
            raise ValueError(f"unknown task {task!r}")
        return cls(
            encoder=FeatureEncoder.from_state_dict(bundle["encoder"]),
            net=net,
            task=task,
            class_names=list(bundle["class_names"]),
            threshold=float(bundle.get("threshold", 0.5)),
            temperature=float(bundle.get("temperature", 1.0)),
            metadata={
                "checkpoint": str(path),
                "run_name": bundle.get("run_name"),
                "dataset": bundle.get("dataset"),
                "data": dict(bundle.get("data") or {}),
                "target": bundle.get("target"),
                "test_metrics": dict(bundle.get("test_metrics", {})),
                "net": dict(bundle["net"]),
                "config": bundle.get("config", {}),
                # False only in a checkpoint whose run stopped before calibration and test.
                "finished": bool(bundle.get("finished", True)),
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

    @cached_property
    def input_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """Per network input, the lowest and highest value scored; see MAX_STANDARD_DEVIATIONS."""
        lows, highs = [], []
        for feature in self.encoder.features:
            if feature.spec.kind == CATEGORICAL:
                lows += [0.0] * feature.width
                highs += [1.0] * feature.width
                continue
            scale = self.encoder.scale
            centre, spread = (0.0, 1.0) if scale else (feature.mean, feature.std)
            lows.append(centre - MAX_STANDARD_DEVIATIONS * spread)
            highs.append(centre + MAX_STANDARD_DEVIATIONS * spread)
        return np.asarray(lows, dtype=np.float32), np.asarray(highs, dtype=np.float32)

    def encode(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        """The network inputs for raw columns, clamped as MAX_STANDARD_DEVIATIONS describes."""
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, then the limit
            inputs = self.encoder.transform(columns)
        low, high = self.input_limits
        return np.clip(inputs, low, high, out=inputs)

    def predict_proba(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        return self.probabilities_from_inputs(self.encode(columns))

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Binary: 1.0 where the purchase probability reaches the threshold; else class index."""
        if self.task == "binary":
            return (probabilities >= self.threshold).astype(np.float64)
        return probabilities.argmax(axis=-1)

    def labels(self, decisions: np.ndarray) -> list[str]:
        return [self.class_names[int(d)] for d in decisions]
