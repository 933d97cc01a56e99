"""The quality report's tables and the per-data recipes that the report measures."""

import sys

import numpy as np
import pytest

from conftest import compose_train
from purchasenet.datasets import OnlineShoppers
from purchasenet.errors import DataError, UserError
from purchasenet.quality import (
    LIGHTGBM,
    LOGISTIC,
    OURS,
    SHOPPER_ROWS,
    auroc_gap,
    lightgbm_probabilities,
    shopper_table,
    synthetic_table,
    target_table,
)


def fake_runs(auroc: float, seeds: int = 2) -> list[dict[str, float]]:
    keys = [key for _, key in SHOPPER_ROWS]
    return [
        {key: auroc + 0.01 * seed if key == "auroc" else 0.5 for key in keys}
        for seed in range(seeds)
    ]


def test_shopper_table_has_one_row_per_metric_and_one_column_per_model():
    scores = {OURS: fake_runs(0.93), LIGHTGBM: fake_runs(0.92, 1), LOGISTIC: fake_runs(0.9, 1)}

    lines = shopper_table(scores).splitlines()

    assert lines[0] == f"| metric | {OURS} | {LIGHTGBM} | {LOGISTIC} |"
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [
        "ROC-AUC",
        "PR-AUC (average precision)",
        "F1 at the decision threshold",
        "accuracy at the decision threshold",
        "ECE (15 bins)",
        "decision threshold",
        "best F1 at any test threshold *",
    ]
    assert lines[2] == "| ROC-AUC | 0.9350 ± 0.0071 | 0.9200 ± 0.0000 | 0.9000 ± 0.0000 |"
    assert auroc_gap(scores) == pytest.approx(0.015)


def test_target_table_counts_the_seeds_that_meet_each_target():
    runs = [
        {"auroc": 0.935, "average_precision": 0.75, "f1": 0.683, "ece": 0.017},
        {"auroc": 0.925, "average_precision": 0.74, "f1": 0.677, "ece": 0.021},
        {"auroc": 0.933, "average_precision": 0.73, "f1": 0.681, "ece": 0.020},
    ]
    scores = {OURS: runs, LIGHTGBM: [{"auroc": 0.929}]}

    lines = target_table(scores, seeds=[42, 43, 44]).splitlines()

    assert lines[0] == "| target | seed 42 | mean | seeds meeting it |"
    assert lines[2:] == [
        "| ROC-AUC ≥ LightGBM's | 0.9350 (yes) | 0.9310 (yes) | 2 of 3 |",
        "| PR-AUC ≥ 0.74 | 0.7500 (yes) | 0.7400 (yes) | 2 of 3 |",
        "| F1 ≥ 0.68 at the decision threshold | 0.6830 (yes) | 0.6803 (yes) | 2 of 3 |",
        "| ECE ≤ 0.02 | 0.0170 (yes) | 0.0193 (yes) | 2 of 3 |",
    ]


def test_synthetic_table_compares_each_accuracy_with_its_ceiling_less_half_a_point():
    table = synthetic_table(
        {"browsing": [0.938, 0.940], "xor": [0.901, 0.903]}, {"browsing": 0.941, "xor": 0.909}
    )
    rows = table.splitlines()[2:]

    assert rows[0] == "| browsing | 0.9390 ± 0.0014 | 0.941 | 0.936 | yes |"
    assert rows[1] == "| xor | 0.9020 ± 0.0014 | 0.909 | 0.904 | no |"


def test_missing_benchmark_extra_is_reported_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[bench\]'"):
        lightgbm_probabilities(OnlineShoppers().load(), seed=0)


def test_shoppers_recipe_is_the_default_and_an_explicit_key_still_wins():
    cfg = compose_train(["data=shoppers"])
    tuned = compose_train(["data=shoppers", "model.hidden_sizes=[8]", "trainer.max_epochs=3"])

    assert list(cfg.model.hidden_sizes) == [64, 64] and cfg.trainer.max_epochs == 30
    assert cfg.data.dataset.transforms.PageValues == "log1p"
    assert cfg.calibration.threshold_objective == "f1"
    assert list(tuned.model.hidden_sizes) == [8] and tuned.trainer.max_epochs == 3


def test_synthetic_recipes_decide_for_accuracy_and_follow_the_data_choice():
    assert compose_train([]).calibration.threshold_objective == "accuracy"
    assert list(compose_train(["model=multiclass"]).model.hidden_sizes) == [8]
    assert list(compose_train(["data=xor", "model=multiclass"]).model.hidden_sizes) == [32, 32]
    assert compose_train(["data=csv"]).calibration.threshold_objective == "f1"


def test_shoppers_column_subset_keeps_the_split_and_refuses_unknown_columns():
    subset = OnlineShoppers(categorical=["Month", "VisitorType"]).load()
    full = OnlineShoppers().load()

    assert list(subset.test.columns[-3:]) == ["Month", "VisitorType", "target"]
    np.testing.assert_array_equal(subset.test["target"], full.test["target"])
    with pytest.raises(DataError, match=r"\['Revenue'\] are not shopper columns"):
        OnlineShoppers(categorical=["Revenue"])
