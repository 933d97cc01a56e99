"""The server's front door: API key, body limits, strict JSON, and one shape for every error.

:class:`RequestGuard` sees each request before FastAPI does. It checks the API key first, so a
client without it costs no parsing, then reads the body of a prediction request within a byte
limit and a time limit and makes sure it is one UTF-8 JSON text without duplicate keys. Only
then does FastAPI parse it against the checkpoint's schema. Every error the server answers, from
here or from FastAPI and LitServe, has the body ``{"message": "...", "detail": [...]}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Collection, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Probes and the API docs stay reachable without the key; the docs show only the schema.
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
BODY_TIMEOUT_S = 30.0
JSON_HELP = "send the features as a JSON object with Content-Type: application/json"


def error_response(
    status: int,
    message: str,
    kind: str,
    details: Sequence[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The server's one error shape: a readable message and a list of typed details."""
    content = {"message": message, "detail": list(details or [{"type": kind, "msg": message}])}
    return JSONResponse(status_code=status, content=content, headers=headers)


class BodyProblem(Exception):
    """A request body refused before parsing: the status, detail type and message to answer."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind)


class ClientGone(Exception):
    """The client closed the connection before its body arrived; there is nobody to answer."""


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def shortened(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, so a message never echoes a huge input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_json_text(body: bytes) -> None:
    """Raise :class:`BodyProblem` unless ``body`` is one UTF-8 JSON text with unique keys.

    Nesting deeper than the JSON parser allows (about a thousand levels) is refused here;
    shallower nesting reaches the schema, which names the feature and row where it is wrong.
    """
    if not body.strip():
        raise BodyProblem(400, "empty_body", f"request body is empty; {JSON_HELP}")
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise BodyProblem(
            400,
            "invalid_utf8",
            f"request body is not valid UTF-8: byte 0x{body[error.start]:02x} at position "
            f"{error.start}; JSON must be sent as UTF-8",
        ) from None
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise BodyProblem(
            400,
            "json_invalid",
            f"request body is not valid JSON: {error.msg} "
            f"(line {error.lineno}, column {error.colno})",
        ) from None
    except _DuplicateKey as duplicate:
        raise BodyProblem(
            400,
            "duplicate_key",
            f"request body is ambiguous: key {shortened(duplicate.key)!r} appears more than "
            "once in one object; send each feature once",
        ) from None
    except RecursionError:
        raise BodyProblem(
            400,
            "json_too_deep",
            "request body is nested too deeply; send one flat list of values per feature",
        ) from None
    except ValueError:
        # What remains is Python refusing to convert an integer of thousands of digits.
        raise BodyProblem(
            400,
            "number_too_long",
            "request body holds a number with thousands of digits; send ordinary decimals",
        ) from None


def check_content_type(headers: Headers) -> None:
    """Raise :class:`BodyProblem` (415) unless the request declares a JSON body."""
    declared = headers.get("content-type")
    if declared is None:
        raise BodyProblem(415, "content_type", f"request has no Content-Type; {JSON_HELP}")
    media_type = declared.split(";")[0].strip().lower()
    main_type, _, subtype = media_type.partition("/")
    if main_type != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise BodyProblem(
            415,
            "content_type",
            f"Content-Type {shortened(media_type)!r} is not JSON; {JSON_HELP}",
        )


class RequestGuard:
    """ASGI middleware that checks the API key and the body of each prediction request.

    ``api_key`` guards every path except :data:`OPEN_PATHS`; ``body_paths`` are the POST routes
    whose bodies are read here, within ``max_body_bytes`` and ``body_timeout`` seconds, and
    handed on unchanged once they pass.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        body_paths: Collection[str],
        max_body_bytes: int,
        body_timeout: float = BODY_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.body_paths = frozenset(body_paths)
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout = float(body_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._key_matches(headers):
            message = "missing or wrong API key: send it in the X-API-Key header"
            await error_response(401, message, "api_key")(scope, receive, send)
            return
        if scope["method"] != "POST" or scope["path"] not in self.body_paths:
            await self.app(scope, receive, send)
            return
        try:
            check_content_type(headers)
            body = await self._read_body(headers, receive)
            check_json_text(body)
        except BodyProblem as problem:
            await problem.response()(scope, receive, send)
            return
        except (ClientGone, asyncio.CancelledError):
            # Nobody to answer: the client left, or the server is stopping and gave up on an
            # upload that never finished.
            return
        await self.app(scope, _replaying(body, receive), send)

    def _key_matches(self, headers: Headers) -> bool:
        offered = headers.get("x-api-key", "").encode()
        return hmac.compare_digest(offered, self.api_key)

    def _too_large(self) -> BodyProblem:
        return BodyProblem(
            413,
            "body_too_large",
            f"request body is larger than {self.max_body_bytes:,} bytes; send fewer rows per "
            "request",
        )

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        try:
            return await asyncio.wait_for(self._receive_chunks(receive), self.body_timeout)
        except asyncio.TimeoutError:
            raise BodyProblem(
                408, "body_timeout", f"request body did not arrive within {self.body_timeout:g} s"
            ) from None

    async def _receive_chunks(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already-read body on, then listens for a disconnect."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# LitServe answers its own failures with these fixed words; the replacements say what to do.
_LITSERVE_DETAILS = {
    "Internal server error": (
        "internal error while scoring this request; the server log has the details"
    ),
    "Request timed out": (
        "the request waited too long for a free inference worker; retry later or raise timeout"
    ),
}


async def http_error_response(request: Request, error: HTTPException) -> JSONResponse:
    """Give the HTTP errors of FastAPI and LitServe (404, 405, 500, 504...) our error shape."""
    if error.status_code == 404:
        message = f"no endpoint at {shortened(request.url.path)}; POST /predict, GET /health"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {shortened(request.url.path)}"
    else:
        detail = str(error.detail)
        message = _LITSERVE_DETAILS.get(detail, detail)
    headers = getattr(error, "headers", None)
    return error_response(error.status_code, message, f"http_{error.status_code}", headers=headers)


async def unexpected_error_response(request: Request, error: Exception) -> JSONResponse:
    """A short 500 for an exception nothing else handled; uvicorn logs the stack trace."""
    message = "internal server error; the server log has the details"
    return error_response(500, message, "internal_error")
