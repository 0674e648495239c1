"""`sdxs prepare`: image–caption pairs -> a latent cache (see `sdxs.data.shards` for the format).

The pairs come from a folder, WebDataset tar shards or a local Hugging Face dataset (`sdxs.data.sources`).

Each image is encoded once by the VAE encoder and each caption once by the text encoder, with the pipeline's own
`encode_text` and `load_rgb_image`, so training reads small tensors and cannot drift from inference.

    manifest = prepare("photos/", "cache/", model="path/to/model")     # or pipe=an SDXSPipeline in memory

Only the VAE, the text encoder and the tokenizer are loaded, never the UNet. The work is split in shards of one
bucket each; a shard is written with temp file + rename, so a rerun skips every finished shard and a crash never
leaves half a shard. `num_shards` / `shard_index` split the files over machines (interleaved by sorted key);
`merge` combines their manifests.

The parts live in `encoders` (the model's VAE/text encoder and their batched calls), `planning` (buckets and
shards), `sources` (the readers of each input format), `shard_encoding` (one shard's tensors), `cache_folder` (resume, foreign-cache refusal, leftovers) and
`manifest` (`build_manifest`, `merge`); this module runs them in order.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sdxs.data.buckets import default_buckets, make_buckets
from sdxs.data.cache_folder import check_existing_cache, is_done, remove_stale_shards, write_empty_prompt
from sdxs.data.encoders import Encoders, encode_captions, encode_images, encode_latents, trim_length
from sdxs.data.fingerprint import model_fingerprint
from sdxs.data.manifest import build_manifest, merge
from sdxs.data.planning import ShardPlan, assign_bucket, plan_shards, plan_worker, probe_size
from sdxs.data.shard_encoding import encode_shard, load_pixels
from sdxs.data.shards import MANIFEST_NAME, atomic_save, partial_manifest_name, read_shard_meta
from sdxs.data.sources import SOURCE_FORMATS, scan_source
from sdxs.files import write_json

__all__ = [  # the names `from sdxs.data.prepare import ...` has always offered
    "Encoders",
    "ShardPlan",
    "assign_bucket",
    "build_manifest",
    "encode_captions",
    "encode_images",
    "encode_latents",
    "encode_shard",
    "load_pixels",
    "merge",
    "plan_shards",
    "prepare",
    "probe_size",
    "trim_length",
]


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
    source_format: str = "auto",
    image_column: str = "image",
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
    Encode the images and captions of `src` into a latent cache in `out`.

    Args:
        src: folder of images with captions (`.txt` sidecars or metadata.jsonl/csv, see `scan_folder`); or
            WebDataset `.tar` shards (a folder of them, one file or a brace pattern); or a local Hugging Face dataset
            (a `save_to_disk` folder, or `.parquet` / `.arrow` files). See `sdxs.data.sources`.
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
        caption_column: caption column of metadata.jsonl / metadata.csv, or of the Hugging Face dataset.
        source_format: "folder", "webdataset", "hf", or "auto" (from `src`, see `sources.detect_format`).
        image_column: image column of the Hugging Face dataset (`datasets.Image`, bytes or file paths).
        shard_size: at most this many images per shard (one bucket per shard).
        num_shards, shard_index: make only this worker's part (every `num_shards`-th input by sorted key) and write
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
    out = Path(out)
    _check_args(model, pipe, batch_size, shard_size, num_shards, shard_index, max_upscale, source_format)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    # 1. The inputs (scanned before the model loads: a wrong `src` fails fast), buckets and fingerprint
    fmt, items, scan_skipped = scan_source(src, source_format, caption_column, image_column)
    enc = _load_encoders(model, pipe, device, dtype, offload_text_encoder)
    buckets = _buckets(enc, min_side, max_side, step, max_area)
    fingerprint = model_fingerprint(enc.vae, enc.text_encoder, enc.text_recipe, enc.tokenizer)
    options = _options(
        enc, buckets, allow_upscale, max_upscale, background, caption_column, shard_size, storage_dtype, image_embeds
    )
    if fmt == "hf":  # a row's key is its number: another image column would resume into the wrong images
        options["image_column"] = image_column

    # 2. This worker's inputs, their sizes and buckets (image headers only), cut into shards
    ratio = enc.scale_factors[1] // enc.scale_factors[0]
    max_up = None if allow_upscale else max_upscale
    plans, skipped = plan_worker(
        items, scan_skipped, buckets, ratio, max_up, shard_size, shard_index, num_shards, num_workers
    )
    del items, scan_skipped  # the plans hold this worker's items

    # 3. Resume: keep finished shards made with the same model and options; refuse (or, with `overwrite`, clear)
    # a cache made with another model or other options before anything in `out` changes
    check_existing_cache(out, fingerprint, options, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in plans if not is_done(out / p.name, p, fingerprint, options)]
    remove_stale_shards(out, plans, shard_index, num_shards)
    write_empty_prompt(out, enc, device, fingerprint, storage_dtype, offload_text_encoder)

    # 4. Encode the shards still to do (stop_after_shards: return before the manifest)
    stamp = {"fingerprint": fingerprint, "options": options}
    shard_args = (device, batch_size, background, storage_dtype, offload_text_encoder)
    if not _encode_shards(out, enc, todo, shard_args, stamp, num_workers, progress, stop_after_shards, image_embeds):
        return {}

    # 5. Manifest
    shard_metas = [(p.name, read_shard_meta(out / p.name)) for p in plans]
    manifest = build_manifest(
        shard_metas, skipped, fingerprint, enc, options, src, num_shards=num_shards, shard_index=shard_index
    )
    name = MANIFEST_NAME if num_shards == 1 else partial_manifest_name(shard_index, num_shards)
    write_json(out / name, manifest, indent=1, sort_keys=False)
    return manifest


def _check_args(model, pipe, batch_size, shard_size, num_shards, shard_index, max_upscale, source_format) -> None:
    if (model is None) == (pipe is None):
        raise ValueError("Pass exactly one of `model` (a model folder) and `pipe` (an SDXSPipeline).")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"`batch_size` and `shard_size` must be >= 1, got {batch_size} and {shard_size}.")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"`shard_index` must be in [0, num_shards={num_shards}), got {shard_index}.")
    if max_upscale < 1:
        raise ValueError(f"`max_upscale` must be >= 1 (1 = never upscale), got {max_upscale}.")
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"`source_format` must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}.")


def _load_encoders(model, pipe, device: torch.device, dtype, offload_text_encoder: bool) -> Encoders:
    """The in-memory pipeline's encoders as they are, or those of the `model` folder moved to `device`."""
    if pipe is not None:
        return Encoders.from_pipeline(pipe)
    te_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    enc = Encoders.from_folder(model, te_dtype)
    enc.vae.to(device)
    if not offload_text_encoder:
        enc.text_encoder.to(device)
    return enc


