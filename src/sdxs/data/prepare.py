"""`sdxs prepare`: a folder of image–caption pairs -> a latent cache (see `sdxs.data.shards` for the format).

Each image is encoded once by the VAE encoder and each caption once by the text encoder, with the pipeline's own
`encode_text` and `load_rgb_image`, so training reads small tensors and cannot drift from inference.

    manifest = prepare("photos/", "cache/", model="path/to/model")     # or pipe=an SDXSPipeline in memory

Only the VAE, the text encoder and the tokenizer are loaded, never the UNet. The work is split in shards of one
bucket each; a shard is written with temp file + rename, so a rerun skips every finished shard and a crash never
leaves half a shard. `num_shards` / `shard_index` split the files over machines (interleaved by sorted path);
`merge` combines their manifests.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import torch

from sdxs.data.buckets import cover_scale, default_buckets, make_buckets, nearest_bucket, resize_and_crop
from sdxs.data.fingerprint import compare_fingerprints, model_fingerprint
from sdxs.data.folder import FolderItem, scan_folder
from sdxs.data.shards import (
    CACHE_FORMAT,
    CACHE_VERSION,
    EMPTY_PROMPT_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    atomic_save,
    partial_manifest_name,
    read_shard_meta,
    shard_name,
    to_storage,
)
from sdxs.files import write_json
from sdxs.model_folder import load_component
from sdxs.pipeline import (
    encode_text,
    image_processor_from_tokenizer,
    latent_statistics,
    load_rgb_image,
    normalize_latents,
    unet_size_multiple,
    vae_scale_factors,
)

# ----------------------------------------------------------------------------------------------------------------
# The encoders
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Encoders:
    """What prepare needs from a model: VAE, text encoder, tokenizer, text recipe and the size facts."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_recipe: dict[str, Any]
    default_size: tuple[int, int]  # (width, height) the model generates by default
    size_step: int  # output sides must be multiples of this (decoder factor * UNet multiple)
    source: str
    vision_processor: Any = None  # the text encoder's image processor (for `image_embeds`); None when absent

    @property
    def scale_factors(self) -> tuple[int, int]:
        return vae_scale_factors(self.vae)

    @classmethod
    def from_pipeline(cls, pipe) -> Encoders:
        """Borrow the encoders of an in-memory SDXSPipeline (used as they are: no device or dtype change)."""
        cfg = pipe.config
        return cls(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_recipe=dict(cfg.text_recipe),
            default_size=(int(cfg.default_width), int(cfg.default_height)),
            size_step=int(pipe.size_step),
            source=f"in-memory {type(pipe).__name__}",
            vision_processor=getattr(pipe, "vision_processor", None),
        )

    @classmethod
    def from_folder(cls, model: str | os.PathLike, dtype: torch.dtype | None = None) -> Encoders:
        """Load vae/, text_encoder/ and tokenizer/ of a model folder with the classes model_index.json names."""
        from sdxs.pipeline import DEFAULT_TEXT_RECIPE

        folder = Path(model)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"`model` {str(folder)!r} has no model_index.json: pass an exported SDXS model folder (hub layout)."
            )
        index = json.loads(index_path.read_text())
        vae = load_component(folder, "vae", index).to(dtype=torch.float32).eval()
        text_encoder = load_component(folder, "text_encoder", index).eval()
        if dtype is not None:
            text_encoder = text_encoder.to(dtype=dtype)
        tokenizer = load_component(folder, "tokenizer", index)
        has_vision = (index.get("vision_processor") or [None])[0] is not None and (folder / "vision_processor").is_dir()
        vision_processor = load_component(folder, "vision_processor", index) if has_vision else None
        if vision_processor is None:  # the published layout keeps the image processor in tokenizer/
            vision_processor = image_processor_from_tokenizer(tokenizer)
        # the UNet's *config* (not its weights) gives the size multiple
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        multiple = unet_size_multiple(SimpleNamespace(config=SimpleNamespace(**unet_config)))
        dec = vae_scale_factors(vae)[1]
        side = int(unet_config.get("sample_size", 64)) * dec
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_recipe={**DEFAULT_TEXT_RECIPE, **(index.get("text_recipe") or {})},
            default_size=(int(index.get("default_width") or side), int(index.get("default_height") or side)),
            size_step=dec * multiple,
            source=str(folder.resolve()),
            vision_processor=vision_processor,
        )


