"""Encoding one planned shard of `sdxs prepare`: captions, VAE latents and (optionally) image-prompt embeddings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sdxs.data.buckets import resize_and_crop
from sdxs.data.encoders import Encoders, encode_captions, encode_images, encode_latents, move_to, trim_length
from sdxs.data.folder import FolderItem
from sdxs.data.planning import ShardPlan, skip_reason
from sdxs.data.shards import to_storage
from sdxs.data.sources import SourceItem, item_image
from sdxs.pipeline import load_rgb_image


def load_pixels(
    item: FolderItem | SourceItem, encoder_size: tuple[int, int], background: tuple[int, int, int]
) -> np.ndarray:
    """The image as uint8 (H, W, 3) at the encoder input size: RGB conversion, Lanczos resize, centre crop."""
    image = load_rgb_image(item_image(item), background=background)
    return np.asarray(resize_and_crop(image, encoder_size), dtype=np.uint8)


def _try_load(item, encoder_size, background):
    try:
        return load_pixels(item, encoder_size, background), None
    except Exception as e:  # one bad file must never stop the run: it is skipped with its reason
        return None, skip_reason(e)


def _encode_batch(vae, batch: list[np.ndarray], device, means: list, logvars: list) -> None:
    mean, logvar = encode_latents(vae, np.stack(batch), device)
    means.append(mean)
    logvars.append(logvar)
    batch.clear()


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
    move_to(enc.text_encoder, device, offload_text_encoder)
    embeds, mask = encode_captions(enc, captions, batch_size, device)  # (K, 1+L, D), (K, 1+L)
    if offload_text_encoder:
        move_to(enc.text_encoder, torch.device("cpu"), True)  # free the accelerator for the VAE pass

    kept, skipped, means, logvars = _encode_pixels(enc.vae, plan.items, loaded, batch_size, device, progress)
    tensors = {
        **_latent_tensors(enc, encoder_size, means, logvars, storage_dtype),
        **_caption_tensors(enc, plan.items, kept, embeds, mask, storage_dtype),
    }
    if image_embeds:  # encode_image of each written image at its own size (as a user's image prompt is encoded)
        dim = int(embeds.shape[-1])
        tensors |= _image_prompt_tensors(enc, kept, dim, background, device, storage_dtype, offload_text_encoder)
    meta = {
        "bucket": list(plan.bucket),
        "inputs": [it.rel for it in plan.items],
        "files": [it.rel for it in kept],
        "captions": [it.captions for it in kept],
        "skipped": skipped,
    }
    return tensors, meta


def _encode_pixels(vae, items: list[FolderItem | SourceItem], loaded, batch_size: int, device, progress):
    """VAE-encode the loaded images in batches -> (kept items, [[rel, reason]] skipped, means, logvars)."""
    kept, skipped, batch, means, logvars = [], [], [], [], []
    for item, (pixels, reason) in zip(items, loaded, strict=True):
        if reason is not None:
            skipped.append([item.rel, reason])
        else:
            kept.append(item)
            batch.append(pixels)
        if len(batch) == batch_size:
            _encode_batch(vae, batch, device, means, logvars)
        if progress is not None:
            progress.update(1)
    if batch:
        _encode_batch(vae, batch, device, means, logvars)
    return kept, skipped, means, logvars


def _latent_tensors(enc: Encoders, encoder_size, means: list, logvars: list, storage_dtype) -> dict[str, torch.Tensor]:
    """`latents_mean` / `latents_logvar` (N, C, h, w); empty with the bucket's latent shape when nothing was kept."""
    c, (h, w) = (
        int(enc.vae.config.latent_channels),
        (encoder_size[1] // enc.scale_factors[0], encoder_size[0] // enc.scale_factors[0]),
    )
    empty = torch.zeros(0, c, h, w)
    return {
        "latents_mean": to_storage(torch.cat(means) if means else empty, storage_dtype),
        "latents_logvar": to_storage(torch.cat(logvars) if logvars else empty, storage_dtype),
    }


def _caption_tensors(enc: Encoders, items, kept, embeds, mask, storage_dtype) -> dict[str, torch.Tensor]:
    """The caption rows of written images only, trimmed; `caption_offsets` index them per image."""
    keep_rows, offsets, row = [], [0], 0
    kept_set = {it.rel for it in kept}
    for item in items:
        n = len(item.captions)
        if item.rel in kept_set:
            keep_rows += range(row, row + n)
            offsets.append(offsets[-1] + n)
        row += n
    embeds, mask = embeds[keep_rows], mask[keep_rows]
    length = trim_length(mask, enc.text_recipe["padding_side"]) if len(keep_rows) else 1
    return {
        "embeds": to_storage(embeds[:, :length], storage_dtype),
        "mask": mask[:, :length].to(torch.uint8).contiguous(),
        "caption_offsets": torch.tensor(offsets, dtype=torch.int64),
    }


def _image_prompt_tensors(enc: Encoders, kept, dim: int, background, device, storage_dtype, offload: bool):
    """`image_embeds` (N, T, D) / `image_mask` (N, T): the pipeline's `encode_image` of each written image."""
    move_to(enc.text_encoder, device, offload)
    if kept:
        images = [load_rgb_image(item_image(it), background=background) for it in kept]
        img_embeds, img_mask = encode_images(enc, images, device)
    else:
        img_embeds, img_mask = torch.zeros(0, 1, dim), torch.zeros(0, 1, dtype=torch.long)
    if offload:
        move_to(enc.text_encoder, torch.device("cpu"), True)
    img_length = trim_length(img_mask, enc.text_recipe["padding_side"]) if kept else 1
    return {
        "image_embeds": to_storage(img_embeds[:, :img_length], storage_dtype),
        "image_mask": img_mask[:, :img_length].to(torch.uint8).contiguous(),
    }
