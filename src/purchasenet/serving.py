"""Serve a trained checkpoint over HTTP with LitServe.

``POST /predict`` takes one list per feature, all of the same length (one entry per visitor
session), and answers ``predictions``, ``probabilities`` and ``labels`` per session, plus
``warnings`` for values the model was not trained on. The request schema is built from the
checkpoint's features, so a wrong name, type, range or length is answered with a 4xx naming the
field before the request reaches the model. Only plain PyTorch is imported here, not Lightning,
pandas or Hydra.

When ``LIT_SERVER_API_KEY`` is set in the environment at launch, every endpoint except
``/health`` and the API docs answers 401 unless the request carries it as ``X-API-Key``.

Usage::

    python scripts/serve.py ckpt_path=checkpoints/<run>/best.ckpt port=8000
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import difflib
import errno
import functools
import logging
import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from litserve.loops import inference_worker
from litserve.utils import WorkerSetupStatus
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from purchasenet.batching import QUEUE_POLL_S, IsolatingBatchLoop
from purchasenet.features import CATEGORICAL, NUMERIC, FeatureEncoder, FittedFeature
from purchasenet.inference import (
    BUNDLE_KEY,
    CheckpointError,
    PurchaseModel,
    read_checkpoint,
)
from purchasenet.request_guard import (
    RequestGuard,
    error_response,
    http_error_response,
    shortened,
    unexpected_error_response,
)

MAX_ROWS = 10_000
MAX_BODY_BYTES = 16 * 1024 * 1024
# A worker that dies is noticed and replaced within this many seconds.
WORKER_CHECK_S = 0.5
# On SIGTERM or Ctrl-C, requests in flight get this long to finish before the server stops.
SHUTDOWN_GRACE_S = 4
MAX_REPORTED_PROBLEMS = 20
CHECKPOINT_ROOT = Path("checkpoints")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
API_KEY_ENV = "LIT_SERVER_API_KEY"
# What ps and top show for an inference worker (Linux allows 15 characters).
WORKER_PROCESS_NAME = "litserve-worker"


class ServeConfigError(ValueError):
    """A serving setting that cannot work: bad host, busy port, impossible batching values."""


class WorkerStartError(RuntimeError):
    """An inference worker could not load the model, so the server stopped before listening."""


class FeatureColumns(BaseModel):
    """Base of every request schema: one list of values per feature, one entry per session.

    Each field is aliased to its feature name, so any column name works, even one such as
    ``json`` or ``Page Values`` that could not be a pydantic attribute.
    """

    model_config = ConfigDict(extra="forbid", validate_by_alias=True, validate_by_name=False)

    @classmethod
    def feature_names(cls) -> list[str]:
        return [info.alias for info in cls.model_fields.values()]

    @model_validator(mode="before")
    @classmethod
    def _known_feature_names(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            expected = cls.feature_names()
            unknown = [str(key) for key in data if key not in expected]
            if unknown:
                message = _unknown_features_message(unknown, expected)
                raise PydanticCustomError("unknown_feature", "{message}", {"message": message})
        return data

    @model_validator(mode="after")
    def _equal_lengths(self) -> FeatureColumns:
        lengths = {name: len(values) for name, values in self.columns().items()}
        if len(set(lengths.values())) > 1:
            counts = ", ".join(f"{name} has {count}" for name, count in lengths.items())
            message = f"every feature needs the same number of rows: {counts}"
            raise PydanticCustomError("unequal_lengths", "{message}", {"message": message})
        return self

    def columns(self) -> dict[str, list]:
        """The validated values keyed by feature name."""
        return self.model_dump(by_alias=True)

    def __reduce__(self):
        # LitServe pickles the validated request to hand it to an inference worker, where the
        # per-checkpoint subclass cannot be looked up by name, so it travels as a plain dict.
        return (dict, (self.columns(),))


def _unknown_features_message(unknown: Sequence[str], expected: Sequence[str]) -> str:
    parts = []
    for name in unknown[:5]:
        close = difflib.get_close_matches(name, expected, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{shortened(name)!r}{hint}")
    if len(unknown) > 5:
        parts.append(f"and {len(unknown) - 5} more")
    return f"unknown feature {', '.join(parts)}; expected features: {', '.join(expected)}"


class InputWarning(BaseModel):
    """A value the model was not trained on; its rows were still scored.

    ``unseen_category``: a categorical value never seen in training, scored as no known
    category. ``outside_training_range``: numbers beyond the smallest or largest training value,
    where the model extrapolates.
    """

    feature: str
    kind: Literal["unseen_category", "outside_training_range"]
    rows: list[int]
    message: str
    value: bool | int | float | str | None = Field(default=None, exclude_if=lambda v: v is None)
    training_range: list[float] | None = Field(default=None, exclude_if=lambda v: v is None)


class BinaryPrediction(BaseModel):
    """Purchase decision per session: 1.0 where the purchase probability reaches the threshold."""

    predictions: list[float]
    probabilities: list[float] = Field(description="purchase probability per session")
    labels: list[str]
    warnings: list[InputWarning] = Field(default_factory=list, exclude_if=lambda v: not v)


class MulticlassPrediction(BaseModel):
    """Most probable class index per session, with the probability of every class."""

    predictions: list[int]
    probabilities: list[list[float]] = Field(description="class probabilities per session")
    labels: list[str]
    warnings: list[InputWarning] = Field(default_factory=list, exclude_if=lambda v: not v)


def _category_type(categories: Sequence[Any]) -> Any:
    """The strict JSON type of a categorical column, read from its training categories."""
    kinds = list(dict.fromkeys(type(c) for c in categories if type(c) in (bool, int, float, str)))
    kinds = kinds or [str, int, bool]
    item = kinds[0] if len(kinds) == 1 else Union[tuple(kinds)]
    return Annotated[item, Field(strict=True)]


def _typical_value(feature: FittedFeature) -> float:
    """The training mean in raw units, shown as the example value in the API docs."""
    mean = feature.mean
    if feature.spec.transform == "log1p":
        mean = math.expm1(min(mean, 700.0))
    return round(min(max(mean, feature.observed_min), feature.observed_max), 2)


def _feature_field(feature: FittedFeature, max_rows: int) -> tuple[Any, Any]:
    spec = feature.spec
    if spec.kind == CATEGORICAL:
        item = _category_type(feature.categories)
        known = ", ".join(str(c) for c in feature.categories)
        description = f"{spec.description} Categories seen in training: {known}.".strip()
        example = feature.categories[0] if feature.categories else None
    else:
        limits = {"ge": spec.minimum, "le": spec.maximum}
        item = Annotated[float, Field(strict=True, allow_inf_nan=False, **limits)]
        description = spec.description or None
        example = _typical_value(feature)
    column = Field(
        alias=spec.name,
        title=spec.name,
        min_length=1,
        max_length=max_rows,
        description=description,
        examples=[[example]] if example is not None else None,
    )
    return list[item], column


def request_model(
    encoder: FeatureEncoder, name: str = "SessionFeatures", *, max_rows: int = MAX_ROWS
) -> type[FeatureColumns]:
    """Build the request schema of a fitted encoder: one non-empty list per feature."""
    return create_model(
        name,
        __base__=FeatureColumns,
        __module__=__name__,
        __doc__=f"One list per feature ({', '.join(encoder.names)}), one entry per session.",
        **{
            f"feature_{position}": _feature_field(feature, max_rows)
            for position, feature in enumerate(encoder.features)
        },
    )


@dataclass
class EncodedRows:
    """Network inputs of one or more requests, with each request's row count and warnings."""

    inputs: np.ndarray
    row_counts: list[int]
    warnings: list[list[dict[str, Any]]]


