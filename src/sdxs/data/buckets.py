"""Aspect-ratio buckets: which (width, height) each training image is cropped to.

Bucket sizes are at the model's OUTPUT resolution (what the pipeline generates) and are multiples of the model's
size step (`decoder factor * UNet multiple`, `pipe.size_step`). The asymmetric VAE decodes at twice the resolution
its encoder sees, so an image for bucket W x H is resized to (W / r) x (H / r) with r = decoder / encoder factor
(2 for 8x/16x) before the encoder; its latents are (H / 16) x (W / 16), exactly what the UNet denoises for a
W x H image.
"""

from __future__ import annotations

import math

import PIL.Image


def make_buckets(min_side: int, max_side: int, step: int, max_area: int) -> list[tuple[int, int]]:
    """(width, height) buckets: sides in [min_side, max_side], multiples of `step`, area <= max_area.

    For every width the tallest height within the area budget (and its transpose), plus the largest square: each
    aspect ratio trains at about the same number of pixels, as SDXL-style buckets do, without dozens of
    near-identical ratios that would split the data into tiny buckets.
    """
    if step < 1 or min_side < 1 or max_side < max(min_side, step):
        raise ValueError(
            f"Bucket sides need step >= 1 and 1 <= min_side <= max_side >= step; got min_side={min_side}, "
            f"max_side={max_side}, step={step}."
        )
    sides = range(math.ceil(min_side / step) * step, max_side + 1, step)
    candidates = set()
    for w in sides:
        h = min(max_side, max_area // w // step * step)
        if h >= min_side and h in sides:
            candidates |= {(w, h), (h, w)}
        if w * w <= max_area:
            candidates.add((w, w))
    best: dict[tuple[int, int], tuple[int, int]] = {}  # reduced ratio -> largest size with that ratio
    for w, h in candidates:
        g = math.gcd(w, h)
        ratio = (w // g, h // g)
        if ratio not in best or w * h > best[ratio][0] * best[ratio][1]:
            best[ratio] = (w, h)
    if not best:
        raise ValueError(
            f"No bucket fits: min_side={min_side}, max_side={max_side}, step={step}, max_area={max_area}. "
            "Raise `max_area` or lower `min_side`."
        )
    return sorted(best.values(), key=lambda s: s[0] / s[1])


def default_buckets(default_size: tuple[int, int], step: int) -> tuple[int, int, int]:
    """(min_side, max_side, max_area) from the model's default output size (width, height).

    Sides from 3/4 of the shorter default side to the longer default side, area up to the default area: for
    sdxs-1b (1024 x 1408, step 64) that is 768..1408, the card's range; for the emoji model (256 x 256, step 32)
    192..256.
    """
    w, h = default_size
    min_side = max(step, (3 * min(w, h) // 4) // step * step)
    return min_side, max(w, h), w * h


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log scale; ties go to the larger bucket)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def cover_scale(width: int, height: int, target: tuple[int, int]) -> float:
    """The resize factor that makes a width x height image just cover `target` (>1 means upscaling)."""
    return max(target[0] / width, target[1] / height)


def resize_and_crop(image: PIL.Image.Image, target: tuple[int, int]) -> PIL.Image.Image:
    """Resize (Lanczos) so the image covers `target` = (width, height), then centre-crop to it exactly."""
    w, h = image.size
    scale = cover_scale(w, h, target)
    # round up so rounding never leaves the image a pixel short of the target
    new = (max(target[0], math.ceil(w * scale - 1e-6)), max(target[1], math.ceil(h * scale - 1e-6)))
    if new != image.size:
        image = image.resize(new, PIL.Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (new[0] - target[0]) // 2, (new[1] - target[1]) // 2
    return image.crop((left, top, left + target[0], top + target[1]))
