"""FastAPI app: JSON/multipart API around one loaded SDXSPipeline, plus the static web page at `/`.

Endpoints: POST /generate, /upscale, /refine, /encode-image; GET /health, /config, / (page), /docs, /openapi.json.

The device runs ONE job at a time: jobs go through `DeviceGate`, an asyncio lock in front of a single worker
thread (so the event loop keeps answering /health while the model works). At most `max_queue` requests may
wait behind the running one; beyond that the server answers 429 with a Retry-After estimate instead of letting
a queue (and memory) grow without bound.

Admission (`Admission`, an ASGI middleware) refuses what it can from the headers: a POST without a
Content-Length gets 411, one larger than the upload limit 413, and a job request while the queue is full 429, so
a storm of large uploads costs no memory. A job request's body is then read within a deadline (408 after it) and
only then takes a queue place: a client that sends headers and then nothing holds none. Uploaded pixels are
decoded on the worker thread, one at a time, never on the event loop. A job whose client disconnects stops at its
next denoising step (`pipe._interrupt`), or never starts if it was still waiting; either way it is logged as 499.

Every error answer has one shape, `ErrorResponse`: `detail`, one line a person can read, plus `errors`, the
structured list, on validation errors; /openapi.json declares it (not FastAPI's default list-in-`detail`) and
every status code each route can answer.

Modules: `settings` (ServerSettings, Limits, request/response models), `jobs` (DeviceGate, Admission,
cancellation), `uploads` (reading and decoding uploaded images, PNG output); this one composes the routes.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models built by request_models
# (closures over the limits) as real classes, not as strings it would look up in the module's globals.
import asyncio
import functools
import gc
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

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
    log_cancelled,
    stop_when_cancelled,
    watch_disconnect,
)
from sdxs.server.memory import release_free_memory
from sdxs.server.settings import (  # noqa: F401 - also importable from sdxs.server.app
    MAX_SEED,
    REQUIRED_COMPONENTS,
    ErrorResponse,
    GeneratedImage,
    GenerateResponse,
    Health,
    Limits,
    RefineResponse,
    ServerSettings,
    image_seeds,
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
        if err.get("type") == "json_invalid":  # FastAPI's words are "1: JSON decode error"
            loc, reason = err.get("loc", ()), (err.get("ctx") or {}).get("error")
            where = f" at position {loc[-1]}" if len(loc) > 1 else ""
            parts.append(f"body: not valid JSON{where}" + (f" ({reason})" if reason else ""))
            continue
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "form")]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


FASTAPI_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's whole 400 message, whatever the cause


def _body_error_text(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (its 400 says only "There was an error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start}); send JSON as UTF-8"
    if isinstance(cause, RecursionError):
        return "body: the JSON is nested too deeply to parse"
    if isinstance(cause, MultiPartException):
        return f"body: not a readable multipart form ({cause.message})"
    return "body: could not be parsed" + (f" ({type(cause).__name__})" if cause is not None else "")


# Status codes each kind of route can answer besides 200, for /openapi.json: all with ErrorResponse's shape.
ERROR_DESCRIPTIONS = {
    400: "The body could not be parsed: not UTF-8, JSON nested too deeply, or a broken multipart form.",
    408: "The body did not arrive within the server's deadline (the connection is closed).",
    411: "A POST without a Content-Length header.",
    413: "The body or the uploaded image (bytes or pixels) is over the server's limit.",
    422: "Invalid request: `detail` says what and how to fix it; `errors` lists each invalid field.",
    429: "The queue is full: retry after `Retry-After` seconds.",
    499: "The client went away and its job was cancelled (logged; nobody is left to read this answer).",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait, from recent job times", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code with the ErrorResponse shape (the 429 with its Retry-After header)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
        if code == 429:
            out[code]["headers"] = RETRY_AFTER
    return out


JOB_ERRORS = error_responses(400, 408, 411, 413, 422, 429, 499)


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
        release_free_memory()  # what loading freed: the baseline RSS is then the model, not loading's leftovers
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
    max_body = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    app.add_middleware(
        Admission,
        gate=gate,
        max_body_bytes=max_body,
        limit_text=megabytes(settings.max_upload_bytes),
        body_timeout=settings.body_timeout_seconds,
        # bodies being read at once hold at most what the running job and a full queue of uploads would
        read_budget_bytes=(settings.max_queue + 1) * max_body,
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
    """422 with one readable sentence for invalid requests, 400 saying why a body could not be parsed, 429 for a
    full queue, 499 (logged) for a cancelled job: all in ErrorResponse's shape."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        detail = _error_text(list(exc.errors()))
        return JSONResponse({"detail": detail, "errors": jsonable_encoder(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI raises this 400 from the parser's exception; Starlette, a multipart one while handling it
        cause = exc.__cause__ or exc.__context__
        if exc.status_code == 400 and (exc.detail == FASTAPI_PARSE_ERROR or isinstance(cause, MultiPartException)):
            return JSONResponse({"detail": _body_error_text(cause)}, status_code=400)
        return await http_exception_handler(request, exc)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        # Nobody reads this (the client has gone), and uvicorn logs nothing for a response it cannot send: the
        # access-log line is ours. 499 is nginx's "client closed request".
        log_cancelled(request.scope)
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


def _encoded(images, seeds: list[int]) -> list[GeneratedImage]:
    """PNG-encode on the worker thread (the event loop only answers)."""
    return [
        GeneratedImage(image=png_data_uri(im), seed=s, width=im.width, height=im.height)
        for im, s in zip(images, seeds, strict=True)
    ]


def _images_response(images, seconds: float, queued: float, params) -> GenerateResponse:
    return GenerateResponse(
        images=images,
        seconds=round(seconds, 3),
        queued_seconds=round(queued, 3),
        steps=params.steps,
        guidance=params.guidance,
    )


def _call_kwargs(params, seeds: list[int], cancel: threading.Event) -> dict[str, Any]:
    import torch

    return dict(
        callback_on_step_end=stop_when_cancelled(cancel),
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        width=params.width,
        height=params.height,
        num_images_per_prompt=params.num_images,
        # one generator per image, seeded as the pipeline's own `seed=` does (CPU, seed + i), but from the seeds
        # the answer reports: wrapped within MAX_SEED, so each can be sent back to redo its image alone
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    )


def add_generate_route(app: FastAPI, pipe, on_device, GenerateRequest) -> None:
    @app.post("/generate", response_model=GenerateResponse, tags=["generate"], responses=JOB_ERRORS)
    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:  # type: ignore[valid-type]
        """Text to image: PNG data-URIs, each with the seed that reproduces it. A client that disconnects stops
        its job at the next denoising step."""
        seeds = image_seeds(random_seed() if req.seed is None else req.seed, req.num_images)

        def job(cancel):
            # `style`: a field only where the model declares styles
            styled = {"style": req.style} if getattr(req, "style", None) else {}
            images = pipe(req.prompt, **styled, **_call_kwargs(req, seeds, cancel)).images
            if cancel.is_set():
                raise Cancelled()
            return _encoded(images, seeds)

        images, seconds, queued = await on_device(request, job)
        return _images_response(images, seconds, queued, req)


def _form_field(GenerationParams, name: str):
    """A form field documented with the bounds of GenerationParams' field (one source for both routes).

    Only documented: GenerationParams validates them, with its own messages. Declared `int`/`float`/`str` rather
    than `... | None` so that the schema says integer (not "integer or null", which a form cannot send); absent,
    it is None and the model's default applies."""
    prop = GenerationParams.model_json_schema()["properties"][name]
    numbers = [option for option in prop.get("anyOf", ()) if option.get("type") != "null"]
    prop = {**prop, **numbers[0]} if numbers else prop  # `seed: int | None` has its bounds on the int option
    keys = ("minimum", "maximum", "multipleOf", "maxLength", "default", "description")
    return Form(None, json_schema_extra={k: prop[k] for k in keys if prop.get(k) is not None})


def add_encode_image_route(app: FastAPI, pipe, on_device, GenerationParams, settings: ServerSettings) -> None:
    field = functools.partial(_form_field, GenerationParams)

    @app.post("/encode-image", response_model=GenerateResponse, tags=["generate"], responses=JOB_ERRORS)
    async def encode_image(
        request: Request,
        image: UploadFile = File(description="the image prompt"),
        negative_prompt: str = field("negative_prompt"),
        steps: int = field("steps"),
        guidance: float = field("guidance"),
        width: int = field("width"),
        height: int = field("height"),
        seed: int = field("seed"),
        num_images: int = field("num_images"),
    ) -> GenerateResponse:
        """Image prompt: embed the image with the vision tower and generate variations from that embedding."""
        given = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height)
        given.update(seed=seed, num_images=num_images)
        try:
            params = GenerationParams(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        picture = await read_upload(image, settings)
        seeds = image_seeds(random_seed() if params.seed is None else params.seed, params.num_images)

        def job(cancel):
            embeds, mask = pipe.encode_image(shrink_for_vision(decode_upload(picture), pipe))
            kwargs = _call_kwargs(params, seeds, cancel)
            images = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, **kwargs).images
            if cancel.is_set():
                raise Cancelled()
            return _encoded(images, seeds)

        images, seconds, queued = await on_device(request, job)
        return _images_response(images, seconds, queued, params)


def add_upscale_route(app: FastAPI, pipe, on_device, settings: ServerSettings) -> None:
    @app.post(
        "/upscale",
        tags=["image"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the image at 2x, PNG"}, **JOB_ERRORS},
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
    @app.post("/refine", response_model=RefineResponse, tags=["text"], responses=JOB_ERRORS)
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
            receiving=gate.receiving,
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
