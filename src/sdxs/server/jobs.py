"""One job at a time on the device: `DeviceGate` (queue + single worker thread), the `Admission` middleware that
refuses from the headers alone and reads a job's body (within a deadline) before it takes a queue place, and
client-disconnect cancellation."""

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from sdxs.server.memory import release_free_memory

# requests that become a job on the device: admitted (or refused with 429) before their body is read
JOB_PATHS = frozenset({"/generate", "/encode-image", "/upscale", "/refine"})
# Multipart framing and form fields around an uploaded file: requests larger than the upload limit plus this are
# refused from their Content-Length header before the body is read.
FORM_OVERHEAD_BYTES = 64 * 1024
# A refused oversized body is read and dropped (never kept) up to this many bytes so that the client can read the
# 413; a larger one is cut off by closing the connection.
DRAIN_LIMIT_BYTES = 64 * 2**20
# Bodies up to this size (JSON requests, small uploads) are always read; larger ones only while the bodies being
# read together stay within the memory budget (`Admission`).
SMALL_BODY_BYTES = FORM_OVERHEAD_BYTES
# uvicorn's access log: a cancelled job's 499 goes there, as nginx logs "client closed request" (uvicorn itself
# logs nothing for a response it could not send)
access_log = logging.getLogger("uvicorn.access")


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
        self.pending = 0  # admitted requests: running + waiting (their bodies are in)
        self.receiving = 0  # job requests whose bodies are still arriving: no queue place yet
        self.receiving_bytes = 0  # their Content-Lengths, for the memory budget
        self.done = 0
        self.cancelled = 0
        self.started_at: float | None = None  # perf_counter() when the running job started
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxs-device")
        self._mean_seconds = 1.0  # running mean of job time, for Retry-After

    @property
    def full(self) -> bool:
        return self.pending > self.max_queue  # one running + max_queue waiting already

    def admit(self) -> None:
        """Take a place in the queue or raise `QueueFull`; the caller must `release()` it."""
        if self.full:
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
                    self._release_memory_soon()
                seconds = time.perf_counter() - started
                self._mean_seconds = 0.7 * self._mean_seconds + 0.3 * seconds
                self.done += 1
                return result, seconds, started - arrived
        finally:
            if not admitted:
                self.release()

    def _release_memory_soon(self) -> None:
        """Queue `release_free_memory` on the device thread: it runs after this job's answer is on its way and
        before the next job starts, so the freed activations go back to the OS instead of staying in RSS."""
        with contextlib.suppress(RuntimeError):  # shut down: nothing more will run
            self._executor.submit(release_free_memory)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Admission:
    """ASGI middleware: refuse what it can from the headers, then read a job's body before it joins the queue.

    From the headers alone: a POST without Content-Length -> 411; Content-Length over the upload limit -> 413; a job
    request while the queue is full -> 429 (bodies of 413s and 429s are dropped unread, up to DRAIN_LIMIT_BYTES,
    so the client sees the answer). Then a job request's body is read whole, within `body_timeout` seconds (else
    408), and only then does it take a queue place (or get 429): a client that sends its headers and then nothing
    holds no place. (Before, the place was taken first: five such connections filled a `max_queue` of 4, and
    every job request got 429 for as long as they stayed open.) Bodies being read are bounded in memory too:
    above SMALL_BODY_BYTES, a body is read only while those being read sum to at most `read_budget_bytes` (else
    429), so a storm of uploads holds about what `max_queue + 1` admitted ones did before.

    The place is held until the response has started. Every response gets `X-Content-Type-Options: nosniff`.
    """

    def __init__(
        self, app, gate: DeviceGate, max_body_bytes: int, limit_text: str, body_timeout: float, read_budget_bytes: int
    ):
        self.app, self.gate, self.max_body_bytes, self.limit_text = app, gate, max_body_bytes, limit_text
        self.body_timeout, self.read_budget_bytes = body_timeout, read_budget_bytes

    def busy(self, why: str | None = None) -> JSONResponse:
        detail = str(QueueFull(self.gate.retry_after()))
        detail = f"{detail} ({why})" if why else detail
        return JSONResponse({"detail": detail}, status_code=429, headers={"Retry-After": str(self.gate.retry_after())})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        size = int(length) if length.isdigit() else 0
        job = scope["method"] == "POST" and scope["path"] in JOB_PATHS
        refuse = None
        if scope["method"] == "POST" and not length.isdigit():
            refuse = JSONResponse({"detail": "a request body needs a Content-Length header"}, status_code=411)
        elif size > self.max_body_bytes:
            detail = f"request body is larger than the limit of {self.limit_text}"
            refuse = JSONResponse({"detail": detail}, status_code=413)
        elif job and self.gate.full:
            refuse = self.busy()
        elif job and size > SMALL_BODY_BYTES and self.gate.receiving_bytes + size > self.read_budget_bytes:
            refuse = self.busy("too many uploads arriving at once")
        if refuse is not None:
            if refuse.status_code in (413, 429):  # drop the unread body, so the client can read its answer
                await self.within_deadline(discard_body(receive, DRAIN_LIMIT_BYTES))
            return await self.close_with(refuse, scope, receive, send)

        admitted = False
        if job:
            self.gate.receiving += 1
            self.gate.receiving_bytes += size
            try:
                body = await self.within_deadline(read_body(receive))
            finally:
                self.gate.receiving -= 1
                self.gate.receiving_bytes -= size
            if body is None:
                seconds = f"{self.body_timeout:g}"
                timeout = JSONResponse(
                    {"detail": f"the request body did not arrive within {seconds} s"}, status_code=408
                )
                return await self.close_with(timeout, scope, receive, send)
            if isinstance(body, ClientGone):
                return  # nobody to answer
            try:
                self.gate.admit()  # only now, with the whole body in, does the request count against the queue
                admitted = True
            except QueueFull:  # filled while the body arrived; the body is dropped (it was read, never parsed)
                return await self.close_with(self.busy(), scope, receive, send)
            receive = replay(body, receive)
            del body  # the app's copy is the only one kept
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

    async def within_deadline(self, reading):
        """`await reading`, or None when it takes longer than `body_timeout` seconds."""
        try:
            return await asyncio.wait_for(reading, self.body_timeout)
        except asyncio.TimeoutError:
            return None

    @staticmethod
    async def close_with(response: JSONResponse, scope, receive, send) -> None:
        """Answer a refusal and close the connection: a body left unread (all of it, or the rest of one that did
        not arrive in time) must not be taken for the next request."""
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class ClientGone:
    """`read_body`'s answer when the client disconnected before its body was complete."""


async def read_body(receive) -> bytes | ClientGone:
    """The whole request body (its size is bounded by the Content-Length checks), or ClientGone."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the client's own messages (its disconnect)."""
    first = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again():
        return first.pop() if first else await receive()

    return receive_again


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


def log_cancelled(scope) -> None:
    """An access-log line for a job whose client went away: `127.0.0.1:5555 - "POST /generate HTTP/1.1" 499`.

    The arguments are those of uvicorn's own access lines, so its formatter prints (and colours) it the same way."""
    client = scope.get("client")
    where = f"{client[0]}:{client[1]}" if client else "-"
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("path", "") + (f"?{query}" if query else "")
    version = scope.get("http_version", "1.1")
    access_log.info('%s - "%s %s HTTP/%s" %d', where, scope.get("method", "-"), path, version, 499)


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
