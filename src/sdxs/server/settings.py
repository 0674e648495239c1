"""Server settings, the limits they resolve to against a model, and the request/response models built from them."""

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**32 - 1  # seeds stay exact in JavaScript numbers and in every client language
# the parts an SDXSPipeline needs to generate; vision_processor is optional (image prompts)
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class ServerSettings:
    """What the server allows; every limit protects the one device from a single request hogging it."""

    default_steps: int | None = None  # steps the page starts with (None: the model's default_num_inference_steps)
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
    # A job request's body must arrive within this many seconds of its headers, else 408. Without a deadline a
    # client that sends headers and then nothing held its connection (and, before, a queue place) for good.
    body_timeout_seconds: float = 30.0
    model_name: str = "sdxs"

    def __post_init__(self) -> None:
        if self.default_steps is not None and not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"`default_steps` must be in [1, max_steps={self.max_steps}], got {self.default_steps}.")
        if self.max_queue < 0:
            raise ValueError(f"`max_queue` must be >= 0, got {self.max_queue}.")
        if self.max_images < 1 or self.max_upload_bytes < 1:
            raise ValueError("`max_images` and `max_upload_bytes` must be >= 1.")
        if not self.body_timeout_seconds > 0:
            raise ValueError(f"`body_timeout_seconds` must be > 0, got {self.body_timeout_seconds}.")


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
    # the model's styles, name -> caption tag (`style_tags` in its config): the page's
    # style select and /generate's `style`; empty: the model declares none and /generate takes no `style`
    styles: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, pipe, settings: ServerSettings) -> "Limits":
        step = int(pipe.size_step)
        dw, dh = int(pipe.config.default_width), int(pipe.config.default_height)
        max_side = settings.max_side or 2 * max(dw, dh)
        max_side = max(step, max_side // step * step)
        max_pixels = settings.max_pixels or max_side * max_side
        model_steps = int(pipe.config.get("default_num_inference_steps") or 40)
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
            default_steps=min(settings.max_steps, settings.default_steps or model_steps),
            max_steps=settings.max_steps,
            default_guidance=settings.default_guidance,
            max_guidance=settings.max_guidance,
            max_images=settings.max_images,
            max_queue=settings.max_queue,
            max_upload_bytes=settings.max_upload_bytes,
            max_upscale_side=settings.max_upscale_side,
            max_prompt_chars=settings.max_prompt_chars,
            sizes=sizes,
            styles=dict(pipe.config.get("style_tags") or {}),
        )


# ----------------------------------------------------------------------------------------------------------------
# Request and response models
# ----------------------------------------------------------------------------------------------------------------


def image_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of `n` images of a request with `seed`: `seed + i`, wrapped to stay within [0, MAX_SEED].

    Image i is generated from, and reported with, the same number, so every reported seed can be sent back and
    gives that image alone. Without the wrap, seed MAX_SEED with 2 images reported 2**32 for the second image, a
    seed the server then refused."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def _check_multiple(name: str, value: int, step: int) -> int:
    if value % step:
        lo = value // step * step
        nearest = " or ".join(str(v) for v in (lo, lo + step) if v >= step)
        raise ValueError(f"{name} must be a multiple of {step} (nearest: {nearest})")
    return value


def _not_a_bool(value, info):
    """pydantic takes true/false for a number (as 1/0); the schema says integer or number, so refuse them
    (schemathesis's negative mode found `"seed": false` answered 200)."""
    if isinstance(value, bool):
        raise ValueError(f"{info.field_name} must be a number, not {str(value).lower()}")
    return value


def request_models(lim: Limits) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """Pydantic request models whose bounds come from `lim`, so /openapi.json documents the real limits."""
    on_step = {"multipleOf": lim.size_step}

    class GenerationParams(BaseModel):
        """Everything about a generation except what it is conditioned on."""

        model_config = ConfigDict(extra="forbid")
        negative_prompt: str = Field("", max_length=lim.max_prompt_chars, description="what to steer away from")
        steps: int = Field(lim.default_steps, ge=1, le=lim.max_steps, description="denoising steps")
        guidance: float = Field(
            lim.default_guidance, ge=0, le=lim.max_guidance, allow_inf_nan=False, description="CFG scale; 1 = off"
        )
        # multipleOf only in the schema: `_multiple_of_step` checks it with a message that names the nearest sizes
        width: int = Field(
            lim.default_width, ge=lim.min_side, le=lim.max_side, json_schema_extra=on_step, description="pixels"
        )
        height: int = Field(
            lim.default_height, ge=lim.min_side, le=lim.max_side, json_schema_extra=on_step, description="pixels"
        )
        seed: int | None = Field(
            None, ge=0, le=MAX_SEED, description=f"image i uses seed + i (mod {MAX_SEED + 1}); random when absent"
        )
        num_images: int = Field(1, ge=1, le=lim.max_images)

        _numbers = field_validator("steps", "guidance", "width", "height", "seed", "num_images", mode="before")(
            _not_a_bool
        )

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
        if lim.styles:  # only a model that declares styles takes one
            style: Literal[tuple(lim.styles)] | None = Field(  # type: ignore[valid-type]
                None,
                description="one of the model's styles (its caption tag ends the prompt): "
                + ", ".join(f"{name} ({tag})" for name, tag in lim.styles.items()),
            )

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

        _numbers = field_validator("seed", mode="before")(_not_a_bool)

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


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='where: ["body", "width"]')
    msg: str
    type: str = Field(description="pydantic's error type, e.g. less_than_equal")


class ErrorResponse(BaseModel):
    """Every error the server answers (4xx): one line a person can read, plus each field's problem on a 422 from
    validation. (FastAPI's default HTTPValidationError, a list in `detail`, is not what this server sends.)"""

    detail: str = Field(description="what is wrong and how to fix it, one line")
    errors: list[FieldError] = Field(
        default_factory=list, description="on validation errors (422): each invalid field; absent otherwise"
    )


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
    receiving: int = Field(description="job requests whose bodies are still arriving (not in the queue yet)")
    max_queue: int
    jobs_done: int
    jobs_cancelled: int = Field(description="jobs stopped or skipped because their client went away")
    version: str
