"""What TensorBoard shows of a run: gradient flow, figures, histograms, PR curves and HParams."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from purchasenet.training import train

pytestmark = pytest.mark.slow


def tags_of(log_dir: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    return events.Tags()


def only_run(workdir: Path) -> Path:
    (run,) = [path for path in (workdir / "logs").iterdir() if path.name != "hydra"]
    return run


@pytest.fixture(scope="module")
def xor_run(tmp_path_factory):
    """Three hidden layers on the XOR data, two epochs."""
    workdir = tmp_path_factory.mktemp("xor")
    cfg = compose_train(
        ["data=xor", "model.hidden_sizes=[8,8,8]", "trainer.max_epochs=2",
         "data.dataset.n_test=2000"],
        workdir,
    )
    train(cfg)
    return only_run(workdir)


def test_gradient_flow_logs_one_gradient_norm_per_layer_each_epoch(xor_run):
    events = EventAccumulator(str(xor_run))
    events.Reload()
    gradient_tags = sorted(tag for tag in events.Tags()["scalars"] if tag.startswith("grad_norm/"))

    assert gradient_tags == [
        "grad_norm/hidden_1", "grad_norm/hidden_2", "grad_norm/hidden_3", "grad_norm/output"
    ]
    for tag in gradient_tags:
        values = [event.value for event in events.Scalars(tag)]
        assert len(values) == 2 and all(value > 0 for value in values)


def test_weights_and_activations_go_in_as_histograms(xor_run):
    histograms = set(tags_of(xor_run)["histograms"])
    assert {"weights/hidden_1", "weights/output", "activations/hidden_1",
            "activations/hidden_3"} <= histograms
    assert "activations/output" not in histograms


@pytest.mark.parametrize(
    "overrides, images, pr_curves",
    [
        (["data=browsing"], {"figures/probability_curve", "figures/reliability_diagram/test"},
         {"pr_curve/val", "pr_curve/test"}),
        (["model=multiclass"], {"figures/decision_boundary", "figures/confusion_matrix/val",
                                "figures/confusion_matrix/test",
                                "figures/reliability_diagram/test"}, set()),
    ],
)
def test_figures_match_the_shape_of_the_data(tmp_path, overrides, images, pr_curves):
    train(compose_train([*overrides, "trainer.max_epochs=1", "data.dataset.n_test=500"],
                        tmp_path))
    tags = tags_of(only_run(tmp_path))

    assert set(tags["images"]) == images
    assert {tag for tag in tags["tensors"] if tag.startswith("pr_curve/")} == pr_curves


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TensorBoard:
    """A real ``tensorboard`` process on a free local port, queried through its HTTP API."""

    def __init__(self, logdir: Path, output: Path) -> None:
        self.port = free_port()
        self.log = open(output, "w")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(logdir),
             "--host", "127.0.0.1", "--port", str(self.port), "--load_fast=false",
             "--reload_interval", "1"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def url(self, path: str, **query: str) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"http://127.0.0.1:{self.port}{path}{suffix}"

    def get(self, path: str, **query: str) -> bytes:
        with urllib.request.urlopen(self.url(path, **query), timeout=10) as response:
            return response.read()

    def get_json(self, path: str, **query: str):
        return json.loads(self.get(path, **query))

    def post_json(self, path: str, body: dict):
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def wait_for_tag(self, run: str, tag: str, limit: float = 90.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "tensorboard exited early"
            try:
                if tag in self.get_json("/data/plugin/scalars/tags").get(run, {}):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"tensorboard did not load {run}/{tag} within {limit} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def tensorboard(xor_run, tmp_path):
    server = TensorBoard(xor_run.parent, tmp_path / "tensorboard.log")
    try:
        server.wait_for_tag(xor_run.name, "test/acc")
        yield server
    finally:
        server.stop()


def test_tensorboard_serves_every_view_of_a_short_run(tensorboard, xor_run):
    run = xor_run.name
    plugins = tensorboard.get_json("/data/plugins_listing")
    for plugin in ("scalars", "images", "histograms", "pr_curves", "hparams"):
        assert plugins[plugin]["enabled"], plugin

    scalars = tensorboard.get_json("/data/plugin/scalars/tags")[run]
    assert {"val/acc", "val/loss", "test/acc", "grad_norm/hidden_1", "grad_norm/output"} <= set(
        scalars
    )
    curve = tensorboard.get_json("/data/plugin/scalars/scalars", run=run, tag="val/acc")
    assert len(curve) == 2

    images = tensorboard.get_json("/data/plugin/images/tags")[run]
    assert "figures/decision_boundary" in images
    (image,) = tensorboard.get_json("/data/plugin/images/images", run=run,
                                    tag="figures/decision_boundary")
    assert tensorboard.get("/data/plugin/images/individualImage?" + image["query"])[:4] == (
        b"\x89PNG"
    )

    histograms = tensorboard.get_json("/data/plugin/histograms/tags")[run]
    assert {"weights/hidden_1", "activations/hidden_1"} <= set(histograms)

    pr_curves = tensorboard.get_json("/data/plugin/pr_curves/tags")[run]
    assert {"pr_curve/val", "pr_curve/test"} <= set(pr_curves)

    experiment = tensorboard.post_json("/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {info["name"] for info in experiment["hparamInfos"]}
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"model.hidden_sizes", "model.members", "model.optimizer.lr", "data.name"} <= hparams
    assert {"val/acc_best", "test/acc", "test/loss"} <= metrics
    groups = tensorboard.post_json(
        "/data/plugin/hparams/session_groups",
        {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
         "colParams": [], "startIndex": 0, "sliceSize": 10},
    )
    (run_group,) = groups["sessionGroups"]
    assert run_group["hparams"]["model.hidden_sizes"] == "[8, 8, 8]"
