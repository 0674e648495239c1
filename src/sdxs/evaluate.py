"""`sdxs eval`: measure a model on the emoji dataset and write docs/eval.md (how each number is computed:
docs/eval-method.md).

Sections of the report:

1. VAE: the R/2 -> R reconstruction (R = the model's output size; 2x box downsample -> encoder -> decoder with 2x
   the encoder's factor) against a bicubic 2x upscale of the same R/2 input: MSE, PSNR, Sobel edge error, KL.
2. Prompt fidelity: generate from each caption, then retrieve the prompted emoji among all dataset images in a
   fixed pixel feature space (CIELAB thumbnails, cosine similarity); top-1 / top-5 on training captions, held-out
   emoji and held-out skin-tone variants, with chance and the feature space's ceiling (VAE reconstructions).
3. Image prompts: `encode_image` of a dataset image -> generate -> retrieval of that image.
4. `refine_prompts`: inputs and outputs.
5. Strict prompt fidelity (`sdxs.eval_strict`): pixel-space retrieval per kind of emoji, bare names and exact
   captions, held-out emoji and tones, refined prompts and image prompts, with the nearest-render distance and
   the edge energy of every generation; its bare-name grid goes beside the sample grid.
6. A labelled sample grid (PNG under media/).

Everything is deterministic given `seed`: the training-caption subset, image `i`'s generation seed (`seed + i`
within each group) and `refine_prompts`' sampling.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from sdxs import eval_strict
from sdxs.grid import make_grid

# ----------------------------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------------------------

FEATURE_SIDE = 24  # retrieval thumbnail side in pixels: coarse enough to ignore sampling noise, fine enough for shape
HIST_SIDE = 64  # the colour histogram is taken on a copy this size
HIST_BINS = (4, 8, 8)  # CIELAB histogram bins: L* over [0, 100], a* and b* over [-80, 80]
HIST_WEIGHT = 0.5  # share of the histogram in the cosine similarity (makes retrieval robust to shifts and scale)
THUMB_DIM = FEATURE_SIDE * FEATURE_SIDE * 3
TOP_K = (1, 5)  # retrieval ranks reported
GRID_THUMB = 128  # sample grid cell side in pixels
GRID_MAX_BYTES = 500_000  # the grid is committed: keep it small
DEFAULT_REFINE_PROMPTS = ("a cat", "a red apple", "a smiling face", "a rocket", "a woman surfing", "a pizza")
# splits.jsonl `holdout` values (the emoji tool writes "skin tone"; accept "skin_tone" too)
HOLDOUT_EMOJI = "emoji"
HOLDOUT_TONE = "skin tone"

EPILOG = """examples:
  sdxs eval --model . --data data/emoji                           # full run -> docs/eval.md, media/eval-grid.png
  sdxs eval --model . --data data/emoji --limit 8 --steps 10      # a quick look (numbers not for publishing)
  sdxs eval --model out/ --data data/emoji --device cuda --batch-size 32 --out runs/eval.md --grid runs/grid.png
"""


# ----------------------------------------------------------------------------------------------------------------
# Image metrics (pixels in [0, 1], tensors (B, 3, H, W))
# ----------------------------------------------------------------------------------------------------------------


def mse_per_image(a, b):
    """Mean squared error of each image pair: (B, C, H, W) x2 -> (B,)."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr_from_mse(mse):
    """PSNR in dB for a peak of 1: `10 log10(1 / mse)`; identical images (mse 0) give `inf`."""
    import torch

    mse = torch.as_tensor(mse, dtype=torch.float64)
    return torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))


