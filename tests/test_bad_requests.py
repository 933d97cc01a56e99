"""Bad requests sent to real server processes of a binary, a multiclass and a shoppers model.

Each is answered with its exact 4xx status and a ``{message, detail}`` body whose message names
what is wrong; afterwards every server still answers correctly from the same worker processes.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from checkpoint_factory import (
    behavior_checkpoint,
    browsing_checkpoint,
    browsing_purchase_probability,
    shoppers_checkpoint,
    shoppers_rows,
)
from processes import free_port, inference_workers, serve, wait_for_health
from purchasenet.inference import PurchaseModel

JSON = {"Content-Type": "application/json"}
BODY_LIMIT = 65_536
ROW_LIMIT = 100
SERVER_SETTINGS = {
    "binary": [f"max_rows={ROW_LIMIT}", f"max_body_bytes={BODY_LIMIT}"],
    "multiclass": [],
    "shoppers": ["max_batch_size=4", "batch_timeout=0.01"],
}


@dataclass(frozen=True)
class BadRequest:
    """A request, the status it must get and a phrase its message must contain."""

    model: str
    content: Any
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/predict"

    def body(self) -> Any:
        """Bytes as they are, a generator function's chunks, anything else as JSON."""
        if isinstance(self.content, bytes):
            return self.content
        if callable(self.content):
            return self.content()
        return json.dumps(self.content).encode()


def shoppers_with(**changes: list) -> dict[str, list]:
    rows = shoppers_rows()
    rows.update(changes)
    return rows


def shoppers_without(column: str) -> dict[str, list]:
    rows = shoppers_rows()
    del rows[column]
    return rows