@dataclass
class ScoredRows:
    """Probabilities of one or more requests, still concatenated row after row."""

    probabilities: np.ndarray
    row_counts: list[int]
    warnings: list[list[dict[str, Any]]]


def unseen_category_warnings(
    encoder: FeatureEncoder, columns: Mapping[str, Sequence]
) -> list[dict[str, Any]]:
    """One warning per categorical value that the encoder never saw in training."""
    found = []
    for position, feature in enumerate(encoder.features):
        if feature.spec.kind != CATEGORICAL:
            continue
        rows_by_value: dict[Any, list[int]] = {}
        for row, value in enumerate(columns[feature.spec.name]):
            if encoder.category_index(position, value) < 0:
                rows_by_value.setdefault(value, []).append(row)
        for value, rows in rows_by_value.items():
            found.append({
                "feature": feature.spec.name,
                "kind": "unseen_category",
                "value": value,
                "rows": rows,
                "message": (
                    f"{feature.spec.name}: {shortened(repr(value))} was not seen in training, "
                    "so it was scored as no known category"
                ),
            })
    return found


def training_range_warnings(
    encoder: FeatureEncoder, columns: Mapping[str, Sequence]
) -> list[dict[str, Any]]:
    """One warning per numeric feature with values beyond the training minimum or maximum."""
    found = []
    for feature in encoder.features:
        if feature.spec.kind != NUMERIC:
            continue
        values = np.asarray(columns[feature.spec.name], dtype=np.float64)
        low, high = feature.observed_min, feature.observed_max
        rows = np.flatnonzero((values < low) | (values > high)).tolist()
        if rows:
            found.append({
                "feature": feature.spec.name,
                "kind": "outside_training_range",
                "rows": rows,
                "training_range": [low, high],
                "message": (
                    f"{feature.spec.name}: {len(rows)} value(s) outside the training range "
                    f"{low:g} to {high:g}; the model extrapolates there, so treat those "
                    "answers with caution"
                ),
            })
    return found


