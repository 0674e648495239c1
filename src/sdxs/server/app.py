"""FastAPI app: JSON/multipart API around one loaded SDXSPipeline, plus the static web page at `/`.

Endpoints: POST /generate, /upscale, /refine, /encode-image; GET /health, /config, / (page), /docs, /openapi.json.

The device runs ONE job at a time: jobs go through `DeviceGate`, an asyncio lock in front of a single worker
thread (so the event loop keeps answering /health while the model works). At most `max_queue` requests may
wait behind the running one; beyond that the server answers 429 with a Retry-After estimate instead of letting
a queue (and memory) grow without bound.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models defined inside create_app
# (closures over the limits) as real classes, not as strings it would look up in the module's globals.
import asyncio
import base64
import functools
import io
import logging
import math
import secrets
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

logger = logging.getLogger("sdxs.server")

STATIC_DIR = Path(__file__).with_name("static")
MAX_SEED = 2**32 - 1  # seeds stay exact in JavaScript numbers and in every client language
# Multipart framing and form fields around an uploaded file: requests larger than the upload limit plus this are
# refused from their Content-Length header before the body is read.
FORM_OVERHEAD_BYTES = 64 * 1024
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
    status: str
    model_loaded: bool
    model: str
    device: str
    dtype: str
    busy: bool
    waiting: int
    max_queue: int
    version: str


# ----------------------------------------------------------------------------------------------------------------
# One job at a time on the device
# ----------------------------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """More than `max_queue` requests are already waiting for the device."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class DeviceGate:
    """Admission control + serialisation: one job runs in a single worker thread, at most `max_queue` wait.

    The single-thread executor is what really keeps jobs apart (a cancelled request cannot free the device
    while its job still runs); the asyncio lock keeps the waiting requests in order and countable.
    """

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0  # running + waiting requests
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdxs-device")
        self._mean_seconds = 1.0  # running mean of job time, for Retry-After

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        return max(0, self.pending - int(self.busy))

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (self.waiting + 1)))

    async def run(self, fn, *args, **kwargs) -> tuple[Any, float, float]:
        """Run `fn(*args, **kwargs)` on the device thread; returns (result, seconds running, seconds queued)."""
        if self.pending > self.max_queue:  # one running + max_queue waiting already
            raise QueueFull(self.retry_after())
        self.pending += 1
        arrived = time.perf_counter()
        try:
            async with self._lock:
                started = time.perf_counter()
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
                seconds = time.perf_counter() - started
                self._mean_seconds = 0.7 * self._mean_seconds + 0.3 * seconds
                return result, seconds, started - arrived
        finally:
            self.pending -= 1

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


async def read_upload(file: UploadFile, settings: ServerSettings) -> Image.Image:
    """Read an uploaded image within the byte and pixel limits (413 / 422 with a clear message)."""
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload is larger than the limit of {_megabytes(settings.max_upload_bytes)}")
    if not data:
        raise HTTPException(422, "image: the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only: the size is known before decoding
        if image.width * image.height > settings.max_upload_pixels:
            raise HTTPException(413, f"image is {image.width}x{image.height}: more pixels than this server accepts")
        image.load()
    except HTTPException:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HTTPException(422, f"image: not a readable image file ({type(e).__name__})") from e
    return image


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def _random_seed() -> int:
    return secrets.randbelow(2**31)


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

    @app.middleware("http")
    async def _limits_and_headers(request: Request, call_next):
        # refuse oversized bodies before reading them; the upload handlers check the real size as well
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_upload_bytes + FORM_OVERHEAD_BYTES:
            detail = f"request body is larger than the limit of {_megabytes(settings.max_upload_bytes)}"
            return JSONResponse({"detail": detail}, status_code=413)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def on_device(fn, *args, **kwargs):
        """Run a model call on the device thread; the pipeline's own argument errors become 422s."""
        try:
            return await gate.run(fn, *args, **kwargs)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, " ".join(str(e).split())) from e

    # -- API ------------------------------------------------------------------------------------------------

    def _images_response(images, seed: int, seconds: float, queued: float, params) -> GenerateResponse:
        return GenerateResponse(
            images=[
                GeneratedImage(image=png_data_uri(im), seed=seed + i, width=im.width, height=im.height)
                for i, im in enumerate(images)
            ],
            seconds=round(seconds, 3),
            queued_seconds=round(queued, 3),
            steps=params.steps,
            guidance=params.guidance,
        )

    def _call_kwargs(params, seed: int) -> dict[str, Any]:
        return dict(
            negative_prompt=params.negative_prompt or None,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=params.width,
            height=params.height,
            num_images_per_prompt=params.num_images,
            seed=seed,
        )

    @app.post("/generate", response_model=GenerateResponse, tags=["generate"])
    async def generate(req: GenerateRequest) -> GenerateResponse:  # type: ignore[valid-type]
        """Text to image: PNG data-URIs, each with the seed that reproduces it."""
        seed = _random_seed() if req.seed is None else req.seed

        def job():
            return pipe(req.prompt, **_call_kwargs(req, seed)).images

        images, seconds, queued = await on_device(job)
        return _images_response(images, seed, seconds, queued, req)

    @app.post("/encode-image", response_model=GenerateResponse, tags=["generate"])
    async def encode_image(
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
        used_seed = _random_seed() if params.seed is None else params.seed

        def job():
            embeds, mask = pipe.encode_image(picture)
            return pipe(prompt_embeds=embeds, prompt_attention_mask=mask, **_call_kwargs(params, used_seed)).images

        images, seconds, queued = await on_device(job)
        return _images_response(images, used_seed, seconds, queued, params)

    @app.post(
        "/upscale",
        tags=["image"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the image at 2x, PNG"}},
    )
    async def upscale(image: UploadFile = File(description="image to upscale 2x")) -> Response:
        """2x upscale with the VAE (encode 8x, decode 16x). Returns the PNG itself."""
        picture = await read_upload(image, settings)
        if max(picture.size) > settings.max_upscale_side:
            raise HTTPException(
                422,
                f"image is {picture.width}x{picture.height}; /upscale takes at most {settings.max_upscale_side} "
                "pixels per side",
            )
        result, seconds, queued = await on_device(lambda: pipe.image_upscale(picture)[0])
        headers = {"X-Seconds": f"{seconds:.3f}", "X-Queued-Seconds": f"{queued:.3f}"}
        return Response(png_bytes(result), media_type="image/png", headers=headers)

    @app.post("/refine", response_model=RefineResponse, tags=["text"])
    async def refine(req: RefineRequest) -> RefineResponse:  # type: ignore[valid-type]
        """Expand a short prompt into a detailed one with the text encoder's language-model head."""

        def job():
            return pipe.refine_prompts(req.prompt, max_new_tokens=settings.refine_max_new_tokens, seed=req.seed)[0]

        text, seconds, _ = await on_device(job)
        return RefineResponse(prompt=req.prompt, refined=" ".join(text.split()), seconds=round(seconds, 3))

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness and what is loaded where; answers while a generation runs."""
        return Health(
            status="ok",
            model_loaded=pipe is not None,
            model=settings.model_name,
            device=str(pipe.device),
            dtype=str(pipe.dtype).removeprefix("torch."),
            busy=gate.busy,
            waiting=gate.waiting,
            max_queue=gate.max_queue,
            version=sdxs.__version__,
        )

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
