"""Serve a trained checkpoint over HTTP with LitServe.

``POST /predict`` takes one list per feature, all of the same length (one entry per visitor
session), and answers ``predictions``, ``probabilities`` and ``labels`` per session. The request
schema is built from the checkpoint's features, so a wrong name, type, range or length is
answered with a 4xx naming the field before the request reaches the model. Only plain PyTorch
is imported here, not Lightning, pandas or Hydra.

When ``LIT_SERVER_API_KEY`` is set in the environment (LitServe reads it once, at import),
``/predict``, ``/info``, ``/health`` and ``/`` answer 401 unless the request carries it as
``X-API-Key``; ``/docs`` and ``/openapi.json`` stay open.

Usage::

    python scripts/serve.py ckpt_path=checkpoints/<run>/best.ckpt port=8000
"""

from __future__ import annotations

import difflib
import errno
import functools
import math
import os
import re
import signal
import socket
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import litserve as ls
import litserve.server
import numpy as np
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from purchasenet.features import CATEGORICAL, FeatureEncoder, FittedFeature
from purchasenet.inference import CheckpointError, PurchaseModel

MAX_ROWS = 10_000
MAX_STANDARD_DEVIATIONS = 1e6
CHECKPOINT_ROOT = Path("checkpoints")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServeConfigError(ValueError):
    """A serving setting that cannot work: bad host, busy port, impossible batching values."""


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
    for name in unknown:
        close = difflib.get_close_matches(name, expected, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    return f"unknown feature {', '.join(parts)}; expected features: {', '.join(expected)}"


class CategoryWarning(BaseModel):
    """A categorical value never seen in training; those rows were scored as no known category."""

    feature: str
    value: Union[bool, int, float, str]
    rows: list[int]
    message: str


class BinaryPrediction(BaseModel):
    """Purchase decision per session: 1.0 where the purchase probability reaches the threshold."""

    predictions: list[float]
    probabilities: list[float] = Field(description="purchase probability per session")
    labels: list[str]
    warnings: list[CategoryWarning] = Field(default_factory=list, exclude_if=lambda v: not v)


class MulticlassPrediction(BaseModel):
    """Most probable class index per session, with the probability of every class."""

    predictions: list[int]
    probabilities: list[list[float]] = Field(description="class probabilities per session")
    labels: list[str]
    warnings: list[CategoryWarning] = Field(default_factory=list, exclude_if=lambda v: not v)


def _category_type(categories: Sequence[Any]) -> Any:
    """The strict JSON type of a categorical column, read from its training categories."""
    kinds = list(dict.fromkeys(type(c) for c in categories if type(c) in (bool, int, float, str)))
    kinds = kinds or [str, int, bool]
    item = kinds[0] if len(kinds) == 1 else Union[tuple(kinds)]
    return Annotated[item, Field(strict=True)]


def _scoring_range_check(feature: FittedFeature, scale: bool) -> Callable[[float], float]:
    """Reject values so far from training that the network's float32 arithmetic could overflow.

    Such a value would come back as a NaN probability, which JSON cannot carry. The limit is
    ``MAX_STANDARD_DEVIATIONS`` training standard deviations from the training mean.
    """
    mean, std = (feature.mean, feature.std) if scale else (0.0, 1.0)
    low, high = mean - MAX_STANDARD_DEVIATIONS * std, mean + MAX_STANDARD_DEVIATIONS * std
    if feature.spec.transform == "log1p":
        # log1p of values clipped at 0 is never negative, and it outgrows no float64 bound.
        low = math.expm1(low) if low > 0 else -math.inf
        high = math.expm1(high) if high < 700 else math.inf

    def check(value: float) -> float:
        if not low <= value <= high:
            raise PydanticCustomError(
                "outside_scoring_range",
                "{value} is too far outside the training values ({low} to {high}) to score",
                {"value": value, "low": feature.observed_min, "high": feature.observed_max},
            )
        return value

    return check


def _typical_value(feature: FittedFeature) -> float:
    """The training mean in raw units, shown as the example value in the API docs."""
    mean = feature.mean
    if feature.spec.transform == "log1p":
        mean = math.expm1(min(mean, 700.0))
    return round(min(max(mean, feature.observed_min), feature.observed_max), 2)


def _feature_field(feature: FittedFeature, scale: bool, max_rows: int) -> tuple[Any, Any]:
    spec = feature.spec
    if spec.kind == CATEGORICAL:
        item = _category_type(feature.categories)
        known = ", ".join(str(c) for c in feature.categories)
        description = f"{spec.description} Categories seen in training: {known}.".strip()
        example = feature.categories[0] if feature.categories else None
    else:
        limits = {"ge": spec.minimum, "le": spec.maximum}
        item = Annotated[
            float,
            Field(strict=True, allow_inf_nan=False, **limits),
            AfterValidator(_scoring_range_check(feature, scale)),
        ]
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
            f"feature_{position}": _feature_field(feature, encoder.scale, max_rows)
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
                "value": value,
                "rows": rows,
                "message": (
                    f"{feature.spec.name}: {value!r} was not seen in training, so it was scored "
                    "as no known category"
                ),
            })
    return found