def _worker_index() -> int:
    # LitServe numbers the inference workers of an endpoint from 0 before calling setup().
    return int(os.environ.get("LITSERVE_WORKER_ID", "0"))


def _process_running(pid: int) -> bool:
    """True while ``pid`` runs; a process that has exited but is not yet reaped counts as down."""
    if pid <= 0:
        return False
    if Path("/proc").is_dir():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class PurchaseAPI(ls.LitAPI):
    """Scores sessions with a checkpoint; ``api_for_model`` gives it the checkpoint's schema."""

    def __init__(
        self, checkpoint_path: str | Path, max_batch_size: int = 1, batch_timeout: float = 0.0
    ) -> None:
        with warnings.catch_warnings():
            # LitAPI warns when batch/unbatch exist but batching is off; both modes are supported.
            warnings.filterwarnings("ignore", message=".*batch and unbatch methods implemented.*")
            super().__init__(
                max_batch_size=max_batch_size,
                batch_timeout=batch_timeout,
                loop=IsolatingBatchLoop(),
            )
        self.checkpoint_path = str(checkpoint_path)
        self.model: PurchaseModel | None = None
        # Process ids of the inference workers, shared between the processes of one server.
        self.worker_pids = None

    def track_workers(self, count: int) -> None:
        """Share one slot per inference worker, so /health can see whether each one runs."""
        self.worker_pids = multiprocessing.get_context("spawn").RawArray("i", int(count))

    def setup(self, device: str) -> None:
        # The networks are small: one thread per worker is faster than contending threads.
        torch.set_num_threads(1)
        self.model = PurchaseModel.from_checkpoint(self.checkpoint_path)
        if self.worker_pids is not None:
            self.worker_pids[_worker_index()] = os.getpid()

    def health(self) -> bool:
        """False while any inference worker is down; LitServe adds whether each is ready."""
        if self.worker_pids is None:
            return True
        return all(_process_running(pid) for pid in self.worker_pids)

    async def authorize(self) -> None:
        """Nothing to check here: RequestGuard checks the API key before the body is read.

        Defining it keeps LitServe from adding its own key check, which would also close
        ``/health`` to probes. A coroutine, so FastAPI runs it on the event loop rather than
        handing every request to a thread pool for a call that does nothing.
        """

    def decode_request(self, request) -> EncodedRows:
        columns = request.columns() if isinstance(request, FeatureColumns) else request
        encoder = self.model.encoder
        row_count = len(columns[encoder.names[0]])
        inputs = self.model.encode(columns)
        found = unseen_category_warnings(encoder, columns)
        found += training_range_warnings(encoder, columns)
        return EncodedRows(inputs=inputs, row_counts=[row_count], warnings=[found])

    def batch(self, inputs: list[EncodedRows]) -> EncodedRows:
        return EncodedRows(
            inputs=np.concatenate([rows.inputs for rows in inputs]),
            row_counts=[count for rows in inputs for count in rows.row_counts],
            warnings=[found for rows in inputs for found in rows.warnings],
        )

    def predict(self, rows: EncodedRows) -> ScoredRows:
        probabilities = self.model.probabilities_from_inputs(rows.inputs)
        finite = np.isfinite(probabilities.reshape(len(probabilities), -1)).all(axis=1)
        if not finite.all():
            # Only a damaged checkpoint does this: inputs are clamped before scoring.
            row = int(np.flatnonzero(~finite)[0])
            raise HTTPException(
                500,
                f"the model produced no finite probability for row {row}; "
                "this checkpoint cannot score that session",
            )
        return ScoredRows(probabilities, rows.row_counts, rows.warnings)

    def unbatch(self, output: ScoredRows) -> list[ScoredRows]:
        bounds = np.cumsum(output.row_counts)[:-1]
        parts = np.split(output.probabilities, bounds)
        return [
            ScoredRows(part, [count], [found])
            for part, count, found in zip(parts, output.row_counts, output.warnings)
        ]

    def encode_response(self, output: ScoredRows) -> dict[str, Any]:
        decisions = self.model.decide(output.probabilities)
        if self.model.task == "binary":
            predictions = [float(d) for d in decisions]
        else:
            predictions = [int(d) for d in decisions]
        response = {
            "predictions": predictions,
            "probabilities": output.probabilities.tolist(),
            "labels": self.model.labels(decisions),
        }
        if output.warnings[0]:
            response["warnings"] = output.warnings[0]
        return response

    def __reduce__(self):
        # A process spawned with the API (LitServe's own way of starting workers) receives it by
        # pickle; the schema subclass made by ``api_for_model`` only matters to the HTTP side.
        return (_new_purchase_api, (), dict(self.__dict__))