def sobel_magnitude(x):
    """Sobel gradient magnitude of each channel: (B, C, H, W) -> (B, C, H, W), borders replicated."""
    import torch
    import torch.nn.functional as F

    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    b, c, h, w = x.shape
    flat = F.pad(x.double().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(flat, kernels)  # (B*C, 2, H, W)
    return g.pow(2).sum(1).sqrt().reshape(b, c, h, w)


def edge_error_per_image(a, b):
    """Mean absolute difference of Sobel gradient magnitudes, per image: (B, C, H, W) x2 -> (B,)."""
    return (sobel_magnitude(a) - sobel_magnitude(b)).abs().flatten(1).mean(1)


def kl_per_image(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements, per image: (B, C, h, w) x2 -> (B,)."""
    mean, logvar = mean.double(), logvar.double()
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).mean(1)


def downsample2x(pixels):
    """2x2 box average (the VAE trainer's `F.interpolate(mode="area")`): (B, 3, H, W) -> (B, 3, H/2, W/2)."""
    import torch.nn.functional as F

    return F.avg_pool2d(pixels, 2)


def bicubic_upscale2x(pixels):
    """Bicubic 2x upscale (PyTorch, a = -0.75, half-pixel centres), clipped to [0, 1]."""
    import torch.nn.functional as F

    return F.interpolate(pixels, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EmojiItem:
    """One row of splits.jsonl; `index` is its position in the retrieval gallery (all rows, file order)."""

    index: int
    path: Path
    split: str
    holdout: str
    name: str
    caption: str  # the first caption line: "<name>, 3d render"


def load_emoji_dataset(data_dir: str | os.PathLike) -> list[EmojiItem]:
    """Read `data_dir/splits.jsonl` (written by `sdxs data emoji`) into items, in file order."""
    root = Path(data_dir)
    manifest = root / "splits.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"--data {root}: no splits.jsonl there; pass a folder made by `sdxs data emoji`")
    items = []
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path = root / row["file_name"]
            caption = row["text"][0] if row.get("text") else row["name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{manifest}:{line_no}: not a splits.jsonl row ({e})") from None
        if not path.is_file():
            raise FileNotFoundError(f"{manifest}:{line_no}: image {path} does not exist")
        holdout = str(row.get("holdout") or "").replace("_", " ")
        items.append(EmojiItem(len(items), path, row.get("split", "train"), holdout, row.get("name", ""), caption))
    if not items:
        raise ValueError(f"{manifest} has no rows")
    return items


def load_image01(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """An image composited on white as float32 (H, W, 3) in [0, 1]; box-resized to `size` x `size` if given."""
    from sdxs.pipeline import load_rgb_image

    image = load_rgb_image(str(path))
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), PIL.Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def pick_subset(items: Sequence[EmojiItem], n: int | None, seed: int) -> list[EmojiItem]:
    """A fixed random subset of size `n` (all items when `n` is None or larger), kept in dataset order."""
    if n is None or n >= len(items):
        return list(items)
    chosen = random.Random(seed).sample(range(len(items)), n)
    return [items[i] for i in sorted(chosen)]


# ----------------------------------------------------------------------------------------------------------------
# Retrieval feature space (no network): CIELAB thumbnail + CIELAB colour histogram, cosine similarity
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Model runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Sampling settings shared by every generated image (recorded in the report)."""

    steps: int = 40
    guidance: float = 4.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 16


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _generate(pipe, n: int, gen: GenerationSettings, conditioning, progress=None) -> list:
    """Generate `n` images in batches; `conditioning(start, end)` gives the prompt kwargs of images start..end-1.

    Image `i` uses seed `gen.seed + i` whatever the batch size.
    """
    images = []
    for start, end in _batches(n, gen.batch_size):
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


def _stack_same_size(images: Sequence[np.ndarray], multiple: int = 16) -> np.ndarray:
    """(B, H, W, 3) from same-size images whose sides are multiples of `multiple` (the decoder factor)."""
    shapes = {im.shape for im in images}
    if len(shapes) != 1 or any(side % multiple for side in images[0].shape[:2]):
        raise ValueError(
            f"the VAE eval needs same-size images with sides that are multiples of {multiple} "
            f"(the emoji set is 256x256); got sizes {sorted(s[:2] for s in shapes)}"
        )
    return np.stack(images)


@dataclass
class VAEResult:
    """Mean metrics of one image set for the VAE and the bicubic baseline, plus raw features of the reconstructions."""

    label: str
    count: int
    rows: dict[str, dict[str, float]]  # "VAE" / "bicubic" -> {"MSE": .., "PSNR": .., "Edge": .., "KL": ..}
    psnr_wins: int = 0  # images whose VAE reconstruction has the higher PSNR of the two
    recon_features: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # name -> (count, D)


def evaluate_vae(
    pipe, items: Sequence[EmojiItem], label: str, batch_size: int, progress=None, resolution: int | None = None
) -> VAEResult:
    """The R/2 -> R reconstruction of each image (decoder factor / encoder factor = 2) against bicubic 2x.

    `resolution` R is the target side (the images are box-resized to it first; None: their own size)."""
    import torch

    from sdxs.pipeline import normalize_latents

    vae = pipe.vae
    ratio = pipe.vae_scale_factor // pipe.vae_encoder_scale_factor  # 2: the decoder's extra upsampling
    if ratio != 2:
        raise ValueError(
            f"the VAE eval needs a 2x asymmetric VAE (decoder factor = 2 x encoder's); this one is {ratio}x"
        )
    sums: dict[str, dict[str, float]] = {"VAE": {}, "bicubic": {}}
    feats: dict[str, list[np.ndarray]] = {"VAE": [], "bicubic": []}
    wins = 0
    for start, end in _batches(len(items), batch_size):
        target = torch.from_numpy(_stack_same_size([load_image01(it.path, resolution) for it in items[start:end]]))
        target = target.permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]
        small = downsample2x(target)  # (B, 3, H/2, W/2) in [0, 1]
        with torch.no_grad():
            posterior = vae.encode((small * 2 - 1).to(vae.device, vae.dtype)).latent_dist
            # the pipeline's own latent space (per-channel latents_mean/std when the VAE config has them)
            decoded = pipe._vae_decode(normalize_latents(posterior.mode(), vae))  # [-1, 1], float32
        outputs = {"VAE": ((decoded.cpu() + 1) / 2).clamp(0, 1), "bicubic": bicubic_upscale2x(small)}
        kl = kl_per_image(posterior.mean.float().cpu(), posterior.logvar.float().cpu())
        mses = {name: mse_per_image(out, target) for name, out in outputs.items()}
        wins += int((mses["VAE"] < mses["bicubic"]).sum())
        for name, out in outputs.items():
            mse = mses[name]
            per_image = {"MSE": mse, "PSNR": psnr_from_mse(mse), "Edge": edge_error_per_image(out, target)}
            if name == "VAE":
                per_image["KL"] = kl
            for metric, values in per_image.items():
                sums[name][metric] = sums[name].get(metric, 0.0) + float(values.sum())
            feats[name] += [thumbnail_features(im) for im in out.permute(0, 2, 3, 1).numpy()]
        if progress is not None:
            progress.update(end - start)
    rows = {name: {m: s / len(items) for m, s in metrics.items()} for name, metrics in sums.items()}
    return VAEResult(label, len(items), rows, wins, {k: np.stack(v) for k, v in feats.items()})


# ----------------------------------------------------------------------------------------------------------------
# Sample grid
# ----------------------------------------------------------------------------------------------------------------


def save_small_png(image: PIL.Image.Image, path: Path, max_bytes: int = GRID_MAX_BYTES) -> int:
    """Save as PNG; if larger than `max_bytes`, as a 256-colour palette PNG instead. Returns the size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.quantize(256, method=PIL.Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Every number of the report (also returned by `evaluate` for tests and scripts)."""

    vae: list[VAEResult]
    prompts: list[RetrievalResult]
    oracle: list[RetrievalResult]
    image_prompts: list[RetrievalResult]
    refine: list[tuple[str, str]]
    grid_path: Path | None
    markdown_path: Path
    gallery_size: int
    strict: eval_strict.StrictResult | None = None
    strict_grid_path: Path | None = None


def evaluate(
    model,
    data_dir: str | os.PathLike,
    out_md: str | os.PathLike = "docs/eval.md",
    grid_path: str | os.PathLike | None = "media/eval-grid.png",
    steps: int = 40,
    guidance: float = 4.0,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 16,
    train_captions: int = 200,
    vae_train_images: int = 200,
    image_prompts: int = 100,
    limit: int | None = None,
    refine_prompts: Sequence[str] = DEFAULT_REFINE_PROMPTS,
    refine_max_new_tokens: int = 80,
    grid_images: int = 16,
    strict_per_kind: int = 24,
    device: str = "auto",
    dtype: str = "auto",
    command: str | None = None,
    progress: bool = True,
) -> EvalResult:
    r"""
    Evaluate a model on an emoji-format dataset and write the Markdown report `out_md` (plus the sample grid).

    Args:
        model (`str` or `SDXSPipeline`): a model folder / hub id (loaded with `trust_remote_code=True`) or a loaded
            pipeline (used as is; `device` and `dtype` are then ignored).
        data_dir (`str` or `os.PathLike`): a folder made by `sdxs data emoji` (splits.jsonl, train/, validation/).
        out_md (`str` or `os.PathLike`): the report to write.
        grid_path (`str` or `os.PathLike`, *optional*): the labelled sample grid PNG; `None` writes none.
        steps, guidance, seed, width, height: generation settings; image `i` of each group uses seed `seed + i`.
        batch_size (`int`): images per pipeline call and per VAE pass.
        train_captions (`int`): size of the fixed random subset of training captions for prompt fidelity.
        vae_train_images (`int`): training images in the VAE table besides the validation split (0: none).
        image_prompts (`int`): source images per split (training subset, validation) for the image-prompt test.
        limit (`int`, *optional*): cap on every group's size, for a quick run.
        refine_prompts (`Sequence[str]`): short prompts for the `refine_prompts` table (empty: skip the section).
        refine_max_new_tokens (`int`): length limit of each refined prompt.
        grid_images (`int`): generated images shown in the grid.
        strict_per_kind (`int`): training emoji per kind in the strict section (0: skip it); its bare-name grid
            is written beside `grid_path` as `*-strict.png`.
        device, dtype (`str`): as in the CLI (`auto` picks CUDA/MPS/CPU and bf16/fp16/fp32).
        command (`str`, *optional*): the command line recorded in the report.
        progress (`bool`): show progress: a tqdm bar on a terminal, a plain line a minute in logs and pipes.

    Returns:
        [`EvalResult`]: every number in the report.
    """
    import torch
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"`steps` and `batch_size` must be >= 1, got steps={steps}, batch_size={batch_size}")
    items = load_emoji_dataset(data_dir)
    pipe, model_name = load_eval_pipeline(model, device, dtype, progress and sys.stderr.isatty())
    gen = GenerationSettings(steps, guidance, seed, width, height, batch_size)
    vae_res = int(pipe.config.default_width)  # the VAE table's target side: the model's native output size

    def cap(n: int | None) -> int | None:
        return n if limit is None else min(limit, n if n is not None else limit)

    train = [it for it in items if it.split == "train"]
    validation = [it for it in items if it.split != "train"]
    caption_set = pick_subset(train, cap(train_captions), seed)
    prompt_groups = {
        f"training captions (random {len(caption_set)} of {len(train)})": caption_set,
        "held-out emoji": pick_subset([it for it in items if it.holdout == HOLDOUT_EMOJI], cap(None), seed),
        "held-out skin-tone variants": pick_subset([it for it in items if it.holdout == HOLDOUT_TONE], cap(None), seed),
    }
    vae_sets = {"validation": pick_subset(validation, cap(None), seed)}
    if vae_train_images and cap(vae_train_images):
        vae_sets["training"] = pick_subset(train, cap(vae_train_images), seed + 1)
    image_sets = {
        "training images": pick_subset(caption_set, cap(image_prompts), seed + 2),
        "validation images": pick_subset(validation, cap(image_prompts), seed + 2),
    }
    image_sets = {k: v for k, v in image_sets.items() if v}

    total = len(items) + sum(map(len, vae_sets.values()))
    total += sum(map(len, prompt_groups.values())) + sum(map(len, image_sets.values()))
    if progress and not sys.stderr.isatty():  # logs and pipes: plain lines, not a bar redrawn with \r
        bar = LogProgress(total, "eval", "img")
    else:
        bar = tqdm(total=total, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    pipe.set_progress_bar_config(disable=True)

    # 1. The retrieval gallery: every dataset image (train + validation)
    bar.set_postfix_str("gallery")
    index = RetrievalIndex(gallery_features([it.path for it in items], progress=bar))

    # 2. VAE reconstruction vs bicubic; the reconstructions also give the feature space's ceiling
    vae_results, oracle = [], []
    for label, subset in vae_sets.items():
        bar.set_postfix_str(f"vae {label}")
        result = evaluate_vae(pipe, subset, label, batch_size, bar, resolution=vae_res)
        vae_results.append(result)
        targets = [it.index for it in subset]
        for name, feats in result.recon_features.items():
            oracle.append(
                RetrievalResult(
                    f"{label} images, {name} {vae_res // 2} -> {vae_res}", index.ranks(feats, targets), len(index)
                )
            )

    # 3. Prompt fidelity
    prompt_results, samples = [], []
    for label, group in prompt_groups.items():
        if not group:
            continue
        bar.set_postfix_str(label.split(" (")[0])
        images = generate_from_prompts(pipe, [it.caption for it in group], gen, bar)
        ranks = index.ranks(np.stack([thumbnail_features(im) for im in images]), [it.index for it in group])
        prompt_results.append(RetrievalResult(label, ranks, len(index)))
        samples.append([(im, it.caption) for im, it in zip(images, group, strict=True)])

    # 4. Image prompts
    image_results = []
    for label, group in image_sets.items():
        bar.set_postfix_str(label)
        images = generate_from_images(pipe, [it.path for it in group], gen, bar)
        ranks = index.ranks(np.stack([thumbnail_features(im) for im in images]), [it.index for it in group])
        image_results.append(RetrievalResult(label, ranks, len(index)))

    # 5. refine_prompts
    refine = []
    if refine_prompts:
        refined = pipe.refine_prompts(list(refine_prompts), max_new_tokens=refine_max_new_tokens, seed=seed)
        refine = list(zip(refine_prompts, refined, strict=True))

    # 6. Strict, per-kind pixel retrieval (bare names and exact captions)
    strict, strict_grid = None, None
    if strict_per_kind and cap(strict_per_kind):
        n = cap(strict_per_kind)
        strict = eval_strict.strict_eval(
            eval_strict.load_renders(data_dir),
            lambda prompts: generate_from_prompts(pipe, prompts, gen),
            lambda paths: generate_from_images(pipe, paths, gen),
            (lambda prompts: pipe.refine_prompts(prompts, seed=seed)) if refine_prompts else None,
            per_kind=n,
            held_out=cap(60),
            image_prompts=cap(48),
            refine_per_kind=max(1, n // 3),
            seed=seed,
            progress=bar,
        )
        if grid_path is not None and strict.grid:
            strict_grid = Path(grid_path).with_name(Path(grid_path).stem + "-strict.png")
            strict_grid.parent.mkdir(parents=True, exist_ok=True)
            save_small_png(
                make_grid([im for im, _ in strict.grid], [p for _, p in strict.grid], columns=6), strict_grid
            )
    bar.close()

    # 7. Sample grid and report
    out_md = Path(out_md)
    grid = Path(grid_path) if grid_path is not None else None
    if grid is not None and samples:
        picked = _interleave(samples, grid_images)
        save_small_png(make_grid([im for im, _ in picked], [c for _, c in picked]), grid)
    elif grid is not None:
        grid = None
    result = EvalResult(
        vae_results, prompt_results, oracle, image_results, refine, grid, out_md, len(index), strict, strict_grid
    )
    settings = {
        "model": model_name,
        "data": str(data_dir),
        "command": command or "evaluate(...) from Python",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": describe_hardware(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "size": f"{width or pipe.config.default_width}x{height or pipe.config.default_height}",
        "vae_resolution": vae_res,
        "vae_factors": (int(pipe.vae_encoder_scale_factor), int(pipe.vae_scale_factor)),
        "gen": gen,
        "refine_max_new_tokens": refine_max_new_tokens,
        "versions": f"torch {torch.__version__}, diffusers {_version('diffusers')}, "
        f"transformers {_version('transformers')}",
    }
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render_markdown(result, settings), encoding="utf-8")
    return result


def _interleave(groups: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """Up to `n` items taken round-robin from the groups, so every group shows in the grid."""
    picked, i = [], 0
    while len(picked) < n and any(i < len(g) for g in groups):
        picked += [g[i] for g in groups if i < len(g)]
        i += 1
    return picked[:n]


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

    from sdxs.cli import pick_device, pick_dtype, resolve_model

    folder = resolve_model(None if model is None else os.fspath(model))
    device = pick_device(device)
    if not progress:  # loading bars would clutter logs; the eval's own bar is enough
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=pick_dtype(dtype, device), trust_remote_code=True)
    return pipe.to(device), folder


def describe_hardware(device) -> str:
    """The accelerator (if any), the CPU and its core count, e.g. "NVIDIA H100 (cuda); CPU: ... x16"."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = []
    device = torch.device(device)
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} (cuda)")
    elif device.type != "cpu":
        parts.append(device.type)
    parts.append(f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    return "; ".join(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def _fmt_metrics(row: dict[str, float]) -> str:
    parts = [f"MSE={row['MSE']:.3e}", f"PSNR={row['PSNR']:.2f}", f"Edge={row['Edge']:.3f}"]
    if "KL" in row:
        parts.append(f"KL={row['KL']:.3f}")
    return " ".join(parts)


def _retrieval_table(results: Sequence[RetrievalResult], first_column: str) -> list[str]:
    head = [f"| {first_column} | n | " + " | ".join(f"top-{k}" for k in TOP_K) + " | chance top-1 / top-5 |"]
    head.append("|---|---:|" + "---:|" * len(TOP_K) + "---:|")
    for r in results:
        chance = " / ".join(f"{chance_percent(k, r.gallery_size):.2f}%" for k in TOP_K)
        tops = " | ".join(f"{r.top(k):.1f}%" for k in TOP_K)
        head.append(f"| {_cell(r.label)} | {r.count} | {tops} | {chance} |")
    return head


def render_markdown(result: EvalResult, settings: dict[str, Any]) -> str:
    """The report: settings, then one section per measurement, with a link to docs/eval-method.md."""
    gen: GenerationSettings = settings["gen"]
    res = settings.get("vae_resolution", 256)
    enc_f, dec_f = settings.get("vae_factors", (8, 16))
    md_dir = result.markdown_path.parent
    lines = [
        "# SDXS evaluation",
        "",
        "Written by `sdxs eval`; how each number is computed: [eval-method.md](eval-method.md).",
        "",
        f"- date: {settings['date']}",
        f"- model: `{settings['model']}`",
        f"- data: `{settings['data']}` ({result.gallery_size} images)",
        f"- command: `{settings['command']}`",
        f"- hardware: {settings['hardware']}",
        f"- software: {settings['versions']}",
        f"- generation: {gen.steps} steps, guidance {gen.guidance}, {settings['size']} px, {settings['dtype']}, "
        f"seed {gen.seed} + i for image i of each group, batch size {gen.batch_size}",
        "",
        f"## VAE: {res // 2} -> {res} reconstruction",
        "",
        f"Each image is box-resized to {res} px (the model's output size; the emoji files are 256 px), "
        f"box-downsampled to {res // 2} px, then either encoded ({enc_f}x) and decoded ({dec_f}x) by the VAE or "
        f"upscaled 2x bicubic; both are compared with the {res} px image (pixels in [0, 1]). KL only applies to "
        "the VAE.",
        "",
    ]
    for v in result.vae:
        lines += [f"{v.label} split, {v.count} images:", "", "```"]
        lines += [f"{name} | {_fmt_metrics(row)}" for name, row in v.rows.items()]
        lines += ["```", "", f"The VAE's PSNR is the higher of the two on {v.psnr_wins} of the {v.count} images.", ""]
    lines += [
        "## Prompt fidelity",
        "",
        f"Each first caption line is generated once; the image then retrieves its nearest neighbours among all "
        f"{result.gallery_size} dataset images (train + validation) in the thumbnail feature space. A hit is the "
        "prompted emoji's own image within the top k.",
        "",
        *_retrieval_table(result.prompts, "captions"),
        "",
        f"Ceiling of the feature space: the dataset's own images, reconstructed {res // 2} -> {res}, retrieving the "
        "original.",
        "",
        *_retrieval_table(result.oracle, "queries"),
        "",
        "## Image prompts",
        "",
        "`encode_image` of a dataset image, generation from that embedding, retrieval of the source image.",
        "",
        *_retrieval_table(result.image_prompts, "source images"),
        "",
    ]
    if result.refine:
        lines += [
            "## refine_prompts",
            "",
            f"`pipe.refine_prompts(prompts, max_new_tokens={settings['refine_max_new_tokens']}, seed={gen.seed})`",
            "",
            "| input | output |",
            "|---|---|",
            *[f"| {_cell(a)} | {_cell(b)} |" for a, b in result.refine],
            "",
        ]
    if result.strict is not None:
        st = result.strict
        lines += [
            "## Strict prompt fidelity, per kind",
            "",
            "Each generation and every dataset render are composited on white and box-downsampled to 32x32; the "
            f"{result.gallery_size} renders are ranked by L2 distance and a hit is the prompted emoji within the top k "
            f"(chance {100 / result.gallery_size:.2f}% top-1). Bare names are what a user types (`red apple`); exact "
            "captions add the dataset's `, 3d render`. Nearest-render distance: RMS per pixel to the nearest render "
            "(renders are a median ~0.17 apart); edge energy: Sobel energy of the generation over the retrieved "
            "render's (blur < 1 < blotchy). Method: `sdxs/eval_strict.py`.",
            "",
            eval_strict.markdown_table(st.scores),
            "",
        ]
        if st.refine_kept is not None:
            lines += [
                f"`refine_prompts` of bare training names keeps the named emoji in {st.refine_kept:.1f}% of "
                f"{len(st.refine_examples)} prompts (rows 'refine set'). Examples:",
                "",
                "| bare name | refined |",
                "|---|---|",
                *[f"| {_cell(a)} | {_cell(b)} |" for a, b in st.refine_examples[:8]],
                "",
            ]
        if result.strict_grid_path is not None:
            rel = os.path.relpath(result.strict_grid_path.resolve(), md_dir.resolve()).replace(os.sep, "/")
            lines += ["Bare-name generations across kinds:", "", f"![bare names]({rel})", ""]
    if result.grid_path is not None:
        rel = os.path.relpath(result.grid_path.resolve(), md_dir.resolve()).replace(os.sep, "/")
        lines += [
            "## Samples",
            "",
            "Generated images of the prompt-fidelity groups (taken in turn), captioned with their prompt.",
            "",
            f"![sample grid]({rel})",
            "",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add `sdxs eval` to the top-level `sdxs` subparsers."""
    from sdxs.cli import DEVICES, DTYPES, positive_int, seed_int

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on the emoji dataset and write docs/eval.md",
        description="VAE reconstruction, prompt fidelity, image prompts and refine_prompts on an emoji-format dataset "
        "(see docs/eval-method.md); writes a Markdown report and a sample grid.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", metavar="FOLDER", help="model folder or hub id (default: $SDXS_MODEL, else the repo root)"
    )
    p.add_argument("--data", default="data/emoji", help="folder made by `sdxs data emoji` (default: data/emoji)")
    p.add_argument("--out", default="docs/eval.md", help="report path (default: docs/eval.md)")
    p.add_argument("--grid", default="media/eval-grid.png", help="sample grid PNG (default: media/eval-grid.png)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda, then mps, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bf16/fp16 on GPUs, fp32 on cpu")
    p.add_argument("--steps", type=positive_int, default=40, help="denoising steps (default: 40)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default: 4)")
    p.add_argument("--seed", type=seed_int, default=0, help="subset choice and generation seeds (default: 0)")
    p.add_argument("--width", type=positive_int, help="generated width (default: the model's)")
    p.add_argument("--height", type=positive_int, help="generated height (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call (default: 16)")
    p.add_argument("--train-captions", type=positive_int, default=200, help="training captions to test (default: 200)")
    p.add_argument(
        "--vae-train-images", type=int, default=200, help="training images in the VAE table; 0: none (default: 200)"
    )
    p.add_argument("--image-prompts", type=positive_int, default=100, help="source images per split (default: 100)")
    p.add_argument("--limit", type=positive_int, help="cap every group at this many images (a quick run)")
    p.add_argument("--refine", nargs="*", metavar="PROMPT", help="prompts for the refine table (none: skip it)")
    p.add_argument("--refine-max-new-tokens", type=positive_int, default=80, help="(default: 80)")
    p.add_argument(
        "--strict-per-kind", type=int, default=24, help="training emoji per kind, strict section; 0: skip (default: 24)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `evaluate` with the command's flags and print where the report went."""
    from sdxs.cli import _quiet_libraries

    if args.vae_train_images < 0:
        raise ValueError(f"--vae-train-images must be >= 0, got {args.vae_train_images}")
    _quiet_libraries(False)
    result = evaluate(
        args.model,
        args.data,
        out_md=args.out,
        grid_path=args.grid,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        train_captions=args.train_captions,
        vae_train_images=args.vae_train_images,
        image_prompts=args.image_prompts,
        limit=args.limit,
        refine_prompts=DEFAULT_REFINE_PROMPTS if args.refine is None else args.refine,
        refine_max_new_tokens=args.refine_max_new_tokens,
        strict_per_kind=args.strict_per_kind,
        device=args.device,
        dtype=args.dtype,
        command=shlex.join(["sdxs", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None,
        progress=not args.quiet,
    )
    print(result.markdown_path)
    if result.grid_path is not None:
        print(result.grid_path)
    if result.strict_grid_path is not None:
        print(result.strict_grid_path)
    return 0
