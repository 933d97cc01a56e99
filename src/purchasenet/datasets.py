"""Purchase-behaviour data sets: seeded synthetic problems with known ceilings, and CSV tables.

Every data set yields three pandas frames (train, validation, test) holding the raw feature
columns and an integer ``target`` column with the class index.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from purchasenet.errors import DataError
from purchasenet.features import CATEGORICAL, NUMERIC, FeatureSpec, first_failed_row

TARGET = "target"
PURCHASE_CLASSES = ["no_purchase", "purchase"]
SEGMENTS = ["no_purchase", "window_shopping", "research_purchase", "impulse_purchase"]


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


class PurchaseDataset:
    """What every data set declares: name, task, features, classes and, if known, its ceiling."""

    name: str = "dataset"
    target_name: str = "purchase"
    features: list[FeatureSpec]
    class_names: list[str] = PURCHASE_CLASSES
    bayes_accuracy: float | None = None

    @property
    def task(self) -> str:
        return "binary" if len(self.class_names) == 2 else "multiclass"

    def load(self) -> Splits:
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A digest of the source file, to notice later that it changed; None when generated."""
        return None


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class SyntheticDataset(PurchaseDataset):
    """A generated problem; each split has its own seeded stream, so sizes change nothing else."""

    def __init__(
        self, n_train: int = 800, n_val: int = 200, n_test: int = 10_000, seed: int = 0
    ) -> None:
        for key, size in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(size) < 1:
                raise DataError(f"data.dataset.{key} must be at least 1, got {size}")
        self.sizes = (int(n_train), int(n_val), int(n_test))
        self.seed = int(seed)

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        raise NotImplementedError

    def load(self) -> Splits:
        frames = [
            self.sample(n, np.random.default_rng([self.seed, split]))
            for split, n in enumerate(self.sizes)
        ]
        return Splits(*frames)


class BrowsingMinutes(SyntheticDataset):
    """Purchase or not from minutes of browsing: longer visits buy more often.

    Minutes are exponential with mean 10, clipped to [0.5, 120]; a visit buys when
    0.1·minutes − 2 plus N(0, 0.5²) noise is positive, so the best rule is "buy above 20 min".
    """

    name = "browsing"
    features = [
        FeatureSpec("browsing_time", NUMERIC, minimum=0.0, description="minutes on the site")
    ]
    bayes_accuracy = 0.941

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        minutes = np.clip(rng.exponential(10.0, n), 0.5, 120.0)
        purchase = 0.1 * minutes - 2.0 + rng.normal(0.0, 0.5, n) > 0
        return pd.DataFrame({"browsing_time": minutes, TARGET: purchase.astype(np.int64)})


class SweetSpots(SyntheticDataset):
    """Purchases concentrate in three windows of visit length; elsewhere it is a coin flip.

    Minutes are uniform on [0, 120]; visits of 5–15, 25–35 or 60–80 minutes always buy, so a
    third of visits are predictable and the best accuracy is 1/3 + 2/3 · 1/2.
    """

    name = "sweet_spots"
    features = [
        FeatureSpec("browsing_time", NUMERIC, minimum=0.0, description="minutes on the site")
    ]
    windows = ((5.0, 15.0), (25.0, 35.0), (60.0, 80.0))
    bayes_accuracy = 2.0 / 3.0

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        minutes = rng.uniform(0.0, 120.0, n)
        in_window = np.zeros(n, dtype=bool)
        for low, high in self.windows:
            in_window |= (minutes >= low) & (minutes <= high)
        purchase = np.where(in_window, True, rng.random(n) < 0.5)
        return pd.DataFrame({"browsing_time": minutes, TARGET: purchase.astype(np.int64)})


class NoisyXor(SyntheticDataset):
    """Purchase when exactly one of time and engagement is high (XOR), with noisy readings.

    Points sit at the four corners of the unit square plus N(0, 0.3²) noise on each axis; the
    best rule splits both axes at 0.5 and is right when both or neither reading flips sides.
    """

    name = "xor"
    features = [
        FeatureSpec("browsing_time", NUMERIC, description="time on site, scaled to corners 0/1"),
        FeatureSpec("engagement", NUMERIC, description="engagement, scaled to corners 0/1"),
    ]
    noise = 0.3
    bayes_accuracy = round(_normal_cdf(0.5 / 0.3) ** 2 + (1 - _normal_cdf(0.5 / 0.3)) ** 2, 3)

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        corners = rng.integers(0, 2, size=(n, 2))
        readings = corners + rng.normal(0.0, self.noise, size=(n, 2))
        purchase = corners[:, 0] ^ corners[:, 1]
        return pd.DataFrame(
            {
                "browsing_time": readings[:, 0],
                "engagement": readings[:, 1],
                TARGET: purchase.astype(np.int64),
            }
        )


