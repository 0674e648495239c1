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

Modules: `settings` (ServerSettings, Limits, request/response models), `jobs` (DeviceGate, Admission,
cancellation), `uploads` (reading and decoding uploaded images, PNG output); this one composes the routes.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models built by request_models
# (closures over the limits) as real classes, not as strings it would look up in the module's globals.
import asyncio
import gc
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

import sdxs
from sdxs.runtime import random_seed
from sdxs.server.jobs import (  # noqa: F401 - also importable from sdxs.server.app
    DRAIN_LIMIT_BYTES,
    FORM_OVERHEAD_BYTES,
    JOB_PATHS,
    Admission,
    Cancelled,
    DeviceGate,
    QueueFull,
    stop_when_cancelled,
    watch_disconnect,
)
from sdxs.server.settings import (  # noqa: F401 - also importable from sdxs.server.app
    MAX_SEED,
    REQUIRED_COMPONENTS,
    GeneratedImage,
    GenerateResponse,
    Health,
    Limits,
    RefineResponse,
    ServerSettings,
    request_models,
)
from sdxs.server.uploads import (  # noqa: F401 - also importable from sdxs.server.app
    decode_upload,
    megabytes,
    png_bytes,
    png_data_uri,
    read_upload,
    shrink_for_vision,
    vision_pixel_budget,
)

STATIC_DIR = Path(__file__).with_name("static")
# The page itself only talks to this server; /docs (Swagger UI from a CDN) is left without this policy.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self' data: blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


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


def _safe_str(get) -> str:
    try:
        return str(get())
    except Exception:  # a pipeline without modules has no device or dtype
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# The app: create_app composes the route-registering helpers below
# ----------------------------------------------------------------------------------------------------------------


def create_app(pipe, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `pipe` (an SDXSPipeline already on its device) under `settings`."""
    settings = settings or ServerSettings()
    limits = Limits.resolve(pipe, settings)
    GenerationParams, GenerateRequest, RefineRequest = request_models(limits)
    gate = DeviceGate(settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The loaded model and libraries are ~500k long-lived objects: a full garbage collection walks them all
        # (~0.35 s on the shipped model, with the event loop stopped), which a burst of requests triggers. Frozen,
        # they are left out of every collection (docs/reliability.md).
        already_frozen = gc.get_freeze_count() > 0  # another app in this process (tests) froze them first
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gate.shutdown()
            if not already_frozen:
                gc.unfreeze()

    app = FastAPI(
        title="SDXS",
        version=sdxs.__version__,
        description="Text-to-image with SDXS. One generation runs at a time; 429 with Retry-After when the "
        f"queue ({settings.max_queue} waiting) is full. Limits: GET /config.",
        lifespan=lifespan,
    )
    app.state.pipe, app.state.settings, app.state.limits, app.state.gate = pipe, settings, limits, gate

    add_error_handlers(app)
    # refuse oversized bodies before reading them; the upload handlers check the real size as well
    app.add_middleware(
        Admission,
        gate=gate,
        max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        limit_text=megabytes(settings.max_upload_bytes),
    )
    on_device = device_runner(gate)
    add_generate_route(app, pipe, on_device, GenerateRequest)
    add_encode_image_route(app, pipe, on_device, GenerationParams, settings)
    add_upscale_route(app, pipe, on_device, settings)
    add_refine_route(app, pipe, on_device, RefineRequest, settings)
    add_status_routes(app, pipe, settings, limits, gate)
    add_page(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """422 with one readable sentence for invalid requests, 429 for a full queue, 499 for a cancelled job."""

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


def device_runner(gate: DeviceGate):
    """`on_device(request, fn, *args, **kwargs)`: run `fn(cancel, *args, **kwargs)` through `gate`."""

    async def on_device(request: Request, fn, *args, **kwargs):
        """Run `fn(cancel, *args, **kwargs)` on the device thread, cancelled when the client disconnects; the
        pipeline's own argument errors become 422s."""
        cancel = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request, cancel))
        admitted = bool(getattr(request.state, "sdxs_admitted", False))
        try:
            return await gate.run(fn, cancel, *args, admitted=admitted, cancel=cancel, **kwargs)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, " ".join(str(e).split())) from e
        finally:
            watcher.cancel()

    return on_device


def _encoded(images, seed: int) -> list[GeneratedImage]:
    """PNG-encode on the worker thread (the event loop only answers)."""
    return [
        GeneratedImage(image=png_data_uri(im), seed=seed + i, width=im.width, height=im.height)
        for i, im in enumerate(images)
    ]


def _images_response(images, seconds: float, queued: float, params) -> GenerateResponse:
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


def add_generate_route(app: FastAPI, pipe, on_device, GenerateRequest) -> None:
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
        return _images_response(images, seconds, queued, req)


def add_encode_image_route(app: FastAPI, pipe, on_device, GenerationParams, settings: ServerSettings) -> None:
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
        return _images_response(images, seconds, queued, params)


def add_upscale_route(app: FastAPI, pipe, on_device, settings: ServerSettings) -> None:
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


def add_refine_route(app: FastAPI, pipe, on_device, RefineRequest, settings: ServerSettings) -> None:
    @app.post("/refine", response_model=RefineResponse, tags=["text"])
    async def refine(req: RefineRequest, request: Request) -> RefineResponse:  # type: ignore[valid-type]
        """Expand a short prompt into a detailed one with the text encoder's language-model head."""

        def job(cancel):
            return pipe.refine_prompts(req.prompt, max_new_tokens=settings.refine_max_new_tokens, seed=req.seed)[0]

        text, seconds, _ = await on_device(request, job)
        return RefineResponse(prompt=req.prompt, refined=" ".join(text.split()), seconds=round(seconds, 3))


def add_status_routes(app: FastAPI, pipe, settings: ServerSettings, limits: Limits, gate: DeviceGate) -> None:
    """GET /health and GET /config: answered on the event loop, never waiting on the worker."""

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


def add_page(app: FastAPI) -> None:
    """The web page at `/` (with its Content-Security-Policy) and its files under /static."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
