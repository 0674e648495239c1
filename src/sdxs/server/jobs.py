"""One job at a time on the device: `DeviceGate` (queue + single worker thread), the `Admission` middleware that
refuses from the headers alone, and client-disconnect cancellation."""

import asyncio
import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

# requests that become a job on the device: admitted (or refused with 429) before their body is read
JOB_PATHS = frozenset({"/generate", "/encode-image", "/upscale", "/refine"})
# Multipart framing and form fields around an uploaded file: requests larger than the upload limit plus this are
# refused from their Content-Length header before the body is read.
FORM_OVERHEAD_BYTES = 64 * 1024
# A refused oversized body is read and dropped (never kept) up to this many bytes so that the client can read the
# 413; a larger one is cut off by closing the connection.
DRAIN_LIMIT_BYTES = 64 * 2**20
# The page itself only talks to this server; /docs (Swagger UI from a CDN) is left without this policy.


class QueueFull(Exception):
    """More than `max_queue` requests are already waiting for the device."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The client went away: its job was stopped (or never started)."""


class DeviceGate:
    """Admission control + serialisation: one job runs in a single worker thread, at most `max_queue` wait.

    The single-thread executor is what really keeps jobs apart (a cancelled request cannot free the device
    while its job still runs); the asyncio lock keeps the waiting requests in order and countable.
    """

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0  # admitted requests: running + waiting (+ reading their body)
        self.done = 0
        self.cancelled = 0
        self.started_at: float | None = None  # perf_counter() when the running job started
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxs-device")
        self._mean_seconds = 1.0  # running mean of job time, for Retry-After

    def admit(self) -> None:
        """Take a place in the queue or raise `QueueFull`; the caller must `release()` it."""
        if self.pending > self.max_queue:  # one running + max_queue waiting already
            raise QueueFull(self.retry_after())
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        return max(0, self.pending - int(self.busy))

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (self.waiting + 1)))

    async def run(
        self, fn, *args, admitted: bool = False, cancel: threading.Event | None = None, **kwargs
    ) -> tuple[Any, float, float]:
        """Run `fn(*args, **kwargs)` on the device thread; returns (result, seconds running, seconds queued).

        `admitted`: the caller already holds a place (`admit()`), e.g. taken by the middleware before the body
        was read. `cancel`: when set before the job starts, it never starts (`Cancelled`).
        """
        if not admitted:
            self.admit()
        arrived = time.perf_counter()
        try:
            async with self._lock:
                if cancel is not None and cancel.is_set():
                    self.cancelled += 1
                    raise Cancelled()
                started = self.started_at = time.perf_counter()
                loop = asyncio.get_running_loop()
                try:
                    result = await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
                except Cancelled:
                    self.cancelled += 1
                    raise
                finally:
                    self.started_at = None
                seconds = time.perf_counter() - started
                self._mean_seconds = 0.7 * self._mean_seconds + 0.3 * seconds
                self.done += 1
                return result, seconds, started - arrived
        finally:
            if not admitted:
                self.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Admission:
    """ASGI middleware: refuse from the headers alone, before any body byte is read.

    POST without Content-Length -> 411; Content-Length over the upload limit -> 413 (the body is dropped unread,
    up to DRAIN_LIMIT_BYTES, so the client sees the answer); a job request while the queue is full -> 429 (its body is dropped unread the same way; the place an
    admitted request takes is held until the response has started, so requests reading their bodies count against
    the queue too). Every response gets `X-Content-Type-Options: nosniff`.
    """

    def __init__(self, app, gate: DeviceGate, max_body_bytes: int, limit_text: str):
        self.app, self.gate, self.max_body_bytes, self.limit_text = app, gate, max_body_bytes, limit_text

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        refuse = None
        if scope["method"] == "POST" and not length.isdigit():
            refuse = JSONResponse({"detail": "a request body needs a Content-Length header"}, status_code=411)
        elif length.isdigit() and int(length) > self.max_body_bytes:
            detail = f"request body is larger than the limit of {self.limit_text}"
            refuse = JSONResponse({"detail": detail}, status_code=413)
        admitted = False
        if refuse is None and scope["method"] == "POST" and scope["path"] in JOB_PATHS:
            try:
                self.gate.admit()
                admitted = True
            except QueueFull as e:
                refuse = JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after)})
        if refuse is not None:
            refuse.headers["X-Content-Type-Options"] = "nosniff"
            refuse.headers["Connection"] = "close"  # the unread body must not be taken for the next request
            if refuse.status_code in (413, 429):  # drop the unread body, so the client can read its answer
                await discard_body(receive, DRAIN_LIMIT_BYTES)
            return await refuse(scope, receive, send)

        state = scope.setdefault("state", {})
        state["sdxs_admitted"] = admitted

        async def send_with_headers(message):
            nonlocal admitted
            if message["type"] == "http.response.start":
                hdrs = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in hdrs):
                    hdrs.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": hdrs}
                if admitted:  # the job is over: free its place before the (possibly slow) body is sent
                    admitted = False
                    self.gate.release()
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            if admitted:
                self.gate.release()


async def discard_body(receive, limit: int) -> None:
    """Read and drop up to `limit` body bytes (nothing is kept), so a client still sending an oversized body gets
    to read its 413 instead of a reset connection; past `limit` the connection is simply closed."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (its body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def stop_when_cancelled(cancel: threading.Event):
    """A `callback_on_step_end` that interrupts the pipeline at the next step once `cancel` is set."""

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if cancel.is_set():
            pipe._interrupt = True
        return callback_kwargs

    return callback