def oversized_chunks():
    chunk = b"[" + b"12.5, " * 2000 + b"1.0],"
    yield b'{"browsing_time": '
    for _ in range(BODY_LIMIT // len(chunk) + 2):
        yield chunk
    yield b"[1.0]}"


CASES = {
    # The body is not one UTF-8 JSON text: 400.
    "invalid JSON": BadRequest(
        "binary", b'{"browsing_time": [5.0', 400,
        "request body is not valid JSON: Expecting ',' delimiter (line 1, column 23)",
    ),
    "trailing data": BadRequest(
        "binary", b'{"browsing_time": [5.0]} x', 400, "not valid JSON: Extra data"
    ),
    "single quotes": BadRequest(
        "binary", b"{'browsing_time': [5.0]}", 400,
        "not valid JSON: Expecting property name enclosed in double quotes",
    ),
    "invalid UTF-8 in a key": BadRequest(
        "binary", b'{"browsing_time": [5.0], "\xff": [1]}', 400,
        "not valid UTF-8: byte 0xff at position 26",
    ),
    "invalid UTF-8 in a value": BadRequest(
        "binary", b'{"browsing_time": ["\xc3\x28"]}', 400, "not valid UTF-8: byte 0xc3"
    ),
    "UTF-16 body": BadRequest(
        "binary", '{"browsing_time": [5.0]}'.encode("utf-16"), 400, "not valid UTF-8"
    ),
    "empty body": BadRequest("binary", b"", 400, "request body is empty"),
    "whitespace body": BadRequest("binary", b" \n\t ", 400, "request body is empty"),
    "absurdly nested arrays": BadRequest(
        "binary", b'{"browsing_time": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400,
        "request body is nested too deeply",
    ),
    "absurdly nested objects": BadRequest(
        "binary", b'{"a": ' * 5_000 + b"1" + b"}" * 5_000, 400,
        "request body is nested too deeply",
    ),
    "duplicate keys": BadRequest(
        "binary", b'{"browsing_time": [5.0], "browsing_time": [60.0]}', 400,
        "key 'browsing_time' appears more than once",
    ),
    "number of 5000 digits": BadRequest(
        "binary", b'{"browsing_time": [' + b"9" * 5000 + b"]}", 400,
        "a number with thousands of digits",
    ),
    # Not declared as JSON: 415.
    "no Content-Type": BadRequest(
        "binary", {"browsing_time": [5.0]}, 415, "request has no Content-Type", headers={}
    ),
    "text/plain": BadRequest(
        "binary", {"browsing_time": [5.0]}, 415, "Content-Type 'text/plain' is not JSON",
        headers={"Content-Type": "text/plain"},
    ),
    "form data": BadRequest(
        "binary", b"browsing_time=5", 415,
        "Content-Type 'application/x-www-form-urlencoded' is not JSON",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    "multipart": BadRequest(
        "binary", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n5\r\n--x--\r\n', 415,
        "Content-Type 'multipart/form-data' is not JSON",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    ),
    # Too large: 413, whether the size is declared or only found while reading.
    "body over the byte limit": BadRequest(
        "binary", {"browsing_time": [12.5] * 20_000}, 413,
        f"request body is larger than {BODY_LIMIT:,} bytes",
    ),
    "chunked body over the byte limit": BadRequest(
        "binary", oversized_chunks, 413, f"request body is larger than {BODY_LIMIT:,} bytes"
    ),
    # Valid JSON that does not fit the schema: 422 naming the feature and row.
    "null": BadRequest(
        "binary", None, 422,
        "request body must be a JSON object with one list per feature (browsing_time), not null",
    ),
    "top-level array": BadRequest("binary", [5.0, 15.0], 422, "not an array"),
    "top-level string": BadRequest("binary", "browsing_time", 422, "not a string"),
    "top-level number": BadRequest("binary", 42, 422, "not a number"),
    "top-level boolean": BadRequest("binary", True, 422, "not a boolean"),
    "nested list": BadRequest(
        "binary", {"browsing_time": [[5.0]]}, 422,
        "browsing_time row 0: Input should be a valid number",
    ),
    "too many rows": BadRequest(
        "binary", {"browsing_time": [5.0] * (ROW_LIMIT + 1)}, 422,
        f"browsing_time: List should have at most {ROW_LIMIT} items",
    ),
    "misspelt feature": BadRequest(
        "binary", {"browsing_tme": [5.0]}, 422,
        "unknown feature 'browsing_tme' (did you mean 'browsing_time'?); "
        "expected features: browsing_time",
    ),
    "extra feature": BadRequest(
        "binary", {"browsing_time": [5.0], "engagement": [0.5]}, 422,
        "unknown feature 'engagement'",
    ),
    "missing feature": BadRequest("binary", {}, 422, "browsing_time: Field required"),
    "empty list": BadRequest(
        "binary", {"browsing_time": []}, 422, "browsing_time: List should have at least 1 item"
    ),
    "scalar instead of a list": BadRequest(
        "binary", {"browsing_time": 5.0}, 422,
        "browsing_time: Input should be a valid list (got 5.0)",
    ),
    "object instead of a list": BadRequest(
        "binary", {"browsing_time": {"row": 5.0}}, 422,
        "browsing_time: Input should be a valid list",
    ),
    "number as a string": BadRequest(
        "binary", {"browsing_time": ["5"]}, 422,
        "browsing_time row 0: Input should be a valid number (got '5')",
    ),
    "boolean as a number": BadRequest(
        "binary", {"browsing_time": [True]}, 422,
        "browsing_time row 0: Input should be a valid number (got True)",
    ),
    "null value": BadRequest(
        "binary", {"browsing_time": [None]}, 422,
        "browsing_time row 0: Input should be a valid number",
    ),
    "negative minutes": BadRequest(
        "binary", {"browsing_time": [5.0, -1.0]}, 422,
        "browsing_time row 1: Input should be greater than or equal to 0 (got -1.0)",
    ),
    "NaN": BadRequest(
        "binary", b'{"browsing_time": [5.0, NaN]}', 422,
        "browsing_time row 1: Input should be a finite number",
    ),
    "Infinity": BadRequest(
        "binary", b'{"browsing_time": [Infinity]}', 422,
        "browsing_time row 0: Input should be a finite number",
    ),
    "-Infinity": BadRequest(
        "binary", b'{"browsing_time": [-Infinity]}', 422,
        "browsing_time row 0: Input should be a finite number",
    ),
    "number that overflows to infinity": BadRequest(
        "binary", b'{"browsing_time": [1e400]}', 422,
        "browsing_time row 0: Input should be a finite number",
    ),
    "GET on /predict": BadRequest(
        "binary", b"", 405, "GET is not allowed on /predict", method="GET"
    ),
    "unknown path": BadRequest(
        "binary", {"browsing_time": [5.0]}, 404, "no endpoint at /score", path="/score"
    ),
    "unequal lengths": BadRequest(
        "multiclass", {"browsing_time": [2.0, 20.0], "engagement": [0.5]}, 422,
        "every feature needs the same number of rows: browsing_time has 2, engagement has 1",
    ),
    "rate above 1": BadRequest(
        "multiclass", {"browsing_time": [2.0], "engagement": [1.5]}, 422,
        "engagement row 0: Input should be less than or equal to 1 (got 1.5)",
    ),
    "wrong capitalisation": BadRequest(
        "multiclass", {"browsing_time": [2.0], "Engagement": [0.5]}, 422,
        "'Engagement' (did you mean 'engagement'?)",
    ),
    "one feature missing": BadRequest(
        "multiclass", {"browsing_time": [2.0]}, 422, "engagement: Field required"
    ),
    "strings for a rate": BadRequest(
        "multiclass", {"browsing_time": [2.0], "engagement": ["high"]}, 422,
        "engagement row 0: Input should be a valid number (got 'high')",
    ),
    "multiclass null": BadRequest(
        "multiclass", None, 422, "(browsing_time, engagement), not null"
    ),
    "numbers for month names": BadRequest(
        "shoppers", shoppers_with(Month=[5, 11, 5]), 422,
        "Month row 0: Input should be a valid string (got 5)",
    ),
    "words for a boolean": BadRequest(
        "shoppers", shoppers_with(Weekend=["no", "yes", "no"]), 422,
        "Weekend row 0: Input should be a valid boolean (got 'no')",
    ),
    "numbers for a boolean": BadRequest(
        "shoppers", shoppers_with(Weekend=[0, 1, 0]), 422,
        "Weekend row 0: Input should be a valid boolean (got 0)",
    ),
    "float for an integer code": BadRequest(
        "shoppers", shoppers_with(Region=[1.0, 3.0, 9.0]), 422,
        "Region row 0: Input should be a valid integer (got 1.0)",
    ),
    "null category": BadRequest(
        "shoppers", shoppers_with(VisitorType=[None, "Other", "Other"]), 422,
        "VisitorType row 0: Input should be a valid string",
    ),
    "bounce rate above 1": BadRequest(
        "shoppers", shoppers_with(BounceRates=[0.2, 1.5, 0.0]), 422,
        "BounceRates row 1: Input should be less than or equal to 1 (got 1.5)",
    ),
    "negative page value": BadRequest(
        "shoppers", shoppers_with(PageValues=[0.0, -3.0, 1.0]), 422,
        "PageValues row 1: Input should be greater than or equal to 0 (got -3.0)",
    ),
    "one of 17 columns missing": BadRequest(
        "shoppers", shoppers_without("TrafficType"), 422, "TrafficType: Field required"
    ),
    "a thousand unknown columns": BadRequest(
        "shoppers", {**shoppers_rows(), **{f"column_{i}": [1, 2, 3] for i in range(1000)}},
        422, "unknown feature 'column_0', 'column_1', 'column_2', 'column_3', 'column_4', "
        "and 995 more",
    ),
}

CHECKPOINTS = {
    "binary": browsing_checkpoint,
    "multiclass": behavior_checkpoint,
    "shoppers": shoppers_checkpoint,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One real server per model, started together; yields name -> (url, process, workers)."""
    workdir = tmp_path_factory.mktemp("bad-requests")
    running = {}
    with ExitStack() as stack:
        for name, make in CHECKPOINTS.items():
            ckpt = make(workdir / name / "best.ckpt")
            port = free_port()
            (workdir / name).mkdir(exist_ok=True)
            process = stack.enter_context(
                serve(workdir / name, f"ckpt_path={ckpt}", f"port={port}", *SERVER_SETTINGS[name])
            )
            running[name] = (f"http://127.0.0.1:{port}", process, ckpt)
        started = {}
        for name, (url, process, ckpt) in running.items():
            wait_for_health(process, url)
            started[name] = (url, process, ckpt, inference_workers(process))
        yield started


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_request_gets_its_status_and_a_message_naming_the_problem(servers, case):
    url = servers[case.model][0]

    response = httpx.request(
        case.method, url + case.path, content=case.body(), headers=case.headers, timeout=30
    )

    assert response.status_code == case.status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"message", "detail"}
    assert case.message in body["message"]
    assert body["detail"] and all("msg" in item for item in body["detail"])
    assert "Traceback" not in response.text


@pytest.mark.slow
def test_servers_answer_correctly_after_the_bad_requests_from_the_same_workers(servers):
    binary_url, binary_process, _, _ = servers["binary"]
    multiclass_url, _, _, _ = servers["multiclass"]
    shoppers_url, _, shoppers_ckpt, _ = servers["shoppers"]
    minutes = [5.0, 15.0, 30.0, 60.0]

    binary = httpx.post(binary_url + "/predict", json={"browsing_time": minutes})
    multiclass = httpx.post(
        multiclass_url + "/predict",
        json={"browsing_time": [2.0, 20.0, 20.0, 2.0], "engagement": [0.1, 0.1, 0.9, 0.9]},
    )
    shoppers = httpx.post(shoppers_url + "/predict", json=shoppers_rows())

    expected = [browsing_purchase_probability(m) for m in minutes]
    assert binary.json()["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert binary.json()["predictions"] == [0.0, 0.0, 1.0, 1.0]
    assert multiclass.json()["predictions"] == [0, 1, 2, 3]
    shoppers_expected = PurchaseModel.from_checkpoint(shoppers_ckpt).predict_proba(shoppers_rows())
    assert shoppers.json()["probabilities"] == pytest.approx(shoppers_expected.tolist(), abs=1e-6)
    for url, process, _, workers in servers.values():
        assert process.poll() is None
        assert inference_workers(process) == workers
        assert httpx.get(url + "/health").status_code == 200
    assert "Traceback" not in binary_process.log_path.read_text()
