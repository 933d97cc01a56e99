"""Score the rows of a CSV file with a checkpoint: class probabilities and a prediction per row.

The output keeps every input column and adds ``probability_<class>`` (binary: the positive
class only) and ``prediction`` (the class name). Rows are checked as the server checks a
request, so a file scores exactly when the server would answer it. Lightning is not needed.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from purchasenet.datasets import read_csv_file, require_values
from purchasenet.errors import DataError
from purchasenet.features import NUMERIC, first_failed_row
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
        checks = [(~np.isfinite(values), "hold finite numbers")]
        found = first_failed_row(checks + feature.spec.bound_checks(values))
        if found is not None:
            row, rule = found
            value = frame[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value
            raise DataError(
                f"{path.name}: column {column!r} must {rule}; data row {row + 1} "
                f"(line {row + 2}) holds {value!r}"
            )
    frame = _known_categories_by_text(frame, model)
    _warn_unseen_categories(frame, model, path.name)
    return frame


def _known_categories_by_text(frame: pd.DataFrame, model: PurchaseModel) -> pd.DataFrame:
    """Read a category written as text (``True`` in a column that pandas kept as text because
    of another row) as the training category it spells, so a row scores whatever its
    neighbours; the server's JSON carries the types themselves."""
    encoder = model.encoder
    frame = frame.copy()
    for position, feature in enumerate(encoder.features):
        if feature.spec.kind == NUMERIC:
            continue
        by_text = {str(category): category for category in feature.categories}

        def known(value, position=position, by_text=by_text):
            if encoder.category_index(position, value) >= 0:
                return value
            return by_text.get(str(value), value)

        frame[feature.spec.name] = frame[feature.spec.name].map(known)
    return frame


def _warn_unseen_categories(frame: pd.DataFrame, model: PurchaseModel, name: str) -> None:
    """Warn, as the server does, about categories training never saw (they score as none)."""
    encoder = model.encoder
    for position, feature in enumerate(encoder.features):
        if feature.spec.kind == NUMERIC:
            continue
        values = frame[feature.spec.name].unique()
        unseen = [value for value in values if encoder.category_index(position, value) < 0]
        if unseen:
            shown = ", ".join(repr(value) for value in unseen[:5])
            more = f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
            warnings.warn(
                f"{name}: column {feature.spec.name!r} holds values training never saw "
                f"({shown}{more}); they are scored as no known category",
                stacklevel=2,
            )


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
    """Score ``source`` with ``checkpoint`` into ``target``; return the number of rows.

    The output appears whole or not at all, and never replaces the input or the checkpoint.
    """
    source, target = Path(source), Path(target)
    if target.is_dir():
        raise DataError(f"output {target} is a folder; name a file, e.g. {target / 'scored.csv'}")
    for kept, what in ((source, "input file"), (Path(checkpoint), "checkpoint")):
        if target.exists() and kept.exists() and target.resolve() == kept.resolve():
            raise DataError(f"output {target} is the {what}; write the scored rows to another path")
    model = PurchaseModel.from_checkpoint(checkpoint)
    scored = predict_rows(model, read_rows(source, model))
    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scored.to_csv(partial, index=False)
        os.replace(partial, target)
    except OSError as error:
        raise DataError(f"cannot write output {target}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return len(scored)
