"""How an inference worker takes requests off its queue, scores them and answers each one.

LitServe's own batched loop answers every request of a batch with the same error when any part
of the batch fails. :class:`IsolatingBatchLoop` keeps a failure with the request that caused it:
requests are decoded and encoded one by one, and when scoring the whole batch fails, each
request is scored alone, so the others still get their own answers.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from queue import Empty
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

log = logging.getLogger(__name__)

QUEUE_POLL_S = 1.0


@dataclass
class QueuedRequest:
    """One request as LitServe queues it: where to answer, its id, when it arrived, its body."""

    response_queue_id: int
    uid: str
    arrived_at: float
    payload: Any


def _is_stop_signal(item: Any) -> bool:
    # LitServe asks a worker to stop by queueing a tuple of Nones.
    return item is None or (isinstance(item, tuple) and item[1] is None)


class IsolatingBatchLoop(LitLoop):
    """Scores up to ``max_batch_size`` requests together and answers each on its own.

    The worker waits for one request, then up to ``batch_timeout`` seconds for more (with a
    timeout of 0 it takes only what is already queued), so an idle worker sleeps instead of
    polling. A request that waited longer than the server's ``timeout`` is answered with 504.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stop_requested = False

    def __call__(
        self,
        lit_api,
        device,
        worker_id,
        request_queue,
        transport,
        workers_setup_status,
        callback_runner,
    ) -> None:
        # Ctrl-C reaches every process of the terminal's group; the main process stops workers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.serve(lit_api, request_queue, transport)

    def serve(self, lit_api, request_queue, transport) -> None:
        """Answer batches until LitServe queues its stop signal."""
        while not self._stop_requested:
            batch = self.collect(lit_api, request_queue, transport)
            if batch:
                self.answer(lit_api, transport, batch)

    def collect(self, lit_api, request_queue, transport) -> list[QueuedRequest]:
        """The next batch of requests, or an empty list when none came or the loop must stop."""
        batch: list[QueuedRequest] = []
        deadline = None
        while len(batch) < lit_api.max_batch_size:
            wait = QUEUE_POLL_S if deadline is None else deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=wait) if wait > 0 else request_queue.get_nowait()
            except Empty:
                if deadline is None:
                    return batch
                break
            if _is_stop_signal(item):
                self._stop_requested = True
                break
            request = QueuedRequest(*item)
            # Tells the server which worker holds the request, in case this worker dies.
            self.put_response(
                transport,
                request.response_queue_id,
                request.uid,
                (),
                LitAPIStatus.START,
                LoopResponseType.REGULAR,
            )
            if self._waited_too_long(lit_api, request):
                self.fail(transport, request, HTTPException(504, "Request timed out"))
                continue
            batch.append(request)
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
        return batch

    @staticmethod
    def _waited_too_long(lit_api, request: QueuedRequest) -> bool:
        timeout = lit_api.request_timeout
        if timeout in (None, False, -1):
            return False
        return time.monotonic() - request.arrived_at > timeout

    def answer(self, lit_api, transport, batch: list[QueuedRequest]) -> None:
        """Decode, score and encode ``batch``; every request gets its own answer or error."""
        decoded = []
        for request in batch:
            try:
                decoded.append((request, lit_api.decode_request(request.payload)))
            except Exception as error:
                self.fail(transport, request, error)
        if not decoded:
            return

        try:
            outputs = self.score(lit_api, [inputs for _, inputs in decoded])
            scored = [(request, output) for (request, _), output in zip(decoded, outputs)]
        except Exception as error:
            if len(decoded) == 1:
                self.fail(transport, decoded[0][0], error)
                return
            log.warning(
                "scoring a batch of %d requests failed (%s); scoring each request alone",
                len(decoded),
                type(error).__name__,
            )
            scored = []
            for request, inputs in decoded:
                try:
                    scored.append((request, self.score(lit_api, [inputs])[0]))
                except Exception as single_error:
                    self.fail(transport, request, single_error)

        for request, output in scored:
            try:
                response = lit_api.encode_response(output)
            except Exception as error:
                self.fail(transport, request, error)
                continue
            self.put_response(
                transport,
                request.response_queue_id,
                request.uid,
                response,
                LitAPIStatus.OK,
                LoopResponseType.REGULAR,
            )

    @staticmethod
    def score(lit_api, inputs: list[Any]) -> list[Any]:
        """Batch, predict and unbatch; one output per input or an exception."""
        outputs = lit_api.unbatch(lit_api.predict(lit_api.batch(inputs)))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"unbatch returned {len(outputs)} outputs for {len(inputs)} inputs")
        return outputs

    def fail(self, transport, request: QueuedRequest, error: Exception) -> None:
        """Answer one request with an error: its own HTTP error, or a short 500."""
        if isinstance(error, HTTPException):
            if error.status_code >= 500:
                log.error("request %s failed: %s", request.uid, error.detail)
        else:
            # The stack trace goes to the server log, never into a response.
            log.error("request %s failed", request.uid, exc_info=error)
            error = HTTPException(
                500,
                f"internal error while scoring this request ({type(error).__name__}); "
                "the server log has the details",
            )
        self.put_response(
            transport,
            request.response_queue_id,
            request.uid,
            PickleableHTTPException.from_exception(error),
            LitAPIStatus.ERROR,
            LoopResponseType.REGULAR,
        )