def _new_purchase_api() -> PurchaseAPI:
    return PurchaseAPI.__new__(PurchaseAPI)


def _schema_name(model: PurchaseModel) -> str:
    dataset = str(model.metadata.get("dataset") or "")
    words = re.findall(r"[A-Za-z0-9]+", dataset)
    return "".join(w[:1].upper() + w[1:] for w in words) + "SessionFeatures"


def api_for_model(
    model: PurchaseModel,
    checkpoint_path: str | Path,
    *,
    max_batch_size: int = 1,
    batch_timeout: float = 0.0,
    max_rows: int = MAX_ROWS,
) -> PurchaseAPI:
    """A :class:`PurchaseAPI` whose endpoint declares the checkpoint's request and response.

    LitServe reads the request schema from the annotation of ``decode_request`` and the
    response schema from the return annotation of ``encode_response``, so both are set on a
    subclass made for this checkpoint.
    """
    schema = request_model(model.encoder, _schema_name(model), max_rows=max_rows)
    response = BinaryPrediction if model.task == "binary" else MulticlassPrediction

    def decode_request(self, request):
        return PurchaseAPI.decode_request(self, request)

    def encode_response(self, output):
        return PurchaseAPI.encode_response(self, output)

    decode_request.__annotations__ = {"request": schema, "return": EncodedRows}
    encode_response.__annotations__ = {"output": ScoredRows, "return": response}
    namespace = {
        "decode_request": decode_request,
        "encode_response": encode_response,
        "__module__": __name__,
    }
    api_class = types.new_class(
        f"{schema.__name__}API", (PurchaseAPI,), exec_body=lambda ns: ns.update(namespace)
    )
    return api_class(checkpoint_path, max_batch_size=max_batch_size, batch_timeout=batch_timeout)