class PurchaseAPI(ls.LitAPI):
    """Scores sessions with a checkpoint; ``api_for_model`` gives it the checkpoint's schema."""

    def __init__(
        self, checkpoint_path: str | Path, max_batch_size: int = 1, batch_timeout: float = 0.0
    ) -> None:
        with warnings.catch_warnings():
            # LitAPI warns when batch/unbatch exist but batching is off; both modes are supported.
            warnings.filterwarnings("ignore", message=".*batch and unbatch methods implemented.*")
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.checkpoint_path = str(checkpoint_path)
        self.model: PurchaseModel | None = None

    def setup(self, device: str) -> None:
        # The networks are small: one thread per worker is faster than contending threads.
        torch.set_num_threads(1)
        self.model = PurchaseModel.from_checkpoint(self.checkpoint_path)

    def decode_request(self, request) -> EncodedRows:
        columns = request.columns() if isinstance(request, FeatureColumns) else request
        encoder = self.model.encoder
        row_count = len(columns[encoder.names[0]])
        return EncodedRows(
            inputs=encoder.transform(columns),
            row_counts=[row_count],
            warnings=[unseen_category_warnings(encoder, columns)],
        )

    def batch(self, inputs: list[EncodedRows]) -> EncodedRows:
        return EncodedRows(
            inputs=np.concatenate([rows.inputs for rows in inputs]),
            row_counts=[count for rows in inputs for count in rows.row_counts],
            warnings=[found for rows in inputs for found in rows.warnings],
        )

    def predict(self, rows: EncodedRows) -> ScoredRows:
        probabilities = self.model.probabilities_from_inputs(rows.inputs)
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
        # Inference workers are spawned processes that receive the API by pickle; the schema
        # subclass made by ``api_for_model`` only matters to the HTTP side, so they get the base.
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
    }


async def validation_error_response(request: Request, error: RequestValidationError):
    """Answer a rejected request with the failing fields and one readable message.

    Malformed JSON gets 400, a body that is not JSON 415, and everything else 422. The
    offending values are not echoed back, since a body can hold thousands of rows.
    """
    details = []
    for item in error.errors():
        location = [part for part in item.get("loc", ()) if part != "body"]
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "invalid JSON")
            where = f" (at character {location[0]})" if location else ""
            message = f"request body is not valid JSON: {reason}{where}"
            return _error_response(400, message, [{"type": "json_invalid", "msg": message}])
        if not location and item.get("type") == "model_attributes_type" and not _is_json(request):
            message = "send the features as a JSON object with Content-Type: application/json"
            return _error_response(415, message, [{"type": "content_type", "msg": message}])
        where = "request body: "
        if location:
            where = f"{location[0]}" + (f" row {location[1]}" if len(location) > 1 else "") + ": "
        details.append({
            "type": item.get("type"),
            "loc": list(item.get("loc", ())),
            "msg": f"{where}{item.get('msg')}{_shown_input(item.get('input'))}",
        })
    message = "; ".join(detail["msg"] for detail in details)
    return _error_response(422, message, details)


def _shown_input(value: Any) -> str:
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 40):
        return f" (got {value!r})"
    return ""


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def _error_response(status: int, message: str, details: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=status, content={"message": message, "detail": details})


