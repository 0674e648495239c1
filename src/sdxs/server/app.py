"""FastAPI app: JSON/multipart API around one loaded SDXSPipeline, plus the static web page at `/`.

Endpoints: POST /generate, /upscale, /refine, /encode-image; GET /health, /config, / (page), /docs, /openapi.json.

The device runs ONE job at a time: jobs go through `DeviceGate`, an asyncio lock in front of a single worker
thread (so the event loop keeps answering /health while the model works). At most `max_queue` requests may
wait behind the running one; beyond that the server answers 429 with a Retry-After estimate instead of letting
a queue (and memory) grow without bound.

Admission happens before a request's body is read (`Admission`, an ASGI middleware): a POST without a
Content-Length gets 411, one larger than the upload limit 413, and a job request while the queue is full 429 —
all from the headers alone, so a storm of large uploads costs no memory. Uploaded pixels are decoded on the
worker thread, one at a time, never on the event loop. A job whose client disconnects stops at its next
denoising step (`pipe._interrupt`), or never starts if it was still waiting.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models defined inside create_app
# (closures over the limits) as real classes, not as strings it would look up in the module's globals.
import asyncio
import base64
import functools
import io
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import sdxs
from sdxs.runtime import random_seed

logger = logging.getLogger("sdxs.server")

STATIC_DIR = Path(__file__).with_name("static")
MAX_SEED = 2**32 - 1  # seeds stay exact in JavaScript numbers and in every client language
# Multipart framing and form fields around an uploaded file: requests larger than the upload limit plus this are
# refused from their Content-Length header before the body is read.
FORM_OVERHEAD_BYTES = 64 * 1024
# A refused oversized body is read and dropped (never kept) up to this many bytes so that the client can read the
# 413; a larger one is cut off by closing the connection.
DRAIN_LIMIT_BYTES = 64 * 2**20
# The page itself only talks to this server; /docs (Swagger UI from a CDN) is left without this policy.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self' data: blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


# ----------------------------------------------------------------------------------------------------------------
# Settings and limits
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    """What the server allows; every limit protects the one device from a single request hogging it."""

    default_steps: int = 40  # steps the page starts with
    default_guidance: float = 4.0
    max_steps: int = 100
    max_guidance: float = 30.0
    max_images: int = 4  # images per request
    max_side: int | None = None  # pixels per side; None: 2x the model's larger default side
    max_pixels: int | None = None  # width x height; None: max_side squared
    max_queue: int = 4  # requests allowed to wait behind the running one; more get 429
    max_upload_bytes: int = 10 * 2**20  # 413 above it
    max_upload_pixels: int = 4096 * 4096  # decoded size of an upload (decompression bombs)
    max_upscale_side: int = 1024  # input side for /upscale (the output is 2x)
    max_prompt_chars: int = 2000
    refine_max_new_tokens: int = 120
    model_name: str = "sdxs"

    def __post_init__(self) -> None:
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"`default_steps` must be in [1, max_steps={self.max_steps}], got {self.default_steps}.")
        if self.max_queue < 0:
            raise ValueError(f"`max_queue` must be >= 0, got {self.max_queue}.")
        if self.max_images < 1 or self.max_upload_bytes < 1:
            raise ValueError("`max_images` and `max_upload_bytes` must be >= 1.")


@dataclass(frozen=True)
class Limits:
    """Settings resolved against the model (its size step and default size): what /config reports."""

    size_step: int
    default_width: int
    default_height: int
    min_side: int
    max_side: int
    max_pixels: int
    default_steps: int
    max_steps: int
    default_guidance: float
    max_guidance: float
    max_images: int
    max_queue: int
    max_upload_bytes: int
    max_upscale_side: int
    max_prompt_chars: int
    max_seed: int = MAX_SEED
    sizes: list[int] = field(default_factory=list)  # choices for the page's width/height selects

    @classmethod
    def resolve(cls, pipe, settings: ServerSettings) -> "Limits":
        step = int(pipe.size_step)
        dw, dh = int(pipe.config.default_width), int(pipe.config.default_height)
        max_side = settings.max_side or 2 * max(dw, dh)
        max_side = max(step, max_side // step * step)
        max_pixels = settings.max_pixels or max_side * max_side
        sizes = list(range(step, max_side + 1, step))
        stride = math.ceil(len(sizes) / 48)  # keep the selects short for models with a small step
        sizes = sorted({s for i, s in enumerate(sizes) if i % stride == stride - 1} | {dw, dh} & set(sizes))
        return cls(
            size_step=step,
            default_width=dw,
            default_height=dh,
            min_side=step,
            max_side=max_side,
            max_pixels=max_pixels,
            default_steps=settings.default_steps,
            max_steps=settings.max_steps,
            default_guidance=settings.default_guidance,
            max_guidance=settings.max_guidance,
            max_images=settings.max_images,
            max_queue=settings.max_queue,
            max_upload_bytes=settings.max_upload_bytes,
            max_upscale_side=settings.max_upscale_side,
            max_prompt_chars=settings.max_prompt_chars,
            sizes=sizes,
        )


# ----------------------------------------------------------------------------------------------------------------
# Request and response models
# ----------------------------------------------------------------------------------------------------------------


def _check_multiple(name: str, value: int, step: int) -> int:
    if value % step:
        lo = value // step * step
        nearest = " or ".join(str(v) for v in (lo, lo + step) if v >= step)
        raise ValueError(f"{name} must be a multiple of {step} (nearest: {nearest})")
    return value


def request_models(lim: Limits) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """Pydantic request models whose bounds come from `lim`, so /openapi.json documents the real limits."""

    class GenerationParams(BaseModel):
        """Everything about a generation except what it is conditioned on."""

        model_config = ConfigDict(extra="forbid")
        negative_prompt: str = Field("", max_length=lim.max_prompt_chars, description="what to steer away from")
        steps: int = Field(lim.default_steps, ge=1, le=lim.max_steps, description="denoising steps")
        guidance: float = Field(
            lim.default_guidance, ge=0, le=lim.max_guidance, allow_inf_nan=False, description="CFG scale; 1 = off"
        )
        width: int = Field(lim.default_width, ge=lim.min_side, le=lim.max_side, description="pixels")
        height: int = Field(lim.default_height, ge=lim.min_side, le=lim.max_side, description="pixels")
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; random when absent")
        num_images: int = Field(1, ge=1, le=lim.max_images)

        @field_validator("width", "height")
        @classmethod
        def _multiple_of_step(cls, value: int, info) -> int:
            return _check_multiple(info.field_name, value, lim.size_step)

        @model_validator(mode="after")
        def _pixel_budget(self):
            if self.width * self.height > lim.max_pixels:
                raise ValueError(
                    f"width x height = {self.width * self.height} pixels is more than the limit of {lim.max_pixels}"
                )
            return self

    class GenerateRequest(GenerationParams):
        prompt: str = Field(min_length=1, max_length=lim.max_prompt_chars, description="what to draw")

        @field_validator("prompt")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("prompt must not be empty")
            return value

    class RefineRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1, max_length=lim.max_prompt_chars, description="a short prompt")
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes the refinement reproducible")

    return GenerationParams, GenerateRequest, RefineRequest


class GeneratedImage(BaseModel):
    image: str = Field(description="data:image/png;base64,...")
    seed: int = Field(description="the seed that reproduces this image alone")
    width: int
    height: int


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    seconds: float = Field(description="time on the device")
    queued_seconds: float = Field(description="time spent waiting for the device")
    steps: int
    guidance: float


class RefineResponse(BaseModel):
    prompt: str
    refined: str
    seconds: float


class Health(BaseModel):
    status: str = Field(description='"ok", or "unavailable" (503) when a model part is missing')
    model_loaded: bool = Field(description="the UNet, VAE, text encoder and tokenizer are all loaded")
    components: dict[str, bool] = Field(description="which parts of the pipeline are loaded")
    model: str
    device: str
    dtype: str
    busy: bool = Field(description="a job is running on the device")
    running_seconds: float | None = Field(description="how long the running job has run")
    waiting: int = Field(description="requests admitted and waiting behind the running one")
    max_queue: int
    jobs_done: int
    jobs_cancelled: int = Field(description="jobs stopped or skipped because their client went away")
    version: str


# the parts an SDXSPipeline needs to generate; vision_processor is optional (image prompts)
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# requests that become a job on the device: admitted (or refused with 429) before their body is read
JOB_PATHS = frozenset({"/generate", "/encode-image", "/upscale", "/refine"})


# ----------------------------------------------------------------------------------------------------------------
# One job at a time on the device
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _error_text(errors: list[dict[str, Any]]) -> str:
    """Pydantic errors as one readable sentence: `width: width must be a multiple of 16; steps: ...`."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "form")]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