class BehaviourSegments(SyntheticDataset):
    """Four behaviour segments from browsing time and engagement, each a Gaussian cloud.

    Centres: no purchase (0.3, 0.3), window shopping (0.8, 0.3), research purchase (0.8, 0.8),
    impulse purchase (0.3, 0.8), with N(0, 0.2²) noise; the best rule splits both axes at 0.55.
    """

    name = "behavior"
    target_name = "segment"
    class_names = SEGMENTS
    features = [
        FeatureSpec("browsing_time", NUMERIC, description="time on site, scaled"),
        FeatureSpec("engagement", NUMERIC, description="engagement, scaled"),
    ]
    centres = np.array([[0.3, 0.3], [0.8, 0.3], [0.8, 0.8], [0.3, 0.8]])
    noise = 0.2
    bayes_accuracy = round(_normal_cdf(0.25 / 0.2) ** 2, 3)

    def sample(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        segment = rng.integers(0, len(SEGMENTS), size=n)
        readings = self.centres[segment] + rng.normal(0.0, self.noise, size=(n, 2))
        return pd.DataFrame(
            {"browsing_time": readings[:, 0], "engagement": readings[:, 1], TARGET: segment}
        )


class CsvDataset(PurchaseDataset):
    """Any CSV table: a target column, numeric and categorical feature columns.

    The test split is a stratified ``train_test_split`` of the file's rows; validation is
    carved, stratified, from the rest. Only the training part is used to fit scaling.
    """

    def __init__(
        self,
        path: str,
        target: str,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
        name: str = "csv",
        bounds: Mapping[str, Sequence[float | None]] | None = None,
        transforms: Mapping[str, str] | None = None,
        class_names: Sequence[str] | None = None,
        positive_class: Any = None,
        test_size: float = 0.2,
        val_size: float = 0.1,
        test_seed: int = 42,
        val_seed: int = 42,
    ) -> None:
        if not numeric and not categorical:
            raise DataError("data.dataset: list at least one column under numeric or categorical")
        self.path = str(path)
        self.target_column = target
        self.target_name = target
        self.name = name
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        bounds = dict(bounds or {})
        transforms = dict(transforms or {})
        for key, columns in (("bounds", bounds), ("transforms", transforms)):
            unknown = sorted(set(columns) - set(self.numeric))
            if unknown:
                raise DataError(
                    f"data.dataset.{key} names {unknown}, which are not numeric feature columns"
                )
        self.features = [
            FeatureSpec(
                column,
                NUMERIC,
                minimum=_bound(bounds, column, 0),
                maximum=_bound(bounds, column, 1),
                transform=transforms.get(column, "none"),
            )
            for column in self.numeric
        ] + [FeatureSpec(column, CATEGORICAL) for column in self.categorical]
        self._class_names = list(class_names) if class_names else None
        self.positive_class = positive_class
        self.test_size = test_size
        self.val_size = val_size
        self.test_seed = int(test_seed)
        self.val_seed = int(val_seed)
        self.class_names = self._class_names or PURCHASE_CLASSES

    def read_frame(self) -> pd.DataFrame:
        return read_csv_file(self.path, "data.dataset.path")

    def fingerprint(self) -> str | None:
        try:
            with open(self.path, "rb") as handle:
                return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            return None

    def load(self) -> Splits:
        from sklearn.model_selection import train_test_split

        frame = self.read_frame()
        frame = self._validated(frame)
        labels = self._encode_target(frame[self.target_column])
        table = frame[[f.name for f in self.features]].copy()
        table[TARGET] = labels

        try:
            rest, test = train_test_split(
                table, test_size=self.test_size, stratify=labels, random_state=self.test_seed
            )
            train, val = train_test_split(
                rest, test_size=self.val_size, stratify=rest[TARGET], random_state=self.val_seed
            )
        except ValueError as error:
            # scikit-learn refuses a stratified split when a class has too few rows.
            raise DataError(
                f"{Path(self.path).name}: cannot split {len(table)} rows into training, "
                f"validation and test parts stratified by {self.target_column!r} ({error}); "
                "add rows of the rare classes or change test_size and val_size"
            ) from None
        return Splits(*(part.reset_index(drop=True) for part in (train, val, test)))

    def _validated(self, frame: pd.DataFrame) -> pd.DataFrame:
        where = Path(self.path).name
        if frame.empty:
            raise DataError(f"{where}: the file has a header but no rows")
        wanted = [self.target_column, *self.numeric, *self.categorical]
        missing = [column for column in wanted if column not in frame.columns]
        if missing:
            raise DataError(
                f"{where}: missing column(s) {missing}; the file has {list(frame.columns)}"
            )
        for column in wanted:
            require_values(frame, column, where)
        for column in self.numeric:
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = values.isna().to_numpy()
            if bad.any():
                row = int(np.flatnonzero(bad)[0]) + 1
                raise DataError(
                    f"{where}: column {column!r} must be numeric; data row {row} "
                    f"(line {row + 1}) holds {frame[column].iloc[row - 1]!r}"
                )
            infinite = ~np.isfinite(values.to_numpy(dtype=np.float64))
            if infinite.any():
                row = int(np.flatnonzero(infinite)[0]) + 1
                raise DataError(
                    f"{where}: column {column!r} has an infinite value at data row {row}"
                )
            frame[column] = values.astype(np.float64)
        for spec in self.features:
            if spec.kind != NUMERIC:
                continue
            values = frame[spec.name].to_numpy()
            found = first_failed_row(spec.bound_checks(values))
            if found is not None:
                row, rule = found
                raise DataError(
                    f"{where}: column {spec.name!r} must {rule} (data.dataset.bounds); data row "
                    f"{row + 1} (line {row + 2}) holds {values[row]:g}"
                )
        return frame

    def _encode_target(self, target: pd.Series) -> np.ndarray:
        values = sorted(target.unique().tolist(), key=lambda v: (str(type(v)), v))
        if len(values) < 2:
            raise DataError(
                f"{Path(self.path).name}: target column {self.target_column!r} holds a single "
                f"class ({values[0]!r}); a classifier needs at least two"
            )
        if self.positive_class is not None and len(values) == 2:
            if self.positive_class not in values:
                raise DataError(
                    f"data.dataset.positive_class {self.positive_class!r} is not a value of "
                    f"{self.target_column!r}; it holds {values}"
                )
            values = [v for v in values if v != self.positive_class] + [self.positive_class]
        if self._class_names is None:
            self.class_names = [str(v) for v in values]
        elif len(self._class_names) != len(values):
            raise DataError(
                f"data.dataset.class_names has {len(self._class_names)} names but "
                f"{self.target_column!r} holds {len(values)} classes: {values}"
            )
        index = {value: position for position, value in enumerate(values)}
        return target.map(index).to_numpy(dtype=np.int64)


def require_values(frame: pd.DataFrame, column: str, where: str) -> None:
    """Raise a DataError naming the first empty cell of ``column``, if it has one."""
    empty = frame[column].isna().to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0]) + 1
        raise DataError(
            f"{where}: column {column!r} has {int(empty.sum())} empty value(s), "
            f"first at data row {row} (line {row + 1})"
        )


