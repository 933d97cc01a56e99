"""The LitServe API in-process: request schema, answers, errors, batching, /info and /health."""

from __future__ import annotations

import math
import os
import pickle
import queue
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import litserve
import numpy as np
import pytest
from fastapi.testclient import TestClient
from litserve.utils import LitAPIStatus, wrap_litserve_start
from pydantic import ValidationError

from checkpoint_factory import (
    BEHAVIOR_CLASSES,
    behavior_checkpoint,
    browsing_checkpoint,
    browsing_purchase_probability,
    corrupt_checkpoint,
    foreign_checkpoint,
    overflowing_browsing_checkpoint,
    shoppers_checkpoint,
    shoppers_rows,
)
from purchasenet import serving
from purchasenet.batching import IsolatingBatchLoop
from purchasenet.features import FeatureEncoder, FeatureSpec, FittedFeature
from purchasenet.inference import CheckpointError, PurchaseModel
from purchasenet.serving import (
    PurchaseAPI,
    ServeConfigError,
    api_for_model,
    build_server,
    ensure_port_free,
    find_latest_checkpoint,
    model_metadata,
    request_model,
    resolve_checkpoint,
    run_server,
)

MINUTES = [5.0, 15.0, 30.0, 60.0]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def browsing_ckpt(ckpt_dir):
    return browsing_checkpoint(ckpt_dir / "browsing" / "best.ckpt")


@pytest.fixture(scope="module")
def behavior_ckpt(ckpt_dir):
    return behavior_checkpoint(ckpt_dir / "behavior" / "best.ckpt")