def check_serving_options(
    workers: int, max_batch_size: int, batch_timeout: float, timeout: float, max_rows: int
) -> None:
    """Reject settings that LitServe would refuse later or that cannot serve a request."""
    if int(workers) < 1:
        raise ServeConfigError(f"workers must be at least 1, got {workers}")
    if int(max_batch_size) < 1:
        raise ServeConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if int(max_rows) < 1:
        raise ServeConfigError(f"max_rows must be at least 1, got {max_rows}")
    unlimited = timeout is False or timeout == -1
    if not unlimited and float(timeout) <= 0:
        raise ServeConfigError(f"timeout must be positive seconds (or -1 for none), got {timeout}")
    if float(batch_timeout) < 0 or (not unlimited and float(batch_timeout) >= float(timeout)):
        raise ServeConfigError(
            f"batch_timeout must be at least 0 and below timeout ({timeout}), got {batch_timeout}"
        )


def build_server(
    ckpt_path: str | Path,
    *,
    workers: int = 1,
    max_batch_size: int = 1,
    batch_timeout: float = 0.0,
    timeout: float = 30,
    max_rows: int = MAX_ROWS,
    max_payload_size: int | None = 16 * 1024 * 1024,
) -> ls.LitServer:
    """A LitServer for one checkpoint, on CPU, with ``workers`` inference processes.

    The checkpoint is read here, in the calling process, so a missing or foreign file fails
    with :class:`CheckpointError` before any worker starts.
    """
    check_serving_options(workers, max_batch_size, batch_timeout, timeout, max_rows)
    model = PurchaseModel.from_checkpoint(ckpt_path)
    api = api_for_model(
        model,
        ckpt_path,
        max_batch_size=int(max_batch_size),
        batch_timeout=float(batch_timeout),
        max_rows=int(max_rows),
    )
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=int(workers),
        timeout=timeout,
        model_metadata=model_metadata(model),
        max_payload_size=max_payload_size,
    )
    server.app.add_exception_handler(RequestValidationError, validation_error_response)
    return server


def find_latest_checkpoint(root: str | Path = CHECKPOINT_ROOT) -> Path:
    """The most recently written ``best.ckpt`` under ``root``."""
    root = Path(root)
    candidates = sorted(root.glob("**/best.ckpt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"no best.ckpt found under {root}/; train one first with make train, "
            "or pass ckpt_path=path/to/best.ckpt"
        )
    return candidates[-1]


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


def _stop_on_sigterm(main_pid: int, signum: int, frame: Any) -> None:
    # LitServe stops its workers cleanly on KeyboardInterrupt; SIGTERM (docker stop, kill)
    # would otherwise end only this process. Forked server processes inherit this handler and
    # simply exit once uvicorn has finished its own shutdown.
    if os.getpid() == main_pid:
        raise KeyboardInterrupt
    raise SystemExit(0)


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
    """Validate the serve config and checkpoint, then serve until interrupted.

    Every problem a user can cause ends in one message and exit status 1, before any worker
    process is started.
    """
    try:
        log_level = str(cfg.get("log_level", "info")).lower()
        if log_level not in LOG_LEVELS:
            raise ServeConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        host = check_host(cfg.get("host", "127.0.0.1"))
        port = _number_setting(cfg, "port", int, 8000)
        checkpoint = resolve_checkpoint(cfg.get("ckpt_path"))
        ensure_port_free(host, port)
        server = build_server(
            checkpoint,
            workers=_number_setting(cfg, "workers", int, 1),
            max_batch_size=_number_setting(cfg, "max_batch_size", int, 1),
            batch_timeout=_number_setting(cfg, "batch_timeout", float, 0.0),
            timeout=_number_setting(cfg, "timeout", float, 30.0),
            max_rows=_number_setting(cfg, "max_rows", int, MAX_ROWS),
        )
    except (CheckpointError, ServeConfigError) as error:
        raise SystemExit(f"error: {error}") from None

    info = server.model_metadata
    features = ", ".join(feature["name"] for feature in info["features"])
    print(f"Serving {info['name']} ({info['task']}; features: {features}) from {checkpoint}")
    print(f"POST http://{host}:{port}/predict  (schema at /docs, model at /info)")
    if litserve.server.LIT_SERVER_API_KEY:
        print("LIT_SERVER_API_KEY is set: send it as X-API-Key to /predict, /info and /health")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, functools.partial(_stop_on_sigterm, os.getpid()))
    server.run(host=host, port=int(port), log_level=log_level, generate_client_file=False)
