"""Score the rows of a CSV file with a checkpoint: class probabilities and a prediction per row.

The output keeps every input column and adds ``probability_<class>`` (binary: the positive
class only) and ``prediction`` (the class name). Lightning is not needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from purchasenet.datasets import read_csv_file, require_values
from purchasenet.errors import DataError
from purchasenet.features import NUMERIC
from purchasenet.inference import PurchaseModel


def read_rows(path: str | Path, model: PurchaseModel) -> pd.DataFrame:
    """The CSV file's rows, checked to hold every feature the model reads."""
    path = Path(path)
    frame = read_csv_file(path, "input")

    missing = [name for name in model.feature_names if name not in frame.columns]
    if missing:
        raise DataError(
            f"{path.name}: missing column(s) {missing}; the model reads "
            f"{', '.join(model.feature_names)}"
        )
    for feature in model.encoder.features:
        column = feature.spec.name
        require_values(frame, column, path.name)
        if feature.spec.kind != NUMERIC:
            continue
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(
                f"{path.name}: column {column!r} must hold finite numbers; data row {row} "
                f"(line {row + 1}) holds {frame[column].iloc[row - 1]!r}"
            )
    return frame


def predict_rows(model: PurchaseModel, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with probability columns and the predicted class name added."""
    columns = {}
    for feature in model.encoder.features:
        column = frame[feature.spec.name]
        numeric = feature.spec.kind == NUMERIC
        columns[feature.spec.name] = (pd.to_numeric(column) if numeric else column).to_numpy()
    probabilities = model.predict_proba(columns)
    scored = frame.copy()
    if probabilities.ndim == 1:
        scored[f"probability_{model.class_names[-1]}"] = probabilities
    else:
        for index, name in enumerate(model.class_names):
            scored[f"probability_{name}"] = probabilities[:, index]
    scored["prediction"] = model.labels(model.decide(probabilities))
    return scored


def predict_file(checkpoint: str | Path, source: str | Path, target: str | Path) -> int:
    """Score ``source`` with ``checkpoint`` into ``target``; return the number of rows."""
    model = PurchaseModel.from_checkpoint(checkpoint)
    scored = predict_rows(model, read_rows(source, model))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scored.to_csv(target, index=False)
    return len(scored)
