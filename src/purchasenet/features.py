"""Feature descriptions and the fitted encoding that turns raw columns into network inputs.

The encoder's state is made of plain Python values only (strings, numbers, lists and dicts),
so it travels inside a checkpoint that loads with ``torch.load(weights_only=True)`` and serves
without pandas or Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

NUMERIC = "numeric"
CATEGORICAL = "categorical"
TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class FeatureSpec:
    """One input column: its name, kind, physically possible range and numeric transform."""

    name: str
    kind: str = NUMERIC
    minimum: float | None = None
    maximum: float | None = None
    transform: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (NUMERIC, CATEGORICAL):
            raise ValueError(
                f"feature {self.name!r}: kind must be {NUMERIC!r} or {CATEGORICAL!r}, "
                f"not {self.kind!r}"
            )
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"feature {self.name!r}: transform must be one of {TRANSFORMS}, "
                f"not {self.transform!r}"
            )
        if self.transform == "log1p" and (self.minimum is None or self.minimum < 0):
            raise ValueError(f"feature {self.name!r}: log1p needs a minimum of at least 0")

    def bound_checks(self, values: np.ndarray) -> list[tuple[np.ndarray, str]]:
        """Per physical bound: which values break it, and the rule ("be at least 0")."""
        checks = []
        if self.minimum is not None:
            checks.append((values < self.minimum, f"be at least {self.minimum:g}"))
        if self.maximum is not None:
            checks.append((values > self.maximum, f"be at most {self.maximum:g}"))
        return checks


def first_failed_row(checks: Sequence[tuple[np.ndarray, str]]) -> tuple[int, str] | None:
    """The first check that some row fails: (row index, its rule); None when all pass."""
    for failed, rule in checks:
        if failed.any():
            return int(np.flatnonzero(failed)[0]), rule
    return None


@dataclass
class FittedFeature:
    """A feature with the statistics fitted on the training split."""

    spec: FeatureSpec
    mean: float = 0.0
    std: float = 1.0
    observed_min: float = 0.0
    observed_max: float = 0.0
    categories: list[Any] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 1 if self.spec.kind == NUMERIC else len(self.categories)


def _native(value: Any) -> Any:
    """Turn numpy scalars into the Python values JSON and ``weights_only`` loading accept."""
    return value.item() if isinstance(value, np.generic) else value


def _category_key(value: Any) -> Any:
    return (type(value).__name__ != "str", str(value))


class FeatureEncoder:
    """Scales numeric columns and one-hot encodes categorical ones, as fitted on training rows.

    A categorical value never seen in training encodes as all zeros, the same as no evidence
    for any known category.
    """

    def __init__(self, features: Sequence[FittedFeature], scale: bool = True) -> None:
        self.features = list(features)
        self.scale = scale
        self._lookups = [
            {value: index for index, value in enumerate(f.categories)}
            for f in self.features
        ]

    @classmethod
    def fit(
        cls, specs: Sequence[FeatureSpec], columns: Mapping[str, Sequence], scale: bool = True
    ) -> FeatureEncoder:
        fitted = []
        for spec in specs:
            values = columns[spec.name]
            if spec.kind == NUMERIC:
                raw = np.asarray(values, dtype=np.float64)
                transformed = _apply_transform(spec, raw)
                std = float(transformed.std())
                fitted.append(
                    FittedFeature(
                        spec,
                        mean=float(transformed.mean()),
                        std=std if std > 1e-12 else 1.0,
                        observed_min=float(raw.min()),
                        observed_max=float(raw.max()),
                    )
                )
            else:
                categories = sorted({_native(v) for v in values}, key=_category_key)
                fitted.append(FittedFeature(spec, categories=categories))
        return cls(fitted, scale=scale)

    @property
    def names(self) -> list[str]:
        return [f.spec.name for f in self.features]

    @property
    def input_size(self) -> int:
        return sum(f.width for f in self.features)

    def category_index(self, position: int, value: Any) -> int:
        """Index of ``value`` among the categories of the feature at ``position``; -1 if unseen."""
        return self._lookups[position].get(_native(value), -1)

    def transform(self, columns: Mapping[str, Sequence]) -> np.ndarray:
        """Encode equal-length columns into a float32 matrix with one row per sample."""
        n_rows = len(columns[self.features[0].spec.name])
        blocks = []
        for position, feature in enumerate(self.features):
            values = columns[feature.spec.name]
            if feature.spec.kind == NUMERIC:
                block = _apply_transform(feature.spec, np.asarray(values, dtype=np.float64))
                if self.scale:
                    block = (block - feature.mean) / feature.std
                blocks.append(block.reshape(n_rows, 1))
            else:
                lookup = self._lookups[position]
                codes = np.fromiter(
                    (lookup.get(_native(v), -1) for v in values), dtype=np.int64, count=n_rows
                )
                one_hot = np.zeros((n_rows, feature.width + 1))
                one_hot[np.arange(n_rows), codes] = 1.0
                blocks.append(one_hot[:, : feature.width])
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "features": [
                {
                    "spec": asdict(f.spec),
                    "mean": f.mean,
                    "std": f.std,
                    "observed_min": f.observed_min,
                    "observed_max": f.observed_max,
                    "categories": list(f.categories),
                }
                for f in self.features
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FeatureEncoder:
        features = [
            FittedFeature(
                FeatureSpec(**item["spec"]),
                mean=item["mean"],
                std=item["std"],
                observed_min=item["observed_min"],
                observed_max=item["observed_max"],
                categories=list(item["categories"]),
            )
            for item in state["features"]
        ]
        return cls(features, scale=state["scale"])


def _apply_transform(spec: FeatureSpec, values: np.ndarray) -> np.ndarray:
    if spec.transform == "log1p":
        return np.log1p(np.maximum(values, 0.0))
    return values


def is_finite_number(value: Any) -> bool:
    """True for int and float values that are finite; booleans are not numbers here."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
