"""Comparison reports: which runs they find, what each row says, and the compare script."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from purchasenet.errors import UserError
from purchasenet.reports import (
    comparison_table,
    find_summaries,
    gradient_ratio,
    split_overrides,
    write_report,
    write_summary,
)


def summary(name, overrides, accuracies, test_acc, first_grad=None, last_grad=None):
    history = []
    for epoch, accuracy in enumerate(accuracies):
        record = {"epoch": epoch, "val/acc": accuracy, "val/loss": 1.0 - accuracy}
        if first_grad is not None:
            record |= {"grad_norm/hidden_1": first_grad, "grad_norm/output": last_grad}
        history.append(record)
    return {
        "run_name": name,
        "dataset": "behavior",
        "task": "multiclass",
        "bayes_accuracy": 0.8,
        "overrides": overrides,
        "epochs": len(accuracies),
        "fit_seconds": 12.34,
        "log_dir": f"logs/{name}",
        "history": history,
        "test": {"test/acc": test_acc, "test/loss": 0.5, "test/f1_macro": test_acc - 0.01},
    }


SIGMOID = summary("deep-sigmoid", ["model=multiclass", "activation=sigmoid"], [0.25, 0.26, 0.24],
                  0.25, first_grad=1e-5, last_grad=0.2)
RELU = summary("deep-relu", ["model=multiclass", "activation=relu"], [0.5, 0.7, 0.78], 0.79,
               first_grad=0.1, last_grad=0.2)


def test_overrides_split_into_shared_and_per_run():
    common, own = split_overrides([SIGMOID, RELU])
    assert common == ["model=multiclass"]
    assert own == [["activation=sigmoid"], ["activation=relu"]]


def test_gradient_ratio_compares_the_first_layer_with_the_output_layer():
    assert gradient_ratio(SIGMOID["history"]) == pytest.approx(5e-5)
    assert gradient_ratio(RELU["history"]) == pytest.approx(0.5)
    assert gradient_ratio([{"epoch": 0, "val/acc": 0.5}]) is None


def test_table_has_one_row_per_run_with_best_final_and_test_metrics():
    table = comparison_table([SIGMOID, RELU])
    rows = [line for line in table.splitlines() if line.startswith("| activation=")]

    assert "Shared settings: `model=multiclass`" in table
    assert rows == [
        "| activation=sigmoid | 3 | 0.2600 (2) | 0.7400 | 0.2400 | 0.7600 | 0.2500 | 0.5000 "
        "| 0.2400 | 12.3 s | 5.00e-05 |",
        "| activation=relu | 3 | 0.7800 (3) | 0.2200 | 0.7800 | 0.2200 | 0.7900 | 0.5000 "
        "| 0.7800 | 12.3 s | 0.500 |",
    ]
    assert "Best possible accuracy on behavior: 0.800." in table


def test_runs_are_found_once_and_in_job_order(tmp_path):
    sweep = tmp_path / "multirun"
    runs = [summary(f"run-{n}", [f"seed={n}"], [0.5], 0.5) for n in range(11)]
    for number, run in enumerate(runs):
        write_summary(run, [sweep / str(number), tmp_path / "logs" / run["run_name"]])

    assert [s["run_name"] for s in find_summaries([sweep])] == [r["run_name"] for r in runs]
    assert len(find_summaries([tmp_path])) == 11
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json found under .*empty"):
        find_summaries([tmp_path / "empty"])


def test_compare_script_writes_both_files_into_the_folder_given(tmp_path):
    write_summary(SIGMOID, [tmp_path / "0"])
    write_summary(RELU, [tmp_path / "1"])

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "| activation=relu | 3 | 0.7800 (3)" in result.stdout
    assert (tmp_path / "comparison.md").read_text().count("| activation=") == 2
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_script_names_a_missing_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"error: {tmp_path / 'absent'}: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_figure_is_written_for_runs_without_gradients(tmp_path):
    plain = json.loads(json.dumps(RELU))
    for record in plain["history"]:
        record.pop("grad_norm/hidden_1")
    table, picture = write_report([plain], tmp_path)
    assert table.read_text().count("| – |") == 1
    assert picture.stat().st_size > 10_000
