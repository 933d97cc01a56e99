"""The LitServe API in-process: request schema, answers, errors, batching, /info and /health."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import litserve.server
import numpy as np
import pytest
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start
from pydantic import ValidationError

from checkpoint_factory import (
    BEHAVIOR_CLASSES,
    behavior_checkpoint,
    browsing_checkpoint,
    browsing_purchase_probability,
    corrupt_checkpoint,
    foreign_checkpoint,
    shoppers_checkpoint,
    shoppers_rows,
)
from purchasenet.features import FeatureEncoder, FeatureSpec, FittedFeature
from purchasenet.inference import CheckpointError, PurchaseModel
from purchasenet.serving import (
    PurchaseAPI,
    ServeConfigError,
    api_for_model,
    build_server,
    ensure_port_free,
    find_latest_checkpoint,
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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"browsing_tme": [5.0]}, "browsing_tme"),
        ({"browsing_time": [5.0], "engagement": [0.5]}, "engagement"),
        ({}, "browsing_time"),
        ({"browsing_time": []}, "browsing_time"),
        ({"browsing_time": 5.0}, "browsing_time"),
        ({"browsing_time": ["5"]}, "browsing_time"),
        ({"browsing_time": [True]}, "browsing_time"),
        ({"browsing_time": [None]}, "browsing_time"),
        ({"browsing_time": [[5.0]]}, "browsing_time"),
        ({"browsing_time": [-1.0]}, "browsing_time"),
        ({"browsing_time": [1e300]}, "browsing_time"),
    ],
)
def test_bad_binary_request_is_422_naming_the_field(browsing_client, body, field):
    response = browsing_client.post("/predict", json=body)

    assert response.status_code == 422
    assert field in response.json()["message"]


def test_misspelt_feature_message_suggests_the_expected_name(browsing_client):
    response = browsing_client.post("/predict", json={"browsing_tme": [5.0]})

    message = response.json()["message"]
    assert "did you mean 'browsing_time'" in message
    assert "expected features: browsing_time" in message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_number_is_422(browsing_client, literal):
    content = '{"browsing_time": [5.0, %s]}' % literal

    response = browsing_client.post(
        "/predict", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert "browsing_time row 1" in response.json()["message"]


def test_malformed_json_is_400(browsing_client):
    response = browsing_client.post(
        "/predict", content='{"browsing_time": [5.0', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]


def test_body_sent_as_form_data_is_415(browsing_client):
    response = browsing_client.post("/predict", content='{"browsing_time": [5.0]}')

    assert response.status_code == 415
    assert "application/json" in response.json()["message"]


@pytest.mark.parametrize("body", ["[5.0, 15.0]", "null", '"browsing_time"'])
def test_body_that_is_not_an_object_is_422(browsing_client, body):
    response = browsing_client.post(
        "/predict", content=body, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["message"].startswith("request body: ")


def test_oversized_body_is_413(browsing_client):
    huge = '{"browsing_time": [' + ", ".join(["12.5"] * 3_500_000) + "]}"

    response = browsing_client.post(
        "/predict", content=huge, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 413


def test_too_many_rows_is_422(browsing_client):
    response = browsing_client.post("/predict", json={"browsing_time": [5.0] * 10_001})

    assert response.status_code == 422
    assert "browsing_time" in response.json()["message"]


def test_server_keeps_answering_after_bad_requests(browsing_client):
    browsing_client.post("/predict", json={"browsing_time": [float("-1")]})
    browsing_client.post("/predict", content="{", headers={"Content-Type": "application/json"})

    response = browsing_client.post("/predict", json={"browsing_time": [60.0]})

    assert response.status_code == 200
    assert response.json()["predictions"] == [1.0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"browsing_time": [2.0, 20.0], "engagement": [0.5]},
            "browsing_time has 2, engagement has 1",
        ),
        ({"browsing_time": [2.0], "engagement": [1.5]}, "engagement row 0"),
        (
            {"browsing_time": [2.0], "Engagement": [0.5]},
            "'Engagement' (did you mean 'engagement'?)",
        ),
    ],
)
def test_bad_multiclass_request_is_422_naming_the_field(behavior_client, body, message):
    response = behavior_client.post("/predict", json=body)

    assert response.status_code == 422
    assert message in response.json()["message"]


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("Month", [5, 11, 5]),
        ("Weekend", ["no", "yes", "no"]),
        ("Weekend", [0, 1, 0]),
        ("Region", [1.0, 3.0, 9.0]),
        ("VisitorType", [None, "Other", "Other"]),
        ("BounceRates", [0.2, 1.5, 0.0]),
        ("PageValues", [0.0, -3.0, 1.0]),
    ],
)
def test_wrong_column_type_or_range_is_422_naming_the_column(shoppers_client, column, values):
    rows = shoppers_rows()
    rows[column] = values

    response = shoppers_client.post("/predict", json=rows)

    assert response.status_code == 422
    assert response.json()["message"].startswith(column)


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


def test_api_key_guards_predict_and_health(browsing_ckpt, monkeypatch):
    monkeypatch.setattr(litserve.server, "LIT_SERVER_API_KEY", "opensesame")
    server = build_server(browsing_ckpt)
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        key = {"X-API-Key": "opensesame"}
        deadline = time.monotonic() + 30
        while client.get("/health", headers=key).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        missing = client.post("/predict", json={"browsing_time": [30.0]})
        wrong = client.post("/predict", json={"browsing_time": [30.0]}, headers={"X-API-Key": "x"})
        right = client.post("/predict", json={"browsing_time": [30.0]}, headers=key)
        health_without_key = client.get("/health")
        docs_without_key = client.get("/openapi.json")

    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert right.json()["predictions"] == [1.0]
    assert health_without_key.status_code == 401
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
