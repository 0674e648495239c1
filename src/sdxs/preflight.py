"""Checks that run before a model loads: a request the model would refuse, or one that would run for an hour,
is refused in a second with the flag to change, not after the load (15 s) and the work.

The model's facts (size step, default size and steps) come from its JSON files (`size_facts`); a hub id is
checked after it loads, by the pipeline itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdxs.runtime import UserError

# Measured: 40 CFG steps at 128x128 take ~3 s on the project's 2-core CPU (docs/benchmarks.md), i.e. ~4.6 us per
# pixel and step; UNet attention grows faster than the pixel count, so estimates for large sizes are lower bounds.
CPU_SECONDS_PER_PIXEL_STEP = 3.0 / (40 * 128 * 128)


def size_facts(folder: str | os.PathLike) -> dict[str, int]:
    """What `__call__` will accept, read from the folder's JSON files without loading a weight: `size_step`,
    `default_width`, `default_height`, `default_steps` (the pipeline derives the same from its UNet and VAE)."""
    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    up = vae.get("up_block_out_channels", vae.get("block_out_channels"))
    decoder = 2 ** (len(up) - 1)
    step = decoder * 2 ** max(len(unet["down_block_types"]) - 2, 0)
    side = int(unet["sample_size"]) * decoder
    return {
        "size_step": step,
        "default_width": int(index.get("default_width") or side),
        "default_height": int(index.get("default_height") or side),
        "default_steps": int(index.get("default_num_inference_steps") or 40),
    }


def default_max_pixels(facts: dict[str, int]) -> int:
    """The default limit: twice the model's larger default side, squared (what `sdxs serve` allows)."""
    side = 2 * max(facts["default_width"], facts["default_height"])
    return side * side


def cpu_minutes(pixels: int, steps: int, images: int = 1) -> str:
    seconds = CPU_SECONDS_PER_PIXEL_STEP * pixels * steps * images
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def check_generation(
    model: str,
    width: int | None,
    height: int | None,
    steps: int | None,
    num_images: int,
    max_pixels: int | None,
) -> None:
    """Refuse (`UserError`, naming the flag and the fix) a size that is not a multiple of the model's size step, or
    more pixels than `max_pixels` (None: `default_max_pixels`; 0: no limit), before the model loads."""
    if not (Path(model) / "model_index.json").is_file():
        return  # a hub id: the pipeline checks after the download
    facts = size_facts(model)
    step = facts["size_step"]
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value < step or value % step):
            lo = value // step * step
            nearest = [v for v in (lo, lo + step) if v >= step]
            raise UserError(f"{flag} {value}: must be a positive multiple of {step} for this model; nearest {nearest}")
    w, h = width or facts["default_width"], height or facts["default_height"]
    limit = default_max_pixels(facts) if max_pixels is None else max_pixels
    if limit and w * h > limit:
        took = cpu_minutes(w * h, steps or facts["default_steps"], num_images)
        raise UserError(
            f"--width {w} --height {h} is {w * h} pixels, more than --max-pixels {limit} (about {took} or more on a "
            f"2-core CPU, and the model was trained at {facts['default_width']}x{facts['default_height']}); pass "
            f"--max-pixels {w * h} (or 0 for no limit) to make it anyway"
        )


def check_style(model: str, style: str | None) -> None:
    """Refuse (`UserError`) a `--style` the model does not declare (`style_tags` in model_index.json) before it
    loads; the message lists the model's styles."""
    if style is None or not (Path(model) / "model_index.json").is_file():
        return
    tags = json.loads((Path(model) / "model_index.json").read_text()).get("style_tags") or {}
    if not tags:
        raise UserError(f"--style {style}: this model declares no styles; describe the style in the prompt instead")
    from sdxs.pipeline import find_style

    if find_style(tags, style) is None:
        choices = ", ".join(f"{name} ({tag})" for name, tag in tags.items())
        raise UserError(f"--style {style}: not one of this model's styles: {choices}")