# ----------------------------------------------------------------------------------------------------------------
# Planning: which image goes to which bucket and shard
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    name: str  # relative path of the shard file
    bucket: tuple[int, int]  # (width, height) at output resolution
    items: list[FolderItem]


def probe_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the file header only (no pixel decoding)."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with PIL.Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except PIL.UnidentifiedImageError as e:
        raise ValueError(f"not a readable image ({e})") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def assign_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], ratio: int, max_upscale: float | None
) -> tuple[int, int]:
    """The bucket for an image of `size`; `ValueError` "too small" when the encoder input would need upscaling
    by more than `max_upscale` (None: any upscale is allowed). `ratio` = decoder / encoder factor."""
    bucket = nearest_bucket(*size, buckets)
    encoder_size = (bucket[0] // ratio, bucket[1] // ratio)
    scale = cover_scale(*size, encoder_size)
    if max_upscale is not None and scale > max_upscale:
        raise ValueError(
            f"too small: {size[0]}x{size[1]} for bucket {bucket[0]}x{bucket[1]}, whose encoder input is "
            f"{encoder_size[0]}x{encoder_size[1]} (would upscale {scale:.2f}x > max_upscale {max_upscale}); "
            "pass allow_upscale to keep it"
        )
    return bucket


def plan_shards(
    items: list[FolderItem], sizes: dict[str, tuple[int, int]], shard_size: int, worker: int
) -> list[ShardPlan]:
    """Group items by bucket (sorted by path) and cut each bucket into shards of at most `shard_size` images."""
    by_bucket: dict[tuple[int, int], list[FolderItem]] = {}
    for item in items:
        by_bucket.setdefault(sizes[item.rel], []).append(item)
    plans = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        for part, start in enumerate(range(0, len(group), shard_size)):
            plans.append(ShardPlan(shard_name(bucket, worker, part), bucket, group[start : start + shard_size]))
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Encoding one shard
# ----------------------------------------------------------------------------------------------------------------


def load_pixels(item: FolderItem, encoder_size: tuple[int, int], background: tuple[int, int, int]) -> np.ndarray:
    """The image as uint8 (H, W, 3) at the encoder input size: RGB conversion, Lanczos resize, centre crop."""
    image = load_rgb_image(item.path, background=background)
    return np.asarray(resize_and_crop(image, encoder_size), dtype=np.uint8)


def _try_load(item, encoder_size, background):
    try:
        return load_pixels(item, encoder_size, background), None
    except Exception as e:  # one bad file must never stop the run: it is skipped with its reason
        return None, _reason(e)


def _reason(e: Exception) -> str:
    """A one-line skip reason; load_rgb_image's ValueError already reads "... is not a readable image (...)"."""
    if isinstance(e, ValueError):
        return str(e)
    return f"unreadable image ({type(e).__name__}: {e})"


@torch.inference_mode()
def encode_captions(enc: Encoders, captions: list[str], batch_size: int, device: torch.device):
    """encode_text in batches -> embeds (K, 1+L, D), mask (K, 1+L) on the CPU."""
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        e, m = encode_text(
            enc.text_encoder, enc.tokenizer, captions[start : start + batch_size], enc.text_recipe, device
        )
        embeds.append(e.float().cpu())
        masks.append(m.cpu())
    return torch.cat(embeds), torch.cat(masks)


@torch.inference_mode()
def encode_images(enc: Encoders, images: list[PIL.Image.Image], device: torch.device):
    """The pipeline's `encode_image` of each image -> embeds (N, 1+L, D), mask (N, 1+L) on the CPU.

    The same layout as caption embeddings, so the UNet trainer can use them in place of a caption (image prompts).
    """
    from sdxs.pipeline import encode_images as encode_pipeline_images

    if enc.vision_processor is None:
        raise ValueError(
            "`image_embeds` needs the model's vision_processor (a model folder with vision_processor/ and a text "
            "encoder with a vision tower)."
        )
    embeds, masks = encode_pipeline_images(
        enc.text_encoder, enc.tokenizer, enc.vision_processor, images, enc.text_recipe, device
    )
    return embeds.float().cpu(), masks.cpu()


@torch.inference_mode()
def encode_latents(vae, pixels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels (B, H, W, 3) -> scaled posterior mean and log-variance, each (B, C, H/8, W/8) float32 on CPU.

    For z = a * (x - m) with x ~ N(mean, exp(logvar)): z ~ N(a * (mean - m), exp(logvar + 2 log a)), where
    a = sf and m = 0, or per channel a = sf / latents_std and m = latents_mean when the VAE config has them (the
    pipeline's `normalize_latents`).
    """
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    posterior = vae.encode(x.to(vae.dtype)).latent_dist
    sf = float(vae.config.scaling_factor)
    mean = normalize_latents(posterior.mean.float(), vae)
    stats = latent_statistics(vae)
    if stats is None:
        log_scale = 2 * math.log(sf)
    else:
        log_scale = 2 * torch.log(sf / torch.tensor(stats[1], dtype=torch.float32, device=mean.device)).view(
            1, -1, 1, 1
        )
    return mean.cpu(), (posterior.logvar.float() + log_scale).cpu()


def _encode_batch(vae, batch: list[np.ndarray], device, means: list, logvars: list) -> None:
    mean, logvar = encode_latents(vae, np.stack(batch), device)
    means.append(mean)
    logvars.append(logvar)
    batch.clear()


def trim_length(mask: torch.Tensor, padding_side: str) -> int:
    """Columns to keep: up to the last real token with right padding; everything with left padding."""
    if padding_side != "right":
        return mask.shape[1]
    return int(mask.any(0).nonzero().max()) + 1


def encode_shard(
    enc: Encoders,
    plan: ShardPlan,
    device: torch.device,
    batch_size: int,
    background: tuple[int, int, int],
    storage_dtype: torch.dtype,
    offload_text_encoder: bool,
    pool: ThreadPoolExecutor,
    progress=None,
    image_embeds: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode one planned shard -> (tensors, metadata without fingerprint/options)."""
    ratio = enc.scale_factors[1] // enc.scale_factors[0]
    encoder_size = (plan.bucket[0] // ratio, plan.bucket[1] // ratio)
    # images decode in background threads while the text encoder runs
    loaded = pool.map(lambda it: _try_load(it, encoder_size, background), plan.items)

    captions = [c for item in plan.items for c in item.captions]
    _to(enc.text_encoder, device, offload_text_encoder)
    embeds, mask = encode_captions(enc, captions, batch_size, device)  # (K, 1+L, D), (K, 1+L)
    if offload_text_encoder:
        _to(enc.text_encoder, torch.device("cpu"), True)  # free the accelerator for the VAE pass

    kept, skipped, batch, means, logvars = [], [], [], [], []
    for item, (pixels, reason) in zip(plan.items, loaded, strict=True):
        if reason is not None:
            skipped.append([item.rel, reason])
        else:
            kept.append(item)
            batch.append(pixels)
        if len(batch) == batch_size:
            _encode_batch(enc.vae, batch, device, means, logvars)
        if progress is not None:
            progress.update(1)
    if batch:
        _encode_batch(enc.vae, batch, device, means, logvars)

    # keep the caption rows of written images only; offsets index them per image
    keep_rows, offsets, row = [], [0], 0
    kept_set = {it.rel for it in kept}
    for item in plan.items:
        n = len(item.captions)
        if item.rel in kept_set:
            keep_rows += range(row, row + n)
            offsets.append(offsets[-1] + n)
        row += n
    embeds, mask = embeds[keep_rows], mask[keep_rows]
    length = trim_length(mask, enc.text_recipe["padding_side"]) if len(keep_rows) else 1
    c, (h, w) = (
        int(enc.vae.config.latent_channels),
        (encoder_size[1] // enc.scale_factors[0], encoder_size[0] // enc.scale_factors[0]),
    )
    empty = torch.zeros(0, c, h, w)
    tensors = {
        "latents_mean": to_storage(torch.cat(means) if means else empty, storage_dtype),
        "latents_logvar": to_storage(torch.cat(logvars) if logvars else empty, storage_dtype),
        "embeds": to_storage(embeds[:, :length], storage_dtype),
        "mask": mask[:, :length].to(torch.uint8).contiguous(),
        "caption_offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    if image_embeds:  # encode_image of each written image at its own size (as a user's image prompt is encoded)
        _to(enc.text_encoder, device, offload_text_encoder)
        if kept:
            images = [load_rgb_image(it.path, background=background) for it in kept]
            img_embeds, img_mask = encode_images(enc, images, device)
        else:
            d = int(embeds.shape[-1])
            img_embeds, img_mask = torch.zeros(0, 1, d), torch.zeros(0, 1, dtype=torch.long)
        if offload_text_encoder:
            _to(enc.text_encoder, torch.device("cpu"), True)
        img_length = trim_length(img_mask, enc.text_recipe["padding_side"]) if kept else 1
        tensors["image_embeds"] = to_storage(img_embeds[:, :img_length], storage_dtype)
        tensors["image_mask"] = img_mask[:, :img_length].to(torch.uint8).contiguous()
    meta = {
        "bucket": list(plan.bucket),
        "inputs": [it.rel for it in plan.items],
        "files": [it.rel for it in kept],
        "captions": [it.captions for it in kept],
        "skipped": skipped,
    }
    return tensors, meta


def _to(module, device: torch.device, enabled: bool) -> None:
    if enabled and module.device != device:
        module.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------------------


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    pipe=None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    min_side: int | None = None,
    max_side: int | None = None,
    step: int | None = None,
    max_area: int | None = None,
    allow_upscale: bool = False,
    max_upscale: float = 1.25,
    background: tuple[int, int, int] = (255, 255, 255),
    caption_column: str = "text",
    shard_size: int = 512,
    num_shards: int = 1,
    shard_index: int = 0,
    offload_text_encoder: bool = False,
    storage_dtype: torch.dtype = torch.float16,
    num_workers: int = 2,
    progress: bool = True,
    stop_after_shards: int | None = None,
    image_embeds: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    r"""
    Encode the images and captions under `src` into a latent cache in `out`.

    Args:
        src: folder of images with captions (`.txt` sidecars or metadata.jsonl/csv, see `scan_folder`).
        out: cache folder; reruns resume (finished shards are kept, the rest is made).
        model: an exported SDXS model folder; only vae/, text_encoder/ and tokenizer/ are loaded.
        pipe: an in-memory SDXSPipeline instead of `model` (used as it is: no device or dtype change).
        batch_size: images (and captions) per encoder forward pass.
        device: "cpu", "cuda", ...; default: CUDA when available.
        dtype: text-encoder dtype when loading `model` (default: bfloat16 on CUDA, float32 on CPU); the VAE
            encoder always runs in float32 (latents are the training target; the encoder is cheap).
        min_side, max_side, step, max_area: the bucket grid at OUTPUT resolution (see `buckets.make_buckets`);
            defaults from the model: step = decoder factor * UNet multiple, sides and area from its default size.
        allow_upscale: keep images that need more than `max_upscale` upscaling to fill their bucket's encoder input.
        max_upscale: the largest tolerated upscale of an image onto the encoder input (bucket / 2 for 8x/16x).
        background: RGB colour transparent images are composited on.
        caption_column: caption column of metadata.jsonl / metadata.csv.
        shard_size: at most this many images per shard (one bucket per shard).
        num_shards, shard_index: make only this worker's part (every `num_shards`-th file by sorted path) and write
            `manifest.{index}-of-{N}.json`; run `merge` when all parts are done.
        offload_text_encoder: move the text encoder to the CPU during each shard's VAE pass (small GPUs).
        storage_dtype: dtype of latents and embeddings in the shards (float16; bfloat16 where float16 overflows).
        num_workers: threads that decode and resize images.
        progress: show a tqdm bar (images/s).
        stop_after_shards: stop after making this many shards without writing a manifest (tests, time boxes).
        image_embeds: also store the pipeline's `encode_image` embedding of every image (`image_embeds` (N, T, D),
            `image_mask` (N, T) per shard), for UNet training with image prompts (`flow.image_prompt_fraction`).
        overwrite: replace a cache in `out` that was made with another model or other options (its manifests,
            shards and empty prompt; nothing else). Without it such a cache is refused with a `ValueError` before
            anything in `out` is changed: a rerun only ever resumes a cache made with the same model and options.

    Returns:
        The manifest (also written to `out/manifest.json`, or the partial manifest of this worker).
    """
    src, out = Path(src), Path(out)
    _check_args(model, pipe, batch_size, shard_size, num_shards, shard_index, max_upscale)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if pipe is not None:
        enc = Encoders.from_pipeline(pipe)
    else:
        te_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        enc = Encoders.from_folder(model, te_dtype)
        enc.vae.to(device)
        if not offload_text_encoder:
            enc.text_encoder.to(device)
    enc_factor, dec_factor = enc.scale_factors
    ratio = dec_factor // enc_factor

    # 1. Buckets and fingerprint
    step = step or enc.size_step
    if step % enc.size_step:
        raise ValueError(f"`step` {step} must be a multiple of the model's size step {enc.size_step}.")
    d_min, d_max, d_area = default_buckets(enc.default_size, step)
    buckets = make_buckets(min_side or d_min, max_side or d_max, step, max_area or d_area)
    fingerprint = model_fingerprint(enc.vae, enc.text_encoder, enc.text_recipe)
    options = {
        "buckets": [list(b) for b in buckets],
        "allow_upscale": allow_upscale,
        "max_upscale": max_upscale,
        "background": list(background),
        "caption_column": caption_column,
        "shard_size": shard_size,
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
    }
    if image_embeds:  # only when asked, so caches made before this option stay valid
        if enc.vision_processor is None:
            raise ValueError("`image_embeds` needs a model with a vision_processor component and a vision tower.")
        options["image_embeds"] = True

    # 2. This worker's files, their sizes and buckets (file headers only)
    items, scan_skipped = scan_folder(src, caption_column)
    entries = sorted([(it.rel, it) for it in items] + [(_rel(p, src), r) for p, r in scan_skipped], key=lambda e: e[0])
    mine = entries[shard_index::num_shards]
    my_items = [e[1] for e in mine if isinstance(e[1], FolderItem)]
    skipped = [[rel, r] for rel, r in mine if isinstance(r, str)]
    sizes, kept = {}, []
    max_up = None if allow_upscale else max_upscale
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        probed = list(pool.map(_try_probe, [it.path for it in my_items]))
    for item, (size, reason) in zip(my_items, probed, strict=True):
        if reason is None:
            try:
                sizes[item.rel] = assign_bucket(size, buckets, ratio, max_up)
                kept.append(item)
                continue
            except ValueError as e:
                reason = str(e)
        skipped.append([item.rel, reason])
    plans = plan_shards(kept, sizes, shard_size, shard_index)

    # 3. Resume: keep finished shards made with the same model and options; refuse (or, with `overwrite`, clear)
    # a cache made with another model or other options before anything in `out` changes
    _check_existing_cache(out, fingerprint, options, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in plans if not _is_done(out / p.name, p, fingerprint, options)]
    _remove_stale_shards(out, plans, shard_index, num_shards)
    _write_empty_prompt(out, enc, device, fingerprint, storage_dtype, offload_text_encoder)

    # 4. Encode
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(p.items) for p in todo), unit="img", desc="prepare", disable=not progress)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, bar:
        for n, plan in enumerate(todo):
            if stop_after_shards is not None and n >= stop_after_shards:
                return {}
            tensors, meta = encode_shard(
                enc, plan, device, batch_size, background, storage_dtype, offload_text_encoder, pool, bar, image_embeds
            )
            atomic_save(tensors, out / plan.name, {**meta, "fingerprint": fingerprint, "options": options})

    # 5. Manifest
    shard_metas = [(p.name, read_shard_meta(out / p.name)) for p in plans]
    manifest = build_manifest(
        shard_metas, skipped, fingerprint, enc, options, src, num_shards=num_shards, shard_index=shard_index
    )
    name = MANIFEST_NAME if num_shards == 1 else partial_manifest_name(shard_index, num_shards)
    write_json(out / name, manifest, indent=1, sort_keys=False)
    return manifest


def _check_args(model, pipe, batch_size, shard_size, num_shards, shard_index, max_upscale) -> None:
    if (model is None) == (pipe is None):
        raise ValueError("Pass exactly one of `model` (a model folder) and `pipe` (an SDXSPipeline).")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"`batch_size` and `shard_size` must be >= 1, got {batch_size} and {shard_size}.")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"`shard_index` must be in [0, num_shards={num_shards}), got {shard_index}.")
    if max_upscale < 1:
        raise ValueError(f"`max_upscale` must be >= 1 (1 = never upscale), got {max_upscale}.")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _try_probe(path: Path):
    try:
        return probe_size(path), None
    except Exception as e:
        return None, _reason(e)


def _is_done(path: Path, plan: ShardPlan, fingerprint: dict, options: dict) -> bool:
    meta = read_shard_meta(path) if path.exists() else None
    if meta is None:
        return False
    if meta.get("fingerprint") != fingerprint:
        compare_fingerprints(meta.get("fingerprint", {}), fingerprint, where=f"The existing shard {path}")
    return meta.get("options") == options and meta.get("inputs") == [it.rel for it in plan.items]


def _foreign_reason(meta: dict | None, fingerprint: dict, options: dict) -> str | None:
    """Why a cache file's metadata does not belong to a run with `fingerprint` and `options` (None: it does)."""
    if meta is None:
        return "it is not a readable sdxs cache file"
    if meta.get("fingerprint") != fingerprint:
        try:
            compare_fingerprints(meta.get("fingerprint") or {}, fingerprint, where="it")
        except ValueError as e:
            return str(e).split(":")[0]  # "it was made with a different vae and text_encoder"
        return "it was made with a different model fingerprint"
    if "options" in meta and meta["options"] != options:
        differ = sorted(k for k in {*meta["options"], *options} if meta["options"].get(k) != options.get(k))
        return "it was made with other options: " + ", ".join(
            f"{k} {meta['options'].get(k)!r} (now {options.get(k)!r})" for k in differ
        )
    return None


def _cache_files(out: Path) -> list[Path]:
    """The files of a latent cache in `out` (manifests, shards, empty prompt); nothing else in the folder."""
    files = [out / MANIFEST_NAME, *sorted(out.glob("manifest.*-of-*.json")), out / EMPTY_PROMPT_NAME]
    files += sorted((out / SHARD_DIR).glob("*.safetensors"))
    return [f for f in files if f.is_file()]


def _check_existing_cache(out: Path, fingerprint: dict, options: dict, overwrite: bool) -> None:
    """Refuse a cache in `out` made with another model or options (or, with `overwrite`, delete its files)."""
    foreign = []
    for f in _cache_files(out):
        if f.suffix == ".json":
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                meta = None
        else:
            meta = read_shard_meta(f)
        reason = _foreign_reason(meta, fingerprint, options)
        if reason is not None:
            foreign.append((f, reason))
    if not foreign:
        return
    if overwrite:
        for f, _ in foreign:
            f.unlink()
        return
    f, reason = foreign[0]
    raise ValueError(
        f"{out} already holds a latent cache that this run did not make: {f.relative_to(out)} ({len(foreign)} "
        f"file(s) in all) - {reason}. Nothing was changed. Pass --overwrite (overwrite=True) to replace that "
        "cache, or choose another output folder."
    )


def _remove_stale_shards(out: Path, plans: list[ShardPlan], worker: int, num_workers: int = 1) -> None:
    """Delete this worker's shard files that the current plan no longer has (the source folder changed), and the
    temp files a killed run of this worker left (a save is temp file + rename: `.NAME.PID.tmp`).

    Only files made with the same model and options reach here (`_check_existing_cache` runs first). Other workers
    of a `--num-shards` split may be writing into the same folder right now: their temp files are never touched
    (the empty prompt's and manifest.json's are this run's only when it is the folder's one worker)."""
    planned = {p.name for p in plans}
    for f in (out / SHARD_DIR).glob(f"*-{worker:03d}-*.safetensors"):
        if f"{SHARD_DIR}/{f.name}" not in planned:
            f.unlink()
    leftovers = [*(out / SHARD_DIR).glob(f".*-{worker:03d}-*.safetensors.*.tmp")]
    if num_workers == 1:
        leftovers += [*out.glob(f".{MANIFEST_NAME}.*.tmp"), *out.glob(f".{EMPTY_PROMPT_NAME}.*.tmp")]
    else:
        leftovers += [*out.glob(f".{partial_manifest_name(worker, num_workers)}.*.tmp")]
    for f in leftovers:
        f.unlink(missing_ok=True)


def _write_empty_prompt(out, enc, device, fingerprint, storage_dtype, offload) -> None:
    path = out / EMPTY_PROMPT_NAME
    meta = read_shard_meta(path) if path.exists() else None
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return
    _to(enc.text_encoder, device, offload)
    embeds, mask = encode_captions(enc, [""], 1, device)  # (1, 1+L, D), (1, 1+L)
    length = trim_length(mask, enc.text_recipe["padding_side"])
    tensors = {"embeds": to_storage(embeds[:, :length], storage_dtype), "mask": mask[:, :length].to(torch.uint8)}
    atomic_save(tensors, path, {"fingerprint": fingerprint})


# ----------------------------------------------------------------------------------------------------------------
# Manifest and merge
# ----------------------------------------------------------------------------------------------------------------


def build_manifest(shard_metas, skipped, fingerprint, enc: Encoders, options, src, num_shards=1, shard_index=0):
    """The manifest of one worker: shards, counts per bucket, skipped files with reasons, fingerprint."""
    enc_factor, dec_factor = enc.scale_factors
    shards, counts = [], {}
    skipped = list(skipped)
    for name, meta in shard_metas:
        count = len(meta["files"])
        shards.append(
            {"file": name, "bucket": meta["bucket"], "count": count, "captions": sum(map(len, meta["captions"]))}
        )
        key = f"{meta['bucket'][0]}x{meta['bucket'][1]}"
        counts[key] = counts.get(key, 0) + count
        skipped += meta["skipped"]
    written = sum(s["count"] for s in shards)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(Path(src).resolve()),
        "model": enc.source,
        "fingerprint": fingerprint,
        "text_recipe": enc.text_recipe,
        "vae": {
            "scaling_factor": float(enc.vae.config.scaling_factor),
            "latents_mean": enc.vae.config.get("latents_mean"),
            "latents_std": enc.vae.config.get("latents_std"),
            "latent_channels": int(enc.vae.config.latent_channels),
            "encoder_factor": enc_factor,
            "decoder_factor": dec_factor,
        },
        "latents": "posterior mean and log-variance of scaled latents (latents_mean, latents_logvar)",
        "options": options,
        "num_shards": num_shards,
        "shard_indices": [shard_index] if num_shards > 1 else [0],
        "count_in": written + len(skipped),
        "count_written": written,
        "count_skipped": len(skipped),
        "counts": dict(sorted(counts.items())),
        "shards": shards,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped)],
        "empty_prompt": EMPTY_PROMPT_NAME,
    }