def model_metadata(model: PurchaseModel) -> dict[str, Any]:
    """What ``/info`` tells about the served model: run, task, features, classes, metrics."""
    features = []
    for feature in model.encoder.features:
        spec = feature.spec
        entry: dict[str, Any] = {"name": spec.name, "kind": spec.kind}
        if spec.description:
            entry["description"] = spec.description
        if spec.kind == CATEGORICAL:
            entry["categories"] = list(feature.categories)
        else:
            entry.update(
                minimum=spec.minimum,
                maximum=spec.maximum,
                transform=spec.transform,
                observed_min=feature.observed_min,
                observed_max=feature.observed_max,
            )
        features.append(entry)
    metadata = model.metadata
    return {
        "name": metadata.get("run_name"),
        "run_name": metadata.get("run_name"),
        "dataset": metadata.get("dataset"),
        "target": metadata.get("target"),
        "task": model.task,
        "features": features,
        "class_names": list(model.class_names),
        "threshold": model.threshold if model.task == "binary" else None,
        "test_metrics": {k: float(v) for k, v in metadata.get("test_metrics", {}).items()},
        "net": metadata.get("net"),
        "run_finished": metadata.get("finished", True),
    }


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def validation_error_handler(feature_names: Sequence[str]):
    """The 422 answer for a body that is valid JSON but does not fit the model's schema.

    The message names the feature and row of each problem (the first few of them); offending
    values are not echoed back, except short scalars, since a body can hold thousands of rows.
    """
    expected = ", ".join(feature_names)

    async def validation_error_response(request: Request, error: RequestValidationError):
        problems = error.errors()
        details = []
        for item in problems[:MAX_REPORTED_PROBLEMS]:
            location = [part for part in item.get("loc", ()) if part != "body"]
            if not location and item.get("type") in ("model_attributes_type", "dict_type"):
                message = (
                    f"request body must be a JSON object with one list per feature "
                    f"({expected}), not {_json_type(item.get('input'))}"
                )
                return error_response(422, message, "body_type")
            where = "request body: "
            if location:
                where = f"{location[0]}" + (f" row {location[1]}" if len(location) > 1 else "")
                where += ": "
            details.append({
                "type": item.get("type"),
                "loc": list(item.get("loc", ())),
                "msg": f"{where}{item.get('msg')}{_shown_input(item.get('input'))}",
            })
        message = "; ".join(detail["msg"] for detail in details[:3])
        if len(problems) > 3:
            message += f" (and {len(problems) - 3} more problems)"
        return error_response(422, message, "validation", details)

    return validation_error_response


def _shown_input(value: Any) -> str:
    if isinstance(value, (bool, int, float, str)) and len(repr(value)) <= 40:
        return f" (got {value!r})"
    return ""