def _buckets(enc: Encoders, min_side, max_side, step, max_area) -> list[tuple[int, int]]:
    """The bucket grid at output resolution; unset limits come from the model's default size and size step."""
    step = step or enc.size_step
    if step % enc.size_step:
        raise ValueError(f"`step` {step} must be a multiple of the model's size step {enc.size_step}.")
    d_min, d_max, d_area = default_buckets(enc.default_size, step)
    return make_buckets(min_side or d_min, max_side or d_max, step, max_area or d_area)


def _options(
    enc, buckets, allow_upscale, max_upscale, background, caption_column, shard_size, storage_dtype, image_embeds
) -> dict[str, Any]:
    """The options stored in every shard and manifest: a rerun resumes only a cache made with equal options."""
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
    return options


def _encode_shards(
    out: Path,
    enc: Encoders,
    todo: list[ShardPlan],
    shard_args: tuple,
    stamp: dict,
    num_workers: int,
    progress: bool,
    stop_after_shards: int | None,
    image_embeds: bool,
) -> bool:
    """Encode and save each shard of `todo` -> False when `stop_after_shards` stopped it before the end."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(p.items) for p in todo), unit="img", desc="prepare", disable=not progress)
    with ThreadPoolExecutor(max(1, num_workers)) as pool, bar:
        for n, plan in enumerate(todo):
            if stop_after_shards is not None and n >= stop_after_shards:
                return False
            tensors, meta = encode_shard(enc, plan, *shard_args, pool, bar, image_embeds)
            atomic_save(tensors, out / plan.name, {**meta, **stamp})
    return True
