"""The lenient retrieval feature space (no network): CIELAB thumbnail + CIELAB colour histogram, cosine similarity.

A generation retrieves its nearest dataset images; a hit at k is the prompted emoji among the k nearest. Chance is
k / gallery size (`chance_percent`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

FEATURE_SIDE = 24  # retrieval thumbnail side in pixels: coarse enough to ignore sampling noise, fine enough for shape
HIST_SIDE = 64  # the colour histogram is taken on a copy this size
HIST_BINS = (4, 8, 8)  # CIELAB histogram bins: L* over [0, 100], a* and b* over [-80, 80]
HIST_WEIGHT = 0.5  # share of the histogram in the cosine similarity (makes retrieval robust to shifts and scale)
THUMB_DIM = FEATURE_SIDE * FEATURE_SIDE * 3
TOP_K = (1, 5)  # retrieval ranks reported


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (..., 3) with the D65 white point (L in [0, 100])."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])  # normalised by the D65 white
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_histogram(lab: np.ndarray) -> np.ndarray:
    """Square root of the normalised 4x8x8 histogram of CIELAB pixels (..., 3) -> (256,): colours, not layout."""
    edges = [np.linspace(0, 100, HIST_BINS[0] + 1), *[np.linspace(-80, 80, n + 1) for n in HIST_BINS[1:]]]
    edges = [e[1:-1] for e in edges]  # inner edges: values outside the range fall into the outer bins
    pixels = lab.reshape(-1, 3)
    bins = [np.searchsorted(e, pixels[:, i], side="right") for i, e in enumerate(edges)]
    flat = np.ravel_multi_index(bins, HIST_BINS)
    hist = np.bincount(flat, minlength=int(np.prod(HIST_BINS))) / len(pixels)
    return np.sqrt(hist)  # Hellinger: small colour areas (a skin tone) still count


def thumbnail_features(image) -> np.ndarray:
    """Raw feature of one image (path, PIL or array), composited on white -> (THUMB_DIM + HIST_DIM,) float32.

    The first `THUMB_DIM` values are the 24x24 box-resized image in CIELAB (layout and colour), the rest the
    colour histogram of a 64x64 box-resized copy (robust to the shifts and scale changes a generator makes).
    """
    from sdxs.pipeline import load_rgb_image

    if isinstance(image, np.ndarray) and image.dtype != np.uint8:  # float (H, W, 3) in [0, 1]
        image = PIL.Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    rgb = load_rgb_image(str(image) if isinstance(image, Path) else image)
    thumb = rgb.resize((FEATURE_SIDE, FEATURE_SIDE), PIL.Image.Resampling.BOX)
    colours = rgb.resize((HIST_SIDE, HIST_SIDE), PIL.Image.Resampling.BOX)
    thumb_lab = srgb_to_lab(np.asarray(thumb, dtype=np.float64) / 255.0).reshape(-1)
    hist = lab_histogram(srgb_to_lab(np.asarray(colours, dtype=np.float64) / 255.0))
    return np.concatenate([thumb_lab, hist]).astype(np.float32)


def gallery_features(paths: Sequence[Path], workers: int | None = None, progress=None) -> np.ndarray:
    """Raw features of many image files (N, D); decoding runs in threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, os.cpu_count() or 1)
    features = []
    with ThreadPoolExecutor(workers) as pool:
        for feature in pool.map(thumbnail_features, paths):
            features.append(feature)
            if progress is not None:
                progress.update(1)
    return np.stack(features)


class RetrievalIndex:
    """Nearest-neighbour search over a fixed gallery of raw features (`thumbnail_features`).

    Each block (thumbnail, histogram) is centred by its gallery mean, so what every emoji shares (the white
    background) does not dominate, and L2-normalised; the blocks are weighted so that the cosine similarity of
    two images is `(1 - HIST_WEIGHT) * cos(thumbnails) + HIST_WEIGHT * cos(histograms)`.
    """

    def __init__(self, gallery: np.ndarray):
        gallery = np.asarray(gallery, dtype=np.float64)  # (N, D)
        self.mean = gallery.mean(0)
        self.gallery = self.embed(gallery)

    def __len__(self) -> int:
        return len(self.gallery)

    def embed(self, raw: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(raw, dtype=np.float64)) - self.mean
        blocks = []
        for part, weight in ((x[:, :THUMB_DIM], 1 - HIST_WEIGHT), (x[:, THUMB_DIM:], HIST_WEIGHT)):
            norm = np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
            blocks.append(part / norm * math.sqrt(weight))
        return np.concatenate(blocks, axis=1)

    def ranks(self, queries: np.ndarray, targets: Sequence[int]) -> np.ndarray:
        """0-based rank of each query's target among all gallery images (0 = nearest); ties count against it."""
        sims = self.embed(queries) @ self.gallery.T  # (Q, N)
        target_sims = sims[np.arange(len(sims)), np.asarray(targets)][:, None]
        return (sims > target_sims).sum(1) + (sims == target_sims).sum(1) - 1

    def retrieve(self, label: str, images: Sequence, targets: Sequence[int]) -> RetrievalResult:
        """Generated images (PIL) as queries, each against its target gallery index: one `RetrievalResult`."""
        ranks = self.ranks(np.stack([thumbnail_features(im) for im in images]), targets)
        return RetrievalResult(label, ranks, len(self))


def topk_percent(ranks: np.ndarray, k: int) -> float:
    """Share of queries whose target is among the k nearest, in percent."""
    return 100.0 * float(np.mean(np.asarray(ranks) < k)) if len(ranks) else float("nan")


def chance_percent(k: int, gallery_size: int) -> float:
    """Top-k hit rate of a random ranking: k / gallery size, in percent."""
    return 100.0 * min(k, gallery_size) / gallery_size


@dataclass
class RetrievalResult:
    """Top-k retrieval of one query group (`ranks`: 0-based rank of each query's target)."""

    label: str
    ranks: np.ndarray
    gallery_size: int

    @property
    def count(self) -> int:
        return len(self.ranks)

    def top(self, k: int) -> float:
        return topk_percent(self.ranks, k)