def check_serving_options(
    workers: int,
    max_batch_size: int,
    batch_timeout: float,
    timeout: float,
    max_rows: int,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Reject settings that LitServe would refuse later or that cannot serve a request."""
    if int(workers) < 1:
        raise ServeConfigError(f"workers must be at least 1, got {workers}")
    if int(max_batch_size) < 1:
        raise ServeConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if int(max_rows) < 1:
        raise ServeConfigError(f"max_rows must be at least 1, got {max_rows}")
    if int(max_body_bytes) < 1024:
        raise ServeConfigError(f"max_body_bytes must be at least 1024, got {max_body_bytes}")
    unlimited = timeout is False or timeout == -1
    if not unlimited and float(timeout) <= 0:
        raise ServeConfigError(f"timeout must be positive seconds (or -1 for none), got {timeout}")
    if float(batch_timeout) < 0 or (not unlimited and float(batch_timeout) >= float(timeout)):
        raise ServeConfigError(
            f"batch_timeout must be at least 0 and below timeout ({timeout}), got {batch_timeout}"
        )


def _name_process(name: str) -> None:
    """Set the process name that ps and /proc/<pid>/comm show, where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 is PR_SET_NAME


def _run_forked_worker(*args: Any) -> None:
    """Run an inference worker in a forked process with what a freshly started one would have."""
    # The main process's handler ignores SIGTERM in other processes; a worker must end on it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Hydra's serve config silenced every logger of the main process; a worker logs warnings.
    logging.root.setLevel(logging.WARNING)
    for logger in logging.root.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.disabled = False
    _name_process(WORKER_PROCESS_NAME)
    inference_worker(*args)


class PurchaseServer(ls.LitServer):
    """A LitServer that replaces a dead inference worker and stops within seconds.

    LitServe's monitor thread notices a dead worker within ``WORKER_CHECK_S`` seconds, answers
    the requests it held with 500 and starts a new one; ``/health`` is 503 meanwhile. While the
    server stops, workers end on purpose and are not replaced.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, restart_workers=True, **kwargs)
        self.monitor_internal = WORKER_CHECK_S
        self.uvicorn_graceful_timeout = SHUTDOWN_GRACE_S
        self.stopping = False

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> list:
        count = len(self._inference_workers_config_for_api(lit_api.api_path))
        return [self._fork_worker(lit_api, index) for index in range(count)]

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int):
        """Replace a worker that died."""
        if self.stopping:
            return self.inference_workers[worker_id]
        # A worker killed while waiting on the request queue leaves the manager process waiting
        # for it up to QUEUE_POLL_S seconds more, and a request arriving then would be lost; a
        # replacement that is ready before that would see /health turn 200 while it happens.
        time.sleep(QUEUE_POLL_S)
        if self.stopping:
            return self.inference_workers[worker_id]
        return self._fork_worker(lit_api, worker_id)

    def _fork_worker(self, lit_api: ls.LitAPI, worker_id: int):
        """Fork a worker from this process, which has already imported torch and read the model.

        LitServe spawns workers, and each spawned one imports torch anew (about 1.5 s and
        200 MB here); a forked one shares those pages with this process. The worker scores on
        one torch thread (see ``setup``), so it never uses a thread pool inherited by the fork.
        """
        endpoint = lit_api.api_path.split("/")[-1]
        self.workers_setup_status[f"{endpoint}_{worker_id}"] = WorkerSetupStatus.STARTING
        process = multiprocessing.get_context("fork").Process(
            target=_run_forked_worker,
            args=(
                lit_api,
                "cpu",
                worker_id,
                self._get_request_queue(lit_api.api_path),
                self._transport,
                self.workers_setup_status,
                self._callback_runner,
                self.restart_workers,
            ),
            name="inference-worker",
        )
        process.start()
        return process

    def verify_worker_status(self) -> None:
        """Wait for a ready worker; stop every process if one fails or dies first."""
        statuses = self.workers_setup_status
        while not any(status == WorkerSetupStatus.READY for status in statuses.values()):
            failed = any(status == WorkerSetupStatus.ERROR for status in statuses.values())
            if failed or not all(worker.is_alive() for worker in self.inference_workers):
                self._stop_workers_and_manager()
                raise WorkerStartError(
                    "the inference worker could not load the model; its error is logged above"
                )
            time.sleep(0.05)

    def _stop_workers_and_manager(self) -> None:
        for worker in self.inference_workers:
            worker.terminate()
            worker.join(timeout=5)
        self.transport_config.manager.shutdown()

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        self.stopping = True
        self._stop_monitor()
        super()._perform_graceful_shutdown(*args, **kwargs)

    def _stop_monitor(self) -> None:
        # The monitor thread polls the shutdown event through the manager process, which the
        # shutdown ends; it must see the event and finish before that happens. The event is set
        # from a thread of its own: this thread's connection to the manager may still be inside
        # the wait() that the signal interrupted, and the manager answers it in order.
        setter = threading.Thread(target=self._set_shutdown_event, daemon=True)
        setter.start()
        setter.join(timeout=2)
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring":
                thread.join(timeout=2 * WORKER_CHECK_S + 1)

    def _set_shutdown_event(self) -> None:
        with contextlib.suppress(Exception):
            self._shutdown_event.set()


def build_server(
    ckpt_path: str | Path,
    *,
    workers: int = 1,
    max_batch_size: int = 1,
    batch_timeout: float = 0.0,
    timeout: float = 30,
    max_rows: int = MAX_ROWS,
    max_body_bytes: int = MAX_BODY_BYTES,
    api_key: str | None = None,
) -> PurchaseServer:
    """A server for one checkpoint, on CPU, with ``workers`` inference processes.

    The checkpoint is read here, in the calling process, so a missing or foreign file fails
    with :class:`CheckpointError` before any worker starts. ``api_key``, when given, guards
    every endpoint except ``/health`` and the API docs.
    """
    check_serving_options(
        workers, max_batch_size, batch_timeout, timeout, max_rows, max_body_bytes
    )
    model = PurchaseModel.from_checkpoint(ckpt_path)
    api = api_for_model(
        model,
        ckpt_path,
        max_batch_size=int(max_batch_size),
        batch_timeout=float(batch_timeout),
        max_rows=int(max_rows),
    )
    api.track_workers(int(workers))
    server = PurchaseServer(
        api,
        accelerator="cpu",
        workers_per_device=int(workers),
        timeout=timeout,
        model_metadata=model_metadata(model),
        max_payload_size=int(max_body_bytes),
    )
    server.app.add_middleware(
        RequestGuard,
        api_key=api_key,
        body_paths=[api.api_path],
        max_body_bytes=int(max_body_bytes),
    )
    server.app.add_exception_handler(
        RequestValidationError, validation_error_handler(model.encoder.names)
    )
    server.app.add_exception_handler(StarletteHTTPException, http_error_response)
    server.app.add_exception_handler(Exception, unexpected_error_response)
    return server


def find_latest_checkpoint(root: str | Path = CHECKPOINT_ROOT) -> Path:
    """The most recently written ``best.ckpt`` under ``root`` of a run that finished.

    A run stopped before calibration and test leaves an uncalibrated ``best.ckpt``; newer ones
    of those are passed over (with a note), unless no run finished at all.
    """
    root = Path(root)
    candidates = sorted(root.glob("**/best.ckpt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"no best.ckpt found under {root}/; train one first with make train, "
            "or pass ckpt_path=path/to/best.ckpt"
        )
    unfinished = []
    for path in reversed(candidates):
        try:
            finished = read_checkpoint(path)[BUNDLE_KEY].get("finished", True)
        except CheckpointError:
            finished = False
        if finished:
            break
        unfinished.append(path)
    else:
        return candidates[-1]
    if unfinished:
        print(
            f"note: passing over {len(unfinished)} newer best.ckpt of runs that did not finish "
            f"(newest: {unfinished[0]}); serving {path}",
            file=sys.stderr,
        )
    return path


def resolve_checkpoint(ckpt_path: str | Path | None) -> Path:
    """The checkpoint file to serve for ``ckpt_path``.

    A folder stands for the newest ``best.ckpt`` in it, and None for the newest under
    ``checkpoints/`` in the working directory.
    """
    if ckpt_path is None or str(ckpt_path).strip() == "":
        return find_latest_checkpoint()
    path = Path(ckpt_path)
    if path.is_dir():
        return find_latest_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def check_host(host: str) -> str:
    """The address LitServe should bind; LitServe accepts only the three listed addresses."""
    host = "127.0.0.1" if host == "localhost" else str(host)
    if host not in HOSTS:
        allowed = ", ".join(HOSTS)
        raise ServeConfigError(f"host must be one of {allowed} (or localhost), got {host!r}")
    return host


def ensure_port_free(host: str, port: int) -> None:
    """Fail with a readable message when ``host:port`` cannot be listened on."""
    if not 1024 <= int(port) <= 65535:
        raise ServeConfigError(f"port must be between 1024 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Same option as the server's own socket, so a port in TIME_WAIT still counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeConfigError(
                    f"port {port} on {host} is already in use; stop the process listening there "
                    "or choose another with port=<number>"
                ) from None
            raise ServeConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def _stop_on_signal(main_pid: int, signum: int, frame: Any) -> None:
    # LitServe stops its processes cleanly on KeyboardInterrupt in the main process; SIGTERM
    # (docker stop, kill) would otherwise end only the main process. Processes forked from the
    # main one inherit this handler: the manager must outlive the workers it serves, and the
    # HTTP processes run uvicorn's own handlers, so both leave stopping to the main process.
    if os.getpid() != main_pid:
        return
    # A second Ctrl-C must not interrupt the shutdown and leave worker processes behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _number_setting(cfg: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = cfg.get(key, default)
    if isinstance(value, bool) or value is None:
        raise ServeConfigError(f"{key} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ServeConfigError(f"{key} must be a number, got {value!r}") from None
    if kind is int and number != float(value):
        raise ServeConfigError(f"{key} must be a whole number, got {value!r}")
    return number


def run_server(cfg: Mapping[str, Any]) -> None:
    """Validate the serve config and checkpoint, then serve until SIGTERM or Ctrl-C.

    Every problem a user can cause ends in one message and exit status 1, before the server
    listens; no worker process is left behind.
    """
    try:
        log_level = str(cfg.get("log_level", "info")).lower()
        if log_level not in LOG_LEVELS:
            raise ServeConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        host = check_host(cfg.get("host", "127.0.0.1"))
        port = _number_setting(cfg, "port", int, 8000)
        checkpoint = resolve_checkpoint(cfg.get("ckpt_path"))
        ensure_port_free(host, port)
        api_key = os.environ.get(API_KEY_ENV) or None
        server = build_server(
            checkpoint,
            workers=_number_setting(cfg, "workers", int, 1),
            max_batch_size=_number_setting(cfg, "max_batch_size", int, 1),
            batch_timeout=_number_setting(cfg, "batch_timeout", float, 0.0),
            timeout=_number_setting(cfg, "timeout", float, 30.0),
            max_rows=_number_setting(cfg, "max_rows", int, MAX_ROWS),
            max_body_bytes=_number_setting(cfg, "max_body_bytes", int, MAX_BODY_BYTES),
            api_key=api_key,
        )
    except (CheckpointError, ServeConfigError) as error:
        raise SystemExit(f"error: {error}") from None

    info = server.model_metadata
    if not info["run_finished"]:
        print(
            f"warning: {checkpoint} comes from a run that stopped before calibration and "
            "test: its probabilities are not calibrated and /info has no test metrics",
            file=sys.stderr,
        )
    features = ", ".join(feature["name"] for feature in info["features"])
    print(f"Serving {info['name']} ({info['task']}; features: {features}) from {checkpoint}")
    print(f"POST http://{host}:{port}/predict  (schema at /docs, model at /info)")
    if api_key:
        print(f"{API_KEY_ENV} is set: send it as X-API-Key to every endpoint but /health, /docs")
    sys.stdout.flush()
    stop = functools.partial(_stop_on_signal, os.getpid())
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run(host=host, port=int(port), log_level=log_level, generate_client_file=False)
    except WorkerStartError as error:
        raise SystemExit(f"error: {error}") from None