@pytest.fixture(scope="module")
def shoppers_ckpt(ckpt_dir):
    return shoppers_checkpoint(ckpt_dir / "shoppers" / "best.ckpt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(client: TestClient, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the inference worker never became ready"
        time.sleep(0.05)


def serve_in_process(ckpt, **options):
    server = build_server(ckpt, **options)
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        wait_until_healthy(client)
        yield client


@pytest.fixture(scope="module")
def browsing_client(browsing_ckpt):
    yield from serve_in_process(browsing_ckpt)


@pytest.fixture(scope="module")
def behavior_client(behavior_ckpt):
    yield from serve_in_process(behavior_ckpt)


@pytest.fixture(scope="module")
def shoppers_client(shoppers_ckpt):
    yield from serve_in_process(shoppers_ckpt)


def test_serving_module_imports_no_lightning_pandas_or_hydra():
    code = (
        "import sys, purchasenet.serving\n"
        "loaded = [m for m in ('lightning', 'pytorch_lightning', 'pandas', 'hydra') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_binary_predictions_split_at_twenty_minutes(browsing_client):
    response = browsing_client.post("/predict", json={"browsing_time": MINUTES})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"predictions", "probabilities", "labels"}
    assert body["predictions"] == [0.0, 0.0, 1.0, 1.0]
    assert body["labels"] == ["no_purchase", "no_purchase", "purchase", "purchase"]
    expected = [browsing_purchase_probability(m) for m in MINUTES]
    assert body["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert body["probabilities"] == sorted(body["probabilities"])


def test_binary_accepts_integer_minutes_and_a_single_session(browsing_client):
    response = browsing_client.post("/predict", json={"browsing_time": [20]})

    assert response.status_code == 200
    assert response.json()["predictions"] == [1.0]
    assert response.json()["probabilities"] == pytest.approx([0.5], abs=1e-6)


def test_multiclass_predicts_one_segment_per_quadrant(behavior_client):
    request = {"browsing_time": [2.0, 20.0, 20.0, 2.0], "engagement": [0.1, 0.1, 0.9, 0.9]}

    response = behavior_client.post("/predict", json=request)

    assert response.status_code == 200
    body = response.json()
    assert body["predictions"] == [0, 1, 2, 3]
    assert body["labels"] == BEHAVIOR_CLASSES
    assert [len(row) for row in body["probabilities"]] == [4, 4, 4, 4]
    assert [sum(row) for row in body["probabilities"]] == pytest.approx([1.0] * 4, abs=1e-5)
    assert [int(np.argmax(row)) for row in body["probabilities"]] == [0, 1, 2, 3]


def test_shoppers_answers_match_the_model_loaded_directly(shoppers_client, shoppers_ckpt):
    rows = shoppers_rows()
    expected = PurchaseModel.from_checkpoint(shoppers_ckpt).predict_proba(rows)

    response = shoppers_client.post("/predict", json=rows)

    assert response.status_code == 200
    body = response.json()
    assert body["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert body["predictions"] == [float(p >= 0.5) for p in expected]
    assert "warnings" not in body


def test_unseen_category_is_scored_with_a_warning(shoppers_client, shoppers_ckpt):
    rows = shoppers_rows()
    rows["Month"] = ["Feb", "Smarch", "Smarch"]
    rows["TrafficType"] = [1, 2, 99]
    expected = PurchaseModel.from_checkpoint(shoppers_ckpt).predict_proba(rows)

    response = shoppers_client.post("/predict", json=rows)

    assert response.status_code == 200
    body = response.json()
    assert body["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    found = {(w["feature"], w["value"]): w["rows"] for w in body["warnings"]}
    assert found == {("Month", "Smarch"): [1, 2], ("TrafficType", 99): [2]}
    assert all(w["feature"] in w["message"] for w in body["warnings"])


def test_values_outside_the_training_range_are_scored_with_a_warning(browsing_client):
    response = browsing_client.post("/predict", json={"browsing_time": [30.0, 150.0, 400.0]})

    assert response.status_code == 200
    body = response.json()
    expected = [browsing_purchase_probability(m) for m in [30.0, 150.0, 400.0]]
    assert body["probabilities"] == pytest.approx(expected, abs=1e-6)
    (warning,) = body["warnings"]
    assert warning["feature"] == "browsing_time"
    assert warning["kind"] == "outside_training_range"
    assert warning["rows"] == [1, 2]
    assert warning["training_range"] == [0.0, 120.0]
    assert "outside the training range 0 to 120" in warning["message"]


@pytest.mark.parametrize("minutes", [1e7, 1e300, 1.7976931348623157e308])
def test_absurdly_large_value_is_clamped_to_a_finite_answer(browsing_client, minutes):
    response = browsing_client.post("/predict", json={"browsing_time": [minutes, 5.0]})

    assert response.status_code == 200
    body = response.json()
    assert body["probabilities"][0] == 1.0
    assert body["probabilities"][1] == pytest.approx(browsing_purchase_probability(5.0))
    assert body["predictions"] == [1.0, 0.0]
    assert body["warnings"][0]["rows"] == [0]


def test_multiclass_extreme_values_get_finite_probabilities(behavior_client):
    request = {"browsing_time": [1e308, 0.0], "engagement": [1.0, 0.0]}

    response = behavior_client.post("/predict", json=request)

    assert response.status_code == 200
    rows = response.json()["probabilities"]
    assert all(math.isfinite(p) for row in rows for p in row)
    assert [sum(row) for row in rows] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert response.json()["labels"] == ["research_purchase", "no_purchase"]


def test_server_keeps_answering_after_bad_requests(browsing_client):
    browsing_client.post("/predict", json={"browsing_time": [float("-1")]})
    browsing_client.post("/predict", content="{", headers={"Content-Type": "application/json"})

    response = browsing_client.post("/predict", json={"browsing_time": [60.0]})

    assert response.status_code == 200
    assert response.json()["predictions"] == [1.0]


def test_openapi_declares_the_checkpoint_schema(shoppers_client):
    spec = shoppers_client.get("/openapi.json").json()

    operation = spec["paths"]["/predict"]["post"]
    request_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    response_ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    schemas = spec["components"]["schemas"]
    request = schemas[request_ref.rsplit("/", 1)[-1]]
    assert request_ref.endswith("/ShoppersSessionFeatures")
    assert response_ref.endswith("/BinaryPrediction")
    assert request["additionalProperties"] is False
    assert len(request["required"]) == 17
    properties = request["properties"]
    assert properties["BounceRates"]["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    assert properties["Month"]["items"]["type"] == "string"
    assert properties["Region"]["items"]["type"] == "integer"
    assert properties["Weekend"]["items"]["type"] == "boolean"
    assert properties["Month"]["minItems"] == 1
    assert "June" in properties["Month"]["description"]


def test_docs_page_is_served(browsing_client):
    response = browsing_client.get("/docs")

    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def test_info_describes_the_model(shoppers_client):
    info = shoppers_client.get("/info").json()["model"]

    assert info["name"] == "shoppers-demo"
    assert info["dataset"] == "shoppers"
    assert info["task"] == "binary"
    assert info["class_names"] == ["no_purchase", "purchase"]
    assert info["threshold"] == 0.5
    assert info["test_metrics"] == {"test/acc": 0.94, "test/loss": 0.21}
    features = {feature["name"]: feature for feature in info["features"]}
    assert len(features) == 17
    assert features["Weekend"] == {"name": "Weekend", "kind": "categorical",
                                   "categories": [False, True]}
    assert features["ExitRates"]["kind"] == "numeric"
    assert features["ExitRates"]["maximum"] == 1.0


def test_multiclass_info_has_no_threshold(behavior_client):
    info = behavior_client.get("/info").json()["model"]

    assert info["task"] == "multiclass"
    assert info["class_names"] == BEHAVIOR_CLASSES
    assert info["threshold"] is None


def test_batched_requests_of_different_sizes_get_their_own_rows(browsing_ckpt):
    server = build_server(browsing_ckpt, max_batch_size=3, batch_timeout=5.0)
    requests = [
        {"browsing_time": [5.0]},
        {"browsing_time": [15.0, 30.0, 60.0, 90.0]},
        {"browsing_time": [-3.0]},
        {"browsing_time": [25.0, 10.0]},
    ]
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        wait_until_healthy(client)
        began = time.monotonic()
        with ThreadPoolExecutor(len(requests)) as pool:
            responses = list(pool.map(lambda body: client.post("/predict", json=body), requests))
        elapsed = time.monotonic() - began

    assert [r.status_code for r in responses] == [200, 200, 422, 200]
    for body, response in zip(requests, responses):
        if response.status_code == 200:
            expected = [browsing_purchase_probability(m) for m in body["browsing_time"]]
            assert response.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
            assert response.json()["predictions"] == [float(m >= 20) for m in body["browsing_time"]]
    # The three valid requests fill the batch, so nobody waits out the 5 s batch timeout.
    assert elapsed < 4.0


def test_batch_and_unbatch_keep_each_requests_rows_and_warnings(shoppers_ckpt):
    model = PurchaseModel.from_checkpoint(shoppers_ckpt)
    api = api_for_model(model, shoppers_ckpt, max_batch_size=4)
    api.setup("cpu")
    first = shoppers_rows()
    second = {name: values[:1] for name, values in shoppers_rows().items()}
    second["Month"] = ["Smarch"]

    decoded = [api.decode_request(first), api.decode_request(second)]
    outputs = api.unbatch(api.predict(api.batch(decoded)))
    answers = [api.encode_response(output) for output in outputs]

    assert [len(a["predictions"]) for a in answers] == [3, 1]
    assert answers[0]["probabilities"] == pytest.approx(model.predict_proba(first).tolist())
    assert answers[1]["probabilities"] == pytest.approx(model.predict_proba(second).tolist())
    assert "warnings" not in answers[0]
    assert answers[1]["warnings"][0]["rows"] == [0]


class RecordingTransport:
    """Stands in for LitServe's response queues and keeps what a loop answers, by request id."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple] = {}

    def send(self, item, consumer_id: int) -> None:
        uid, (data, status, _, _) = item
        self.answers[uid] = (data, status)


def run_loop(api, bodies, waited_s: float = 0.0) -> list[tuple]:
    """Queue ``bodies`` and LitServe's stop signal, run the worker loop, return each answer."""
    requests = queue.Queue()
    for number, body in enumerate(bodies):
        requests.put((0, f"request-{number}", time.monotonic() - waited_s, body))
    requests.put((None, None, None, None))
    transport = RecordingTransport()

    IsolatingBatchLoop().serve(api, requests, transport)

    return [transport.answers[f"request-{number}"] for number in range(len(bodies))]


@pytest.fixture
def overflowing_api(tmp_path):
    ckpt = overflowing_browsing_checkpoint(tmp_path / "overflowing.ckpt")
    api = api_for_model(PurchaseModel.from_checkpoint(ckpt), ckpt, max_batch_size=8)
    api.setup("cpu")
    return api


def test_loop_answers_a_request_the_model_cannot_score_alone(overflowing_api):
    bodies = [{"browsing_time": [float(m), m + 0.5][: 1 + m % 2]} for m in range(0, 50, 10)]
    bodies.insert(2, {"browsing_time": [10.0, 115.0]})
    batch_sizes = []
    predict = overflowing_api.predict

    def predict_counting_requests(rows):
        batch_sizes.append(len(rows.row_counts))
        return predict(rows)

    overflowing_api.predict = predict_counting_requests

    answers = run_loop(overflowing_api, bodies)

    assert batch_sizes[0] == len(bodies)
    failed, status = answers[2]
    assert status == LitAPIStatus.ERROR
    assert failed.status_code == 500
    assert "no finite probability for row 1" in failed.detail
    for body, (answer, status) in zip(bodies, answers):
        if body is not bodies[2]:
            assert status == LitAPIStatus.OK
            expected = [browsing_purchase_probability(m) for m in body["browsing_time"]]
            assert answer["probabilities"] == pytest.approx(expected, abs=1e-6)


def test_loop_turns_an_unexpected_exception_into_a_short_500(overflowing_api):
    predict = overflowing_api.predict

    def predict_failing_on_777(rows):
        if (rows.inputs == np.float32((777.0 - 30.0) / 20.0)).any():
            raise RuntimeError("secret internal detail")
        return predict(rows)

    overflowing_api.predict = predict_failing_on_777
    bodies = [{"browsing_time": [5.0]}, {"browsing_time": [777.0]}, {"browsing_time": [60.0]}]

    answers = run_loop(overflowing_api, bodies)

    (first, first_status), (failed, failed_status), (last, last_status) = answers
    assert (first_status, failed_status, last_status) == (
        LitAPIStatus.OK, LitAPIStatus.ERROR, LitAPIStatus.OK
    )
    assert failed.status_code == 500
    assert "internal error while scoring this request (RuntimeError)" in failed.detail
    assert "secret" not in failed.detail
    assert first["probabilities"] == pytest.approx([browsing_purchase_probability(5.0)])
    assert last["probabilities"] == pytest.approx([browsing_purchase_probability(60.0)])


def test_loop_answers_a_request_that_waited_too_long_with_504(overflowing_api):
    overflowing_api.request_timeout = 1.0

    ((answer, status),) = run_loop(overflowing_api, [{"browsing_time": [5.0]}], waited_s=5.0)

    assert status == LitAPIStatus.ERROR
    assert answer.status_code == 504


def test_threshold_comes_from_the_checkpoint(tmp_path):
    ckpt = browsing_checkpoint(tmp_path / "strict.ckpt", threshold=0.9)
    api = api_for_model(PurchaseModel.from_checkpoint(ckpt), ckpt)
    api.setup("cpu")

    answer = api.encode_response(api.predict(api.decode_request({"browsing_time": MINUTES})))

    assert answer["predictions"] == [0.0, 0.0, 0.0, 1.0]


def test_any_column_name_can_be_a_feature():
    encoder = FeatureEncoder([
        FittedFeature(FeatureSpec("json", minimum=0.0)),
        FittedFeature(FeatureSpec("Page Values")),
        FittedFeature(FeatureSpec("model_config", kind="categorical"), categories=["a", "b"]),
    ])
    schema = request_model(encoder)

    request = schema.model_validate({"json": [1], "Page Values": [2.5], "model_config": ["c"]})

    assert request.columns() == {"json": [1.0], "Page Values": [2.5], "model_config": ["c"]}
    assert list(schema.model_json_schema()["properties"]) == ["json", "Page Values", "model_config"]
    with pytest.raises(ValidationError, match="unknown feature 'feature_0'"):
        schema.model_validate({"feature_0": [1], "Page Values": [2.5], "model_config": ["a"]})


def test_api_pickles_as_the_base_class_for_spawned_workers(browsing_ckpt):
    api = api_for_model(PurchaseModel.from_checkpoint(browsing_ckpt), browsing_ckpt)

    restored = pickle.loads(pickle.dumps(api))

    assert type(restored) is PurchaseAPI
    assert restored.checkpoint_path == str(browsing_ckpt)
    assert restored.max_batch_size == 1


def test_validated_request_pickles_as_plain_columns(browsing_ckpt):
    schema = request_model(PurchaseModel.from_checkpoint(browsing_ckpt).encoder)

    request = schema.model_validate({"browsing_time": [5, 30.5]})

    assert pickle.loads(pickle.dumps(request)) == {"browsing_time": [5.0, 30.5]}


def test_api_key_guards_everything_but_health_and_docs(browsing_ckpt):
    server = build_server(browsing_ckpt, api_key="opensesame")
    key = {"X-API-Key": "opensesame"}
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        wait_until_healthy(client)
        missing = client.post("/predict", json={"browsing_time": [30.0]})
        wrong = client.post("/predict", json={"browsing_time": [30.0]}, headers={"X-API-Key": "x"})
        right = client.post("/predict", json={"browsing_time": [30.0]}, headers=key)
        info_without_key = client.get("/info")
        info_with_key = client.get("/info", headers=key)
        health_without_key = client.get("/health")
        docs_without_key = client.get("/openapi.json")

    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["message"].startswith("missing or wrong API key")
    assert right.json()["predictions"] == [1.0]
    assert (info_without_key.status_code, info_with_key.status_code) == (401, 200)
    assert health_without_key.status_code == 200
    assert docs_without_key.status_code == 200


def test_health_stays_503_when_the_worker_cannot_load_the_model(tmp_path):
    ckpt = browsing_checkpoint(tmp_path / "vanishing.ckpt")
    server = build_server(ckpt)
    ckpt.unlink()
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        deadline = time.monotonic() + 30
        while "error" not in started.workers_setup_status.values():
            assert time.monotonic() < deadline
            time.sleep(0.05)

        assert client.get("/health").status_code == 503


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "checkpoint not found"),
        (corrupt_checkpoint, "cannot read checkpoint"),
        (foreign_checkpoint, "is not a purchasenet checkpoint"),
    ],
)
def test_bad_checkpoint_exits_with_one_message_before_any_worker(
    tmp_path, monkeypatch, make, message
):
    ckpt = tmp_path / "model.ckpt"
    if make is not None:
        make(ckpt)
    monkeypatch.setattr(litserve.LitServer, "run", lambda *a, **k: pytest.fail("server ran"))

    with pytest.raises(SystemExit) as exit_info:
        run_server({"ckpt_path": str(ckpt), "port": free_port()})

    assert str(exit_info.value).startswith("error: ")
    assert message in str(exit_info.value)


def test_worker_that_cannot_load_the_model_stops_the_server_with_one_message(
    browsing_ckpt, tmp_path, monkeypatch
):
    def api_with_a_vanished_checkpoint(*args, **kwargs):
        api = api_for_model(*args, **kwargs)
        api.checkpoint_path = str(tmp_path / "vanished.ckpt")
        return api

    monkeypatch.setattr(serving, "api_for_model", api_with_a_vanished_checkpoint)
    running_before = set(live_children())

    with pytest.raises(SystemExit, match="the inference worker could not load the model"):
        run_server({"ckpt_path": str(browsing_ckpt), "port": free_port(), "log_level": "error"})

    assert set(live_children()) - running_before == set()


def live_children() -> list[int]:
    """Processes this test process started that still run, except multiprocessing's resource
    tracker, which serves the whole test session and ends with it."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if _running(int(pid))
        and "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_busy_port_exits_with_a_clear_message(browsing_ckpt):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        with pytest.raises(SystemExit, match=f"port {port} on 127.0.0.1 is already in use"):
            run_server({"ckpt_path": str(browsing_ckpt), "port": port})


def test_port_check_rejects_privileged_ports():
    with pytest.raises(ServeConfigError, match="between 1024 and 65535"):
        ensure_port_free("127.0.0.1", 80)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"host": "example.org"}, "host must be one of"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"batch_timeout": 60, "timeout": 30}, "batch_timeout must be at least 0 and below"),
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"port": "eighty"}, "port must be a number, got 'eighty'"),
        ({"workers": 1.5}, "workers must be a whole number"),
        ({"timeout": 0}, "timeout must be positive seconds"),
    ],
)
def test_bad_serve_setting_exits_naming_it(browsing_ckpt, setting, message):
    with pytest.raises(SystemExit, match=message):
        run_server({"ckpt_path": str(browsing_ckpt), "port": free_port(), **setting})


def test_null_checkpoint_serves_the_newest_best_checkpoint(tmp_path, monkeypatch):
    older = browsing_checkpoint(tmp_path / "checkpoints" / "run-a" / "best.ckpt")
    newer = browsing_checkpoint(tmp_path / "checkpoints" / "run-b" / "best.ckpt")
    browsing_checkpoint(tmp_path / "checkpoints" / "run-b" / "last.ckpt")
    stamp = time.time()
    older_stamp, newer_stamp = stamp - 100, stamp - 10
    os.utime(older, (older_stamp, older_stamp))
    os.utime(newer, (newer_stamp, newer_stamp))
    monkeypatch.chdir(tmp_path)

    assert resolve_checkpoint(None).resolve() == newer.resolve()
    assert find_latest_checkpoint().name == "best.ckpt"


def test_checkpoint_folder_serves_its_best_checkpoint(tmp_path):
    best = browsing_checkpoint(tmp_path / "run" / "best.ckpt")
    browsing_checkpoint(tmp_path / "run" / "last.ckpt")

    assert resolve_checkpoint(tmp_path / "run") == best


def test_null_checkpoint_without_any_says_to_train_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(CheckpointError, match="train one first with make train"):
        resolve_checkpoint(None)


def test_newest_run_that_did_not_finish_is_passed_over_with_a_note(tmp_path, monkeypatch, capsys):
    from purchasenet.calibration import update_bundle

    finished = browsing_checkpoint(tmp_path / "checkpoints" / "done" / "best.ckpt")
    stopped = browsing_checkpoint(tmp_path / "checkpoints" / "stopped" / "best.ckpt")
    update_bundle(stopped, finished=False)
    stamp = time.time()
    os.utime(finished, (stamp - 100, stamp - 100))
    os.utime(stopped, (stamp - 10, stamp - 10))
    monkeypatch.chdir(tmp_path)

    assert resolve_checkpoint(None).resolve() == finished.resolve()
    assert "note: passing over 1 newer best.ckpt of runs that did not finish" in (
        capsys.readouterr().err
    )
    assert PurchaseModel.from_checkpoint(stopped).metadata["finished"] is False
    assert model_metadata(PurchaseModel.from_checkpoint(stopped))["run_finished"] is False

    update_bundle(finished, finished=False)  # no finished run at all: the newest
    os.utime(finished, (stamp - 100, stamp - 100))
    assert resolve_checkpoint(None).resolve() == stopped.resolve()
