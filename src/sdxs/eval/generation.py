"""Seeded batch generation, model loading and the progress line the measurements share."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GenerationSettings:
    """Sampling settings shared by every generated image (recorded in the report)."""

    steps: int | None = None  # None: the model's default_num_inference_steps
    guidance: float = 4.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 16


def batches(n: int, size: int):
    """(start, end) of consecutive batches of `size` over `n` items."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _generate(pipe, n: int, gen: GenerationSettings, conditioning, progress=None) -> list:
    """Generate `n` images in batches; `conditioning(start, end)` gives the prompt kwargs of images start..end-1.

    Image `i` uses seed `gen.seed + i` whatever the batch size.
    """
    images = []
    for start, end in batches(n, gen.batch_size):
        out = pipe(
            **conditioning(start, end),
            num_inference_steps=gen.steps,
            guidance_scale=gen.guidance,
            seed=gen.seed + start,
            width=gen.width,
            height=gen.height,
        )
        images += out.images
        if progress is not None:
            progress.update(end - start)
    return images


def generate_from_prompts(pipe, prompts: Sequence[str], gen: GenerationSettings, progress=None) -> list:
    """Text to image; image `i` uses seed `gen.seed + i`."""
    return _generate(pipe, len(prompts), gen, lambda s, e: {"prompt": list(prompts[s:e])}, progress)


def generate_from_images(pipe, paths: Sequence[Path], gen: GenerationSettings, progress=None) -> list:
    """Image prompts: `encode_image` of each source, then generation from those embeddings (seed `gen.seed + i`)."""

    def conditioning(start: int, end: int) -> dict:
        embeds, mask = pipe.encode_image([str(p) for p in paths[start:end]])
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    return _generate(pipe, len(paths), gen, conditioning, progress)


class LogProgress:
    """The part of tqdm's interface the eval uses, written as one plain line every `every` seconds (for logs)."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 60.0, file=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.file = file or sys.stderr
        self.n, self.stage = 0, ""
        self.start = self.last = time.perf_counter()

    def set_postfix_str(self, text: str) -> None:
        self.stage = text

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self._line()

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.start  # no time-left estimate: gallery images take far less than generated ones
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%) "
            f"{self.stage}, {elapsed / 60:.1f} min elapsed",
            file=self.file,
            flush=True,
        )


def load_eval_pipeline(model, device: str, dtype: str, progress: bool):
    """(pipeline, name for the report): a loaded pipeline as is, else a folder / hub id loaded like the CLI does."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model, getattr(model, "name_or_path", None) or type(model).__name__
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    from sdxs.runtime import pick_device, pick_dtype, resolve_model

    folder = resolve_model(None if model is None else os.fspath(model))
    device = pick_device(device)
    if not progress:  # loading bars would clutter logs; the eval's own bar is enough
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=pick_dtype(dtype, device), trust_remote_code=True)
    return pipe.to(device), folder
