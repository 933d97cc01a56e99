"""End to end: train real models for a few epochs and inspect what a user would look at."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT
from purchasenet.inference import BUNDLE_KEY, PurchaseModel
from purchasenet.training import train

COMMON_TAGS = {"train/loss", "val/loss", "val/acc", "test/loss", "test/acc", "time/fit_seconds"}
BINARY_TAGS = COMMON_TAGS | {"val/auroc", "test/auroc", "test/f1"}


def scalar_tags(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run(workdir: Path, kind: str) -> Path:
    (run,) = list((workdir / kind).iterdir())
    return run


@pytest.fixture(scope="module")
def trained_binary(tmp_path_factory):
    from conftest import compose_train

    workdir = tmp_path_factory.mktemp("binary")
    cfg = compose_train(["trainer.max_epochs=8"], workdir)
    return workdir, train(cfg)


def test_binary_run_logs_the_tags_and_reaches_a_useful_accuracy(trained_binary):
    workdir, metrics = trained_binary
    tags = scalar_tags(only_run(workdir, "logs"))

    assert BINARY_TAGS <= set(tags)
    assert len(tags["val/acc"]) == 8
    assert tags["train/loss"][-1] < tags["train/loss"][0]
    assert tags["test/acc"][-1] == pytest.approx(metrics["test/acc"])
    assert metrics["test/acc"] > 0.90


def test_binary_checkpoint_is_self_contained_and_loads_weights_only(trained_binary):
    workdir, metrics = trained_binary
    run = only_run(workdir, "checkpoints")
    assert {p.name for p in run.iterdir()} == {"best.ckpt", "last.ckpt"}

    checkpoint = torch.load(run / "best.ckpt", weights_only=True)
    bundle = checkpoint[BUNDLE_KEY]
    assert bundle["task"] == "binary" and bundle["class_names"] == ["no_purchase", "purchase"]
    assert bundle["test_metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert bundle["config"]["data"]["name"] == "browsing"

    model = PurchaseModel.from_checkpoint(run / "best.ckpt")
    probabilities = model.predict_proba({"browsing_time": [5.0, 15.0, 30.0, 60.0]})
    assert np.all(np.diff(probabilities) >= 0)
    assert model.decide(probabilities).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_multiclass_run_learns_the_four_segments(train_config, tmp_path):
    metrics = train(train_config("model=multiclass", "activation=relu", "trainer.max_epochs=10"))
    tags = scalar_tags(only_run(tmp_path, "logs"))

    assert COMMON_TAGS <= set(tags)
    assert metrics["test/acc"] > 0.75
    model = PurchaseModel.from_checkpoint(only_run(tmp_path, "checkpoints") / "best.ckpt")
    centres = {"browsing_time": [0.3, 0.8, 0.8, 0.3], "engagement": [0.3, 0.3, 0.8, 0.8]}
    assert model.labels(model.decide(model.predict_proba(centres))) == [
        "no_purchase", "window_shopping", "research_purchase", "impulse_purchase"
    ]


def test_shoppers_run_trains_on_the_real_sessions(train_config, tmp_path):
    metrics = train(train_config("data=shoppers", "trainer.max_epochs=3"))
    assert metrics["test/auroc"] > 0.85
    model = PurchaseModel.from_checkpoint(only_run(tmp_path, "checkpoints") / "best.ckpt")
    assert len(model.feature_names) == 13  # four coded identifiers are left out by default
    assert model.metadata["net"]["members"] == 5
    assert model.metadata["test_metrics"]["test/auroc"] == pytest.approx(metrics["test/auroc"])


def run_train_script(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )


def test_train_script_writes_logs_and_checkpoints_under_the_working_directory(tmp_path):
    result = run_train_script(tmp_path, "trainer.max_epochs=2", "trainer.enable_progress_bar=false")

    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path, "checkpoints")
    assert run.name.startswith("browsing-binary-relu-")
    assert (run / "best.ckpt").is_file()
    assert f"Best checkpoint:   checkpoints/{run.name}/best.ckpt" in result.stdout
    assert "test/acc" in result.stdout
    assert (tmp_path / "logs" / run.name).is_dir()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["no_such_key=1"], "Key 'no_such_key' is not in struct"),
        (["data=csv", "data.dataset.path=absent.csv", "data.dataset.target=bought",
          "data.dataset.numeric=[minutes]"], "error: data.dataset.path: no such CSV file"),
        (["data=csv", "data.dataset.path=visits.csv", "data.dataset.target=bought",
          "data.dataset.numeric=[minutes]"], "error: visits.csv: missing column(s) ['bought']"),
        (["data=behavior"], "error: model=binary needs a data set with 2 classes"),
        (["model.hidden_sizes=8"], "error: model.hidden_sizes must be a list of positive"),
        (["trainer.max_epochs=abc"], "error: trainer.max_epochs must be a whole number"),
        (["model.optimizer.lr=-1"], "error: model.optimizer: Invalid learning rate: -1"),
    ],
)
def test_train_script_user_errors_end_in_one_message_and_write_no_checkpoint(
    tmp_path, overrides, message
):
    (tmp_path / "visits.csv").write_text("minutes,device\n3,phone\n")
    result = run_train_script(tmp_path, *overrides)

    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "logs").exists() or list((tmp_path / "logs" / "hydra").iterdir()) == []


CSV_OPTIONS = [
    "data=csv",
    "data.dataset.path=visits.csv",
    "data.dataset.target=bought",
    "data.dataset.numeric=[minutes]",
    "data.dataset.categorical=[device]",
]
GOOD_ROWS = "".join(f"{3 + i},{'phone' if i % 2 else 'desk'},{i % 2}\n" for i in range(40))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("minutes,bought\n" + "3,0\n5,1\n" * 20,
         "error: visits.csv: missing column(s) ['device']"),
        ("minutes,device,bought\n" + GOOD_ROWS + "ten,phone,1\n",
         "error: visits.csv: column 'minutes' must be numeric; data row 41 (line 42) holds 'ten'"),
        ("minutes,device,bought\n" + GOOD_ROWS + "NaN,phone,1\n",
         "error: visits.csv: column 'minutes' has 1 empty value(s), first at data row 41"),
        ("", "error: visits.csv: the file is empty"),
        ("minutes,device,bought\n" + "3,phone,1\n" * 40,
         "error: visits.csv: target column 'bought' holds a single class (1)"),
        ("minutes,device,bought\n" + "3,phone,1\n" * 40 + "5,desk,0\n",
         "error: visits.csv: cannot split 41 rows into training, validation and test parts "
         "stratified by 'bought'"),
    ],
    ids=["missing feature", "non-numeric", "NaN", "empty file", "one class", "rare class"],
)
def test_bad_csv_ends_in_one_message_naming_the_column_and_writes_no_checkpoint(
    tmp_path, csv_text, message
):
    (tmp_path / "visits.csv").write_text(csv_text)

    result = run_train_script(tmp_path, *CSV_OPTIONS)

    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_trained_checkpoint_is_served_over_http_by_a_real_process(trained_binary):
    import httpx

    from processes import free_port, serve, wait_for_health

    workdir, metrics = trained_binary
    checkpoint = only_run(workdir, "checkpoints") / "best.ckpt"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    with serve(workdir, f"ckpt_path={checkpoint}", f"port={port}") as process:
        wait_for_health(process, url)
        answer = httpx.post(url + "/predict", json={"browsing_time": [5.0, 15.0, 30.0, 60.0]})
        malformed = httpx.post(
            url + "/predict", content=b'{"browsing_time": [5.0,',
            headers={"Content-Type": "application/json"},
        )
        info = httpx.get(url + "/info").json()
        after = httpx.post(url + "/predict", json={"browsing_time": [45.0]})

    assert answer.status_code == 200
    body = answer.json()
    assert body["predictions"] == [0.0, 0.0, 1.0, 1.0]
    assert body["labels"] == ["no_purchase", "no_purchase", "purchase", "purchase"]
    assert body["probabilities"] == sorted(body["probabilities"])
    assert 400 <= malformed.status_code < 500
    assert "message" in malformed.json()
    assert info["model"]["test_metrics"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert after.status_code == 200 and after.json()["predictions"] == [1.0]


def test_one_epoch_covers_every_training_row_once_in_chunks_of_batches(train_config):
    from purchasenet.training import build_datamodule

    datamodule = build_datamodule(train_config("data.chunk_batches=10", "data.batch_size=32").data)
    chunks = list(datamodule.train_dataloader())
    batches = [batch for chunk in chunks for batch in chunk]

    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    assert [len(targets) for _, targets in batches] == [32] * 25
    rows = torch.cat([inputs for inputs, _ in batches]).squeeze(1)
    expected = datamodule._tensors["train"].inputs.squeeze(1)
    assert torch.equal(rows.sort().values, expected.sort().values)


def test_chunked_training_makes_exactly_the_updates_of_one_step_per_batch(tmp_path):
    from conftest import compose_train

    weights = {}
    for chunk in (1, 64):
        cfg = compose_train(["trainer.max_epochs=3", "test=false", f"data.chunk_batches={chunk}",
                             f"run_name=chunk-{chunk}"], tmp_path)
        train(cfg)
        checkpoint = torch.load(tmp_path / "checkpoints" / f"chunk-{chunk}" / "last.ckpt",
                                weights_only=True)
        weights[chunk] = checkpoint["state_dict"]
        assert checkpoint["global_step"] == 3 * 25

    for key, value in weights[1].items():
        torch.testing.assert_close(weights[64][key], value)


def test_a_run_folder_or_a_file_that_is_no_checkpoint_are_understood(trained_binary, tmp_path):
    from purchasenet.errors import CheckpointError
    from purchasenet.inference import read_checkpoint

    workdir, _ = trained_binary
    run = only_run(workdir, "checkpoints")
    assert BUNDLE_KEY in read_checkpoint(run)
    text = tmp_path / "notes.ckpt"
    text.write_text("minutes,bought\n3,0\n")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint file"):
        read_checkpoint(text)


def test_an_ensemble_trains_checkpoints_and_predicts_with_its_mean_logit(train_config, tmp_path):
    from purchasenet.nets import MLPEnsemble

    metrics = train(train_config("model.members=3", "trainer.max_epochs=4"))
    run = only_run(tmp_path, "checkpoints")
    checkpoint = torch.load(run / "best.ckpt", weights_only=True)
    assert checkpoint[BUNDLE_KEY]["net"]["members"] == 3
    assert checkpoint["state_dict"]["net.1.weight"].shape == (3, 1, 16)
    assert metrics["test/acc"] > 0.90
    tags = scalar_tags(only_run(tmp_path, "logs"))
    assert {"grad_norm/hidden_1", "grad_norm/output"} <= set(tags)

    model = PurchaseModel.from_checkpoint(run / "best.ckpt")
    assert isinstance(model.net, MLPEnsemble)
    minutes = {"browsing_time": [5.0, 15.0, 30.0, 60.0]}
    inputs = torch.from_numpy(model.encoder.transform(minutes))
    with torch.no_grad():
        mean_logit = model.net.member_logits(inputs).mean(0).squeeze(-1)
    expected = torch.sigmoid(mean_logit / model.temperature).numpy()
    np.testing.assert_allclose(model.predict_proba(minutes), expected, rtol=1e-6)
    assert model.decide(expected).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("change", ["model.members=1", "model.members=3"])
def test_resuming_an_ensemble_with_another_number_of_members_names_the_setting(
    train_config, tmp_path, change
):
    from purchasenet.errors import ConfigError

    train(train_config("model.members=2", "trainer.max_epochs=1", "test=false", "run_name=two"))
    last = tmp_path / "checkpoints" / "two" / "last.ckpt"

    with pytest.raises(ConfigError, match=r"trained with other settings: model.members 2 \(here"):
        train(train_config(change, "trainer.max_epochs=2", f"ckpt_path={last}"))


def test_a_finished_run_marks_its_best_checkpoint_and_only_then(trained_binary):
    workdir, _ = trained_binary
    run = only_run(workdir, "checkpoints")
    assert torch.load(run / "best.ckpt", weights_only=True)[BUNDLE_KEY]["finished"] is True
    assert torch.load(run / "last.ckpt", weights_only=True)[BUNDLE_KEY]["finished"] is False