async def read_upload(file: UploadFile, settings: ServerSettings, max_side: int | None = None) -> Image.Image:
    """Read an uploaded image's bytes and header within the byte and pixel limits (413 / 422 with a clear
    message). The pixels are NOT decoded here (that would block the event loop and hold memory per waiting
    request): the job calls `decode_upload` on the worker thread."""
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload is larger than the limit of {_megabytes(settings.max_upload_bytes)}")
    if not data:
        raise HTTPException(422, "image: the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HTTPException(422, f"image: not a readable image file ({type(e).__name__})") from e
    if image.width * image.height > settings.max_upload_pixels:
        raise HTTPException(413, f"image is {image.width}x{image.height}: more pixels than this server accepts")
    if max_side is not None and max(image.size) > max_side:
        raise HTTPException(
            422, f"image is {image.width}x{image.height}; this endpoint takes at most {max_side} pixels per side"
        )
    return image


def decode_upload(image: Image.Image) -> Image.Image:
    """Decode an image opened by `read_upload` (on the worker thread); a broken file is a ValueError (422)."""
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image: not a readable image file ({type(e).__name__})") from e
    return image


def vision_pixel_budget(pipe) -> int | None:
    """Pixels an image prompt is encoded at: the smaller of the vision processor's own `longest_edge` and what
    `encode_image` asks of it (at most `text_recipe.max_length - 2` image tokens of `(patch_size * merge_size)**2`
    pixels each). None when the pipeline has no vision processor to say."""
    vp = getattr(pipe, "vision_processor", None)
    size = getattr(vp, "size", None) or {}
    budgets = [size["longest_edge"]] if isinstance(size, dict) and size.get("longest_edge") else []
    recipe = getattr(getattr(pipe, "config", None), "text_recipe", None)
    if isinstance(getattr(vp, "patch_size", None), int) and isinstance(getattr(vp, "merge_size", None), int) and recipe:
        unit = vp.patch_size * vp.merge_size
        budgets.append(max(4, int(dict(recipe).get("max_length", 250)) - 2) * unit * unit)
    return min(budgets) if budgets else None


def shrink_for_vision(image: Image.Image, pipe) -> Image.Image:
    """Resize an image larger than the pixels it will be encoded at (`vision_pixel_budget`) down to them with PIL
    (uint8), instead of letting the processor do it on a float copy. `encode_image` resizes to within this budget
    anyway, so the embedding barely changes; the memory does: one 4096x4096 image prompt on the shipped model took
    the process's peak RSS up by 223 MB when shrunk only to the processor's default budget, by 60 MB now."""
    budget = vision_pixel_budget(pipe)
    if not budget or image.width * image.height <= budget:
        return image
    scale = math.sqrt(budget / (image.width * image.height))
    new = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    from sdxs.pipeline import load_rgb_image  # transparency on white, EXIF, modes: as encode_image would

    return load_rgb_image(image).resize(new, Image.Resampling.BICUBIC, reducing_gap=2.0)


class Admission:
    """ASGI middleware: refuse from the headers alone, before any body byte is read.

    POST without Content-Length -> 411; Content-Length over the upload limit -> 413 (the body is dropped unread,
    up to DRAIN_LIMIT_BYTES, so the client sees the answer); a job request while the queue is full -> 429 (the place it takes is held until the response has started, so requests reading their
    bodies count against the queue too). Every response gets `X-Content-Type-Options: nosniff`.
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
            if refuse.status_code == 413:
                await _discard_body(receive, DRAIN_LIMIT_BYTES)
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


async def _discard_body(receive, limit: int) -> None:
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


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
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


def _safe_str(get) -> str:
    try:
        return str(get())
    except Exception:  # a pipeline without modules has no device or dtype
        return "unknown"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------


def create_app(pipe, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `pipe` (an SDXSPipeline already on its device) under `settings`."""
    settings = settings or ServerSettings()
    limits = Limits.resolve(pipe, settings)
    GenerationParams, GenerateRequest, RefineRequest = request_models(limits)
    gate = DeviceGate(settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        gate.shutdown()

    app = FastAPI(
        title="SDXS",
        version=sdxs.__version__,
        description="Text-to-image with SDXS. One generation runs at a time; 429 with Retry-After when the "
        f"queue ({settings.max_queue} waiting) is full. Limits: GET /config.",
        lifespan=lifespan,
    )
    app.state.pipe, app.state.settings, app.state.limits, app.state.gate = pipe, settings, limits, gate

    # -- errors -----------------------------------------------------------------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": _error_text(errors), "errors": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        # nobody reads this (the client has gone); 499 is nginx's "client closed request", for the access log
        return JSONResponse({"detail": "the client went away; the job was cancelled"}, status_code=499)

    # refuse oversized bodies before reading them; the upload handlers check the real size as well
    app.add_middleware(
        Admission,
        gate=gate,
        max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        limit_text=_megabytes(settings.max_upload_bytes),
    )

    async def on_device(request: Request, fn, *args, **kwargs):
        """Run `fn(cancel, *args, **kwargs)` on the device thread, cancelled when the client disconnects; the
        pipeline's own argument errors become 422s."""
        cancel = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        admitted = bool(getattr(request.state, "sdxs_admitted", False))
        try:
            return await gate.run(fn, cancel, *args, admitted=admitted, cancel=cancel, **kwargs)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, " ".join(str(e).split())) from e
        finally:
            watcher.cancel()

    # -- API ------------------------------------------------------------------------------------------------

    def _encoded(images, seed: int) -> list[GeneratedImage]:
        """PNG-encode on the worker thread (the event loop only answers)."""
        return [
            GeneratedImage(image=png_data_uri(im), seed=seed + i, width=im.width, height=im.height)
            for i, im in enumerate(images)
        ]

    def _images_response(images, seed: int, seconds: float, queued: float, params) -> GenerateResponse:
        return GenerateResponse(
            images=images,
            seconds=round(seconds, 3),
            queued_seconds=round(queued, 3),
            steps=params.steps,
            guidance=params.guidance,
        )

    def _call_kwargs(params, seed: int, cancel: threading.Event) -> dict[str, Any]:
        return dict(
            callback_on_step_end=stop_when_cancelled(cancel),
            negative_prompt=params.negative_prompt or None,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=params.width,
            height=params.height,
            num_images_per_prompt=params.num_images,
            seed=seed,
        )

    @app.post("/generate", response_model=GenerateResponse, tags=["generate"])
    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:  # type: ignore[valid-type]
        """Text to image: PNG data-URIs, each with the seed that reproduces it. A client that disconnects stops
        its job at the next denoising step."""
        seed = random_seed() if req.seed is None else req.seed

        def job(cancel):
            images = pipe(req.prompt, **_call_kwargs(req, seed, cancel)).images
            if cancel.is_set():
                raise Cancelled()
            return _encoded(images, seed)

        images, seconds, queued = await on_device(request, job)
        return _images_response(images, seed, seconds, queued, req)

    @app.post("/encode-image", response_model=GenerateResponse, tags=["generate"])
    async def encode_image(
        request: Request,
        image: UploadFile = File(description="the image prompt"),
        negative_prompt: str | None = Form(None),
        steps: int | None = Form(None),
        guidance: float | None = Form(None),
        width: int | None = Form(None),
        height: int | None = Form(None),
        seed: int | None = Form(None),
        num_images: int | None = Form(None),
    ) -> GenerateResponse:
        """Image prompt: embed the image with the vision tower and generate variations from that embedding."""
        given = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height)
        given.update(seed=seed, num_images=num_images)
        try:
            params = GenerationParams(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        picture = await read_upload(image, settings)
        used_seed = random_seed() if params.seed is None else params.seed

        def job(cancel):
            embeds, mask = pipe.encode_image(shrink_for_vision(decode_upload(picture), pipe))
            kwargs = _call_kwargs(params, used_seed, cancel)
            images = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, **kwargs).images
            if cancel.is_set():
                raise Cancelled()
            return _encoded(images, used_seed)

        images, seconds, queued = await on_device(request, job)
        return _images_response(images, used_seed, seconds, queued, params)

    @app.post(
        "/upscale",
        tags=["image"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the image at 2x, PNG"}},
    )
    async def upscale(request: Request, image: UploadFile = File(description="image to upscale 2x")) -> Response:
        """2x upscale with the VAE (encode 8x, decode 16x). Returns the PNG itself."""
        picture = await read_upload(image, settings, max_side=settings.max_upscale_side)  # 422 from the header

        def job(cancel):
            if cancel.is_set():
                raise Cancelled()
            return png_bytes(pipe.image_upscale(decode_upload(picture))[0])

        result, seconds, queued = await on_device(request, job)
        headers = {"X-Seconds": f"{seconds:.3f}", "X-Queued-Seconds": f"{queued:.3f}"}
        return Response(result, media_type="image/png", headers=headers)

    @app.post("/refine", response_model=RefineResponse, tags=["text"])
    async def refine(req: RefineRequest, request: Request) -> RefineResponse:  # type: ignore[valid-type]
        """Expand a short prompt into a detailed one with the text encoder's language-model head."""

        def job(cancel):
            return pipe.refine_prompts(req.prompt, max_new_tokens=settings.refine_max_new_tokens, seed=req.seed)[0]

        text, seconds, _ = await on_device(request, job)
        return RefineResponse(prompt=req.prompt, refined=" ".join(text.split()), seconds=round(seconds, 3))

    @app.get("/health", response_model=Health, tags=["server"], responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """What is loaded where, queue depth and busy state; never waits on the worker. 503 when a part of the
        model is missing."""
        components = {
            name: getattr(pipe, name, None) is not None for name in (*REQUIRED_COMPONENTS, "vision_processor")
        }
        loaded = all(components[name] for name in REQUIRED_COMPONENTS)
        started = gate.started_at
        body = Health(
            status="ok" if loaded else "unavailable",
            model_loaded=loaded,
            components=components,
            model=settings.model_name,
            device=_safe_str(lambda: pipe.device),
            dtype=_safe_str(lambda: pipe.dtype).removeprefix("torch."),
            busy=gate.busy,
            running_seconds=None if started is None else round(time.perf_counter() - started, 3),
            waiting=gate.waiting,
            max_queue=gate.max_queue,
            jobs_done=gate.done,
            jobs_cancelled=gate.cancelled,
            version=sdxs.__version__,
        )
        return JSONResponse(body.model_dump(), status_code=200 if loaded else 503)

    @app.get("/config", tags=["server"])
    async def config() -> dict[str, Any]:
        """Defaults and limits, for the page's controls (sizes are multiples of `size_step`)."""
        return {
            **asdict(limits),
            "model": settings.model_name,
            "features": {
                "refine": getattr(pipe, "refine_prompts", None) is not None,
                "encode_image": getattr(pipe, "vision_processor", None) is not None,
                "upscale": True,
            },
        }

    # -- page -----------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