def merge(out: str | os.PathLike, inputs: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """Combine the partial manifests of a `--num-shards N` run into `out/manifest.json`.

    Args:
        out: the cache folder. Partial manifests (`manifest.*-of-*.json`) found in it are merged.
        inputs: other cache folders (e.g. from other machines) whose partial manifests, shards and empty prompt
            are copied into `out` first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in map(Path, inputs):
        parts = sorted(folder.glob("manifest.*-of-*.json"))
        if not parts:
            raise FileNotFoundError(f"{folder} holds no partial manifest (manifest.*-of-*.json) to merge.")
        for part in parts:
            for shard in json.loads(part.read_text())["shards"]:
                _copy_if_missing(folder / shard["file"], out / shard["file"])
            _copy_if_missing(part, out / part.name)
        _copy_if_missing(folder / EMPTY_PROMPT_NAME, out / EMPTY_PROMPT_NAME)
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("manifest.*-of-*.json"))]
    if not parts:
        raise FileNotFoundError(f"{out} holds no partial manifest (manifest.*-of-*.json); nothing to merge.")
    total = parts[0]["num_shards"]
    have = sorted(i for p in parts for i in p["shard_indices"])
    if have != list(range(total)):
        missing = sorted(set(range(total)) - set(have))
        raise ValueError(
            f"Cannot merge {out}: parts {missing} of {total} are missing (have {have}); finish them first."
        )
    for p in parts[1:]:
        compare_fingerprints(parts[0]["fingerprint"], p["fingerprint"], where=f"Part {p['shard_indices']} in {out}")
        if p["options"] != parts[0]["options"]:
            raise ValueError(f"Cannot merge {out}: the parts were made with different options.")
    merged = dict(parts[0])
    merged["num_shards"] = 1
    merged["shard_indices"] = [0]
    merged["shards"] = [s for p in parts for s in p["shards"]]
    merged["skipped"] = sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["path"])
    for key in ("count_in", "count_written", "count_skipped"):
        merged[key] = sum(p[key] for p in parts)
    counts: dict[str, int] = {}
    for p in parts:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    merged["counts"] = dict(sorted(counts.items()))
    write_json(out / MANIFEST_NAME, merged, indent=1, sort_keys=False)
    return merged


def _copy_if_missing(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
