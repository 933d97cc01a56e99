"""The experiment workflow: overlays, sweeps with reports, search, DDP, resume, eval and predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, ROOT, compose_train
from purchasenet.evaluation import evaluate_checkpoint
from purchasenet.inference import BUNDLE_KEY, PurchaseModel
from purchasenet.reports import find_summaries
from purchasenet.training import build_datamodule, build_model, train

QUICK = ["trainer.enable_progress_bar=false", "data.dataset.n_test=1000"]


def run_script(workdir: Path, script: str, *arguments: str, timeout: int = 600):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *arguments],
        cwd=workdir, capture_output=True, text=True, timeout=timeout,
    )


def run_folders(workdir: Path, kind: str) -> list[Path]:
    return sorted(path for path in (workdir / kind).iterdir() if path.name not in {"hydra",
                                                                                   "multirun"})


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "experiment, data, hidden_sizes, activation, swept",
    [
        ("xor_neurons", "xor", [2], "Tanh", {"model.hidden_sizes": "[1],[2],[3],[4]"}),
        ("sweet_spots_neurons", "sweet_spots", [6], "ReLU",
         {"model.hidden_sizes": "[2],[6],[12]"}),
        ("activations", "behavior", [128], "ReLU", {"activation": "sigmoid,tanh,relu"}),
        ("vanishing_gradients", "behavior", [8, 8, 8, 8, 8], "Sigmoid",
         {"activation": "sigmoid,relu"}),
        ("seed_recipe", "browsing", [5], "ReLU", None),
    ],
)
def test_each_experiment_sets_up_its_study_and_builds(
    experiment, data, hidden_sizes, activation, swept
):
    cfg = compose_with_hydra([f"experiment={experiment}", "data.dataset.n_test=10"])

    assert cfg.data.name == data and list(cfg.model.hidden_sizes) == hidden_sizes
    assert cfg.activation._target_ == f"torch.nn.{activation}"
    assert (cfg.hydra.sweeper.params or None) == swept
    datamodule = build_datamodule(cfg.data)
    assert build_model(cfg, datamodule).task == datamodule.task


def test_seed_recipe_is_the_plain_recipe():
    cfg = compose_train(["experiment=seed_recipe"])
    assert (cfg.data.dataset.n_train, cfg.data.batch_size, cfg.data.scale) == (800, 32, False)
    assert (cfg.model.optimizer._target_, cfg.model.optimizer.lr) == ("torch.optim.Adam", 0.01)
    assert cfg.trainer.max_epochs == 200


def test_optuna_search_tunes_width_depth_learning_rate_and_dropout():
    cfg = compose_with_hydra(["hparams_search=optuna", "search.width=8", "search.depth=3"])

    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {
        "search.width", "search.depth", "model.optimizer.lr", "model.dropout"
    }
    assert list(cfg.model.hidden_sizes) == [8, 8, 8]


@pytest.mark.slow
def test_sweep_writes_a_comparison_of_its_runs(tmp_path):
    result = run_script(tmp_path, "train.py", "-m", "model=multiclass", "activation=sigmoid,relu",
                        "trainer.max_epochs=2", *QUICK)
    assert result.returncode == 0, result.stderr

    (sweep,) = (tmp_path / "logs" / "multirun").iterdir()
    table = (sweep / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| activation=")]
    assert [row.split(" | ")[0:2] for row in rows] == [["| activation=sigmoid", "2"],
                                                        ["| activation=relu", "2"]]
    assert "model=multiclass" in table.split("|")[0]
    assert (sweep / "comparison.png").stat().st_size > 10_000
    assert len(run_folders(tmp_path, "logs")) == len(run_folders(tmp_path, "checkpoints")) == 2
    assert "Comparison of 2 runs" in result.stdout


@pytest.mark.slow
def test_optuna_search_runs_the_requested_trials(tmp_path):
    result = run_script(tmp_path, "train.py", "-m", "hparams_search=optuna",
                        "hydra.sweeper.n_trials=2", "trainer.max_epochs=1", *QUICK)
    assert result.returncode == 0, result.stderr

    (sweep,) = (tmp_path / "logs" / "multirun").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "search.width", "search.depth", "model.optimizer.lr", "model.dropout"
    }
    assert len(find_summaries([sweep])) == 2
    for run in run_folders(tmp_path, "checkpoints"):
        bundle = torch.load(run / "best.ckpt", weights_only=True)[BUNDLE_KEY]
        search = bundle["config"]["search"]
        assert bundle["net"]["hidden_sizes"] == [search["width"]] * search["depth"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path):
    # With the progress bar on, as a user runs it, and an ensemble.
    result = run_script(tmp_path, "train.py", "trainer=ddp", "trainer.devices=2",
                        "trainer.accelerator=cpu", "trainer.max_epochs=2", "model.members=2",
                        "data.dataset.n_test=1000", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Grad strides do not match" not in result.stderr

    (logs,) = run_folders(tmp_path, "logs")
    (checkpoints,) = run_folders(tmp_path, "checkpoints")
    assert logs.name == checkpoints.name
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list((tmp_path / "logs" / "hydra").iterdir())) == 1
    assert result.stdout.count("Best checkpoint:") == 1

    summary = json.loads((logs / "summary.json").read_text())
    assert [record["epoch"] for record in summary["history"]] == [0, 1]
    # Each process scored its own half of the test rows, none twice: a single process agrees.
    _, metrics, rows = evaluate_checkpoint(checkpoints / "best.ckpt")
    assert rows == 1000
    for key, value in summary["test"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_ddp_inside_a_sweep_runs_each_job_once_on_its_own_processes(tmp_path):
    result = run_script(tmp_path, "train.py", "-m", "trainer=ddp", "trainer.devices=2",
                        "trainer.accelerator=cpu", "activation=sigmoid,relu",
                        "trainer.max_epochs=1", *QUICK)
    assert result.returncode == 0, result.stderr

    (sweep,) = (tmp_path / "logs" / "multirun").iterdir()
    assert len(run_folders(tmp_path, "checkpoints")) == len(run_folders(tmp_path, "logs")) == 2
    assert [s["overrides"][3] for s in find_summaries([sweep])] == [
        "activation=sigmoid", "activation=relu"
    ]
    assert all((sweep / job / "train_ddp_process_1.log").is_file() for job in ("0", "1"))
    assert not (tmp_path / "logs" / "hydra").exists()


@pytest.fixture(scope="module")
def xor_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xor")
    metrics = train(compose_train(["data=xor", "trainer.max_epochs=3", *QUICK], workdir))
    (run,) = run_folders(workdir, "checkpoints")
    return workdir, run / "best.ckpt", metrics


def test_eval_rebuilds_the_data_and_reproduces_the_test_metrics(xor_run):
    workdir, checkpoint, metrics = xor_run
    _, evaluated, rows = evaluate_checkpoint(checkpoint)

    assert rows == 1000
    assert set(evaluated) == {key for key in metrics if key.startswith("test/")}
    for key, value in evaluated.items():
        assert value == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.slow
def test_eval_script_prints_the_test_metrics_of_training(xor_run):
    workdir, checkpoint, metrics = xor_run
    result = run_script(workdir, "eval.py", f"ckpt_path={checkpoint}")

    assert result.returncode == 0, result.stderr
    accuracy = f"{metrics['test/acc']:.4f}"
    lines = result.stdout.splitlines()
    assert f"  {'test/acc':<22} {accuracy}   (training: {accuracy})" in lines
    # One column of values, whatever the length of the metric names.
    assert len({line.index(".") for line in lines if line.startswith("  test/")}) == 1
    assert list(workdir.glob("*.log")) == [] and not (workdir / ".hydra").exists()


@pytest.mark.slow
def test_predict_script_round_trips_a_csv(xor_run, tmp_path):
    _, checkpoint, _ = xor_run
    visits = pd.DataFrame({"visit": ["a", "b", "c", "d"], "browsing_time": [0.0, 1.0, 0.0, 1.0],
                           "engagement": [0.0, 0.0, 1.0, 1.0]})
    visits.to_csv(tmp_path / "visits.csv", index=False)

    result = run_script(tmp_path, "predict.py", f"ckpt_path={checkpoint}", "input=visits.csv",
                        "output=scored/visits.csv")

    assert result.returncode == 0, result.stderr
    scored = pd.read_csv(tmp_path / "scored" / "visits.csv")
    assert list(scored.columns) == [*visits.columns, "probability_purchase", "prediction"]
    pd.testing.assert_frame_equal(scored[visits.columns], visits)
    model = PurchaseModel.from_checkpoint(checkpoint)
    expected = model.predict_proba(visits)
    assert scored["probability_purchase"].to_numpy() == pytest.approx(expected, abs=1e-6)
    assert scored["prediction"].tolist() == ["no_purchase", "purchase", "purchase", "no_purchase"]


@pytest.mark.slow
def test_predict_script_names_a_missing_column(xor_run, tmp_path):
    _, checkpoint, _ = xor_run
    (tmp_path / "visits.csv").write_text("browsing_time,pages\n3.0,4\n")

    result = run_script(tmp_path, "predict.py", f"ckpt_path={checkpoint}", "input=visits.csv",
                        "output=scored.csv")

    assert result.returncode != 0
    assert "error: visits.csv: missing column(s) ['engagement']" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "scored.csv").exists()


def test_eval_and_predict_never_import_lightning():
    code = ("import sys, purchasenet.evaluation, purchasenet.predictions; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(train_config, tmp_path):
    # With a learning rate of 0 no later epoch improves on the first.
    train(train_config("data=xor", "trainer.max_epochs=4", "model.optimizer.lr=0",
                       "run_name=still", *QUICK))
    run = tmp_path / "checkpoints" / "still"

    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 3
    assert torch.load(run / "best.ckpt", weights_only=True)["epoch"] == 0


def test_resume_continues_the_same_run_to_the_new_epoch_count(train_config, tmp_path):
    train(train_config("data=xor", "trainer.max_epochs=2", *QUICK))
    (run,) = run_folders(tmp_path, "checkpoints")

    metrics = train(train_config("data=xor", f"ckpt_path={run / 'last.ckpt'}",
                                 "trainer.max_epochs=4", *QUICK))

    assert run_folders(tmp_path, "checkpoints") == [run]
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 3
    summary = json.loads((tmp_path / "logs" / run.name / "summary.json").read_text())
    assert [record["epoch"] for record in summary["history"]] == [0, 1, 2, 3]
    assert summary["epochs"] == 4 and "test/acc" in metrics


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("activation=sigmoid", r"activation relu \(here sigmoid\)"),
        ("data=browsing", r"data=xor \(here browsing\)"),
        ("data.dataset.seed=1", r"data.dataset.seed 0 \(here 1\)"),
        ("model.hidden_sizes=[8,8]", r"model.hidden_sizes \[16,16\] \(here \[8,8\]\)"),
        ("model.dropout=0.3", r"model.dropout 0.0 \(here 0.3\)"),
        ("model.class_weights=[1,3]", r"model.class_weights null \(here \[1,3\]\)"),
    ],
)
def test_resume_with_another_network_or_data_is_refused_and_writes_nothing(
    train_config, tmp_path, change, message
):
    from purchasenet.errors import ConfigError

    train(train_config("data=xor", "trainer.max_epochs=1", "run_name=xor", *QUICK))
    run = tmp_path / "checkpoints" / "xor"
    before = {path.name: path.read_bytes() for path in run.iterdir()}

    with pytest.raises(ConfigError, match=f"was trained with other settings: .*{message}"):
        train(train_config("data=xor", change, f"ckpt_path={run / 'last.ckpt'}",
                           "trainer.max_epochs=2", *QUICK))
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the file from elsewhere
def test_resume_from_a_copied_run_continues_in_the_copy(train_config, tmp_path):
    import shutil

    train(train_config("data=xor", "trainer.max_epochs=1", "run_name=original", *QUICK))
    original = tmp_path / "checkpoints" / "original"
    before = {path.name: path.read_bytes() for path in original.iterdir()}
    shutil.copytree(original, tmp_path / "checkpoints" / "copy")
    shutil.copy(original / "last.ckpt", tmp_path / "elsewhere.ckpt")

    train(train_config("data=xor", f"ckpt_path={tmp_path / 'checkpoints' / 'copy' / 'last.ckpt'}",
                       "trainer.max_epochs=2", *QUICK))
    train(train_config("data=xor", f"ckpt_path={tmp_path / 'elsewhere.ckpt'}",
                       "trainer.max_epochs=2", *QUICK))

    assert {path.name: path.read_bytes() for path in original.iterdir()} == before
    copy_last = torch.load(tmp_path / "checkpoints" / "copy" / "last.ckpt", weights_only=True)
    assert copy_last["epoch"] == 1
    resumed = tmp_path / "checkpoints" / "original-resumed" / "last.ckpt"
    assert torch.load(resumed, weights_only=True)["epoch"] == 1


def test_a_copied_run_keeps_its_best_checkpoint_record(tmp_path):
    from purchasenet.callbacks import RunCheckpoint

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "best.ckpt").write_bytes(b"stand-in")
    stored = {
        "dirpath": str(tmp_path / "original"),
        "best_model_path": str(tmp_path / "original" / "best.ckpt"),
        "best_model_score": torch.tensor(0.25),
        "kth_best_model_path": str(tmp_path / "original" / "best.ckpt"),
        "kth_value": torch.tensor(0.25),
        "best_k_models": {str(tmp_path / "original" / "best.ckpt"): torch.tensor(0.25)},
        "last_model_path": "",
    }

    copy = RunCheckpoint(dirpath=tmp_path / "copy", filename="best", monitor="val/loss")
    copy.load_state_dict(stored)
    assert copy.best_model_score == pytest.approx(0.25)
    assert copy.best_model_path == str(tmp_path / "copy" / "best.ckpt")

    elsewhere = RunCheckpoint(dirpath=tmp_path / "new", filename="best", monitor="val/loss")
    with pytest.warns(UserWarning, match="The dirpath has changed"):
        elsewhere.load_state_dict(stored)  # no best.ckpt there: a record of its own
    assert elsewhere.best_model_score is None


def test_same_seed_gives_the_same_metrics(train_config, tmp_path):
    def validation_curve_and_test_metrics(name: str) -> tuple[list[dict], dict]:
        metrics = train(train_config("data=xor", "trainer.max_epochs=2", f"run_name={name}",
                                     *QUICK))
        summary = json.loads((tmp_path / "logs" / name / "summary.json").read_text())
        curve = [{key: value for key, value in record.items() if key.startswith("val/")}
                 for record in summary["history"]]
        return curve, {key: value for key, value in metrics.items() if key.startswith("test/")}

    first, again = map(validation_curve_and_test_metrics, ["first", "again"])
    assert len(first[0]) == 2 and first == again


def test_eval_warns_when_the_training_csv_has_changed(train_config, tmp_path):
    import warnings

    from purchasenet.errors import DataError

    from purchasenet.training import train

    rng = np.random.default_rng(0)
    minutes = rng.exponential(10.0, 400)
    visits = pd.DataFrame({"minutes": minutes, "bought": (minutes > 12).astype(int)})
    path = tmp_path / "visits.csv"
    visits.to_csv(path, index=False)
    train(train_config("data=csv", f"data.dataset.path={path}", "data.dataset.target=bought",
                       "data.dataset.numeric=[minutes]", "trainer.max_epochs=1", "run_name=csv"))
    checkpoint = tmp_path / "checkpoints" / "csv" / "best.ckpt"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_checkpoint(checkpoint)  # unchanged file: no warning
    visits.iloc[::-1].to_csv(path, index=False)
    with pytest.warns(UserWarning, match=r"visits.csv has changed since training \(its sha256"):
        evaluate_checkpoint(checkpoint)

    visits.assign(bought=visits["bought"].astype(str).where(visits.index > 2, "maybe")).to_csv(
        path, index=False
    )
    with pytest.warns(UserWarning), pytest.raises(DataError, match=(
        r"the target now holds the classes \['0', '1', 'maybe'\], the checkpoint was trained "
        r"on \['0', '1'\]"
    )):
        evaluate_checkpoint(checkpoint)