def read_csv_file(path: str | Path, key: str) -> pd.DataFrame:
    """Read a CSV file; a missing, empty or unreadable one is a DataError naming ``key``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: no such CSV file: {path}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None


def _bound(bounds: Mapping[str, Sequence[float | None]], column: str, side: int) -> float | None:
    limits = bounds.get(column)
    if limits is None:
        return None
    value = list(limits)[side]
    return None if value is None else float(value)


SHOPPERS_NUMERIC = [
    "Administrative",
    "Administrative_Duration",
    "Informational",
    "Informational_Duration",
    "ProductRelated",
    "ProductRelated_Duration",
    "BounceRates",
    "ExitRates",
    "PageValues",
    "SpecialDay",
]
SHOPPERS_CATEGORICAL = [
    "Month",
    "OperatingSystems",
    "Browser",
    "Region",
    "TrafficType",
    "VisitorType",
    "Weekend",
]
SHOPPERS_BOUNDS = {column: (0.0, None) for column in SHOPPERS_NUMERIC} | {
    "BounceRates": (0.0, 1.0),
    "ExitRates": (0.0, 1.0),
    "SpecialDay": (0.0, 1.0),
}


class OnlineShoppers(CsvDataset):
    """The UCI Online Shoppers Purchasing Intention sessions (12,330 rows), shipped with us.

    The test split is scikit-learn's ``train_test_split(test_size=0.2, stratify=Revenue,
    random_state=42)`` over the file's row order, so results compare with published ones.
    ``numeric`` and ``categorical`` pick a subset of the columns (all 17 by default).
    """

    def __init__(
        self,
        path: str | None = None,
        val_size: float = 0.1,
        val_seed: int = 42,
        transforms: Mapping[str, str] | None = None,
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
    ) -> None:
        numeric = SHOPPERS_NUMERIC if numeric is None else list(numeric)
        categorical = SHOPPERS_CATEGORICAL if categorical is None else list(categorical)
        unknown = sorted(set(numeric) - set(SHOPPERS_NUMERIC)) + sorted(
            set(categorical) - set(SHOPPERS_CATEGORICAL)
        )
        if unknown:
            raise DataError(
                f"data.dataset: {unknown} are not shopper columns of that kind; numeric ones are "
                f"{SHOPPERS_NUMERIC}, categorical ones {SHOPPERS_CATEGORICAL}"
            )
        super().__init__(
            path=path or str(shipped_shoppers_csv()),
            target="Revenue",
            numeric=numeric,
            categorical=categorical,
            name="shoppers",
            bounds={column: SHOPPERS_BOUNDS[column] for column in numeric},
            transforms=transforms,
            class_names=PURCHASE_CLASSES,
            test_size=0.2,
            val_size=val_size,
            test_seed=42,
            val_seed=val_seed,
        )


def shipped_shoppers_csv() -> Path:
    """Path of the compressed Online Shoppers CSV inside the installed package."""
    return Path(str(resources.files("purchasenet") / "resources/online_shoppers_intention.csv.gz"))
