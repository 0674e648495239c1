"""The on-disk format of a latent cache (written by `prepare`, read by `LatentShardLoader`).

    OUT/
      manifest.json                 what the cache holds (see `manifest.build_manifest`); the loader's entry point
      empty_prompt.safetensors      encode_text([""]): "embeds" (1, T, D), "mask" (1, T) — for caption dropout
      shards/{W}x{H}-{worker}-{part}.safetensors      one bucket per shard, W x H = OUTPUT resolution

Tensors of a shard holding N images with K captions in total (K >= N):

    latents_mean    (N, C, H/16, W/16)  float16  posterior mean, already multiplied by vae.config.scaling_factor
    latents_logvar  (N, C, H/16, W/16)  float16  posterior log-variance of those *scaled* latents
    embeds          (K, T, D)           float16  encode_text output; T = the shard's longest real length (<= 1 + L)
    mask            (K, T)              uint8    1 = pooled slot or real token
    caption_offsets (N + 1,)            int64    captions of image i are rows caption_offsets[i]:caption_offsets[i+1]

A tensor that would overflow float16 is stored in bfloat16 instead (readers cast to float32 anyway). The shard's
safetensors metadata key "sdxs" holds JSON: bucket, fingerprint, the files it holds and their captions, the files
it was planned to hold (for resume) and the files skipped while making it, with reasons.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT = "sdxs-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
SHARD_DIR = "shards"


def shard_name(bucket: tuple[int, int], worker: int, part: int) -> str:
    """Relative path of a shard: `shards/{W}x{H}-{worker:03d}-{part:05d}.safetensors`."""
    return f"{SHARD_DIR}/{bucket[0]}x{bucket[1]}-{worker:03d}-{part:05d}.safetensors"


def partial_manifest_name(shard_index: int, num_shards: int) -> str:
    """The manifest one worker of a `--num-shards` split writes; `merge` combines them into manifest.json."""
    return f"manifest.{shard_index:03d}-of-{num_shards:03d}.json"


def to_storage(t: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Cast for storage; fall back to bfloat16 where float16 would overflow (large LLM activations)."""
    t = t.detach().cpu()
    out = t.to(dtype)
    if dtype == torch.float16 and torch.isfinite(t).all() and not torch.isfinite(out).all():
        out = t.to(torch.bfloat16)
    return out.contiguous()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write a safetensors file via a temp file + os.replace: a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"sdxs": json.dumps(meta)} if meta is not None else None)
    os.replace(tmp, path)


def read_shard_meta(path: Path) -> dict[str, Any] | None:
    """The "sdxs" metadata of a shard, or None if the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["sdxs"])
    except Exception:
        return None


def load_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Read `cache_dir/manifest.json`, with clear errors for a missing, partial or foreign cache."""
    cache = Path(cache_dir)
    path = cache / MANIFEST_NAME
    if not path.is_file():
        parts = sorted(cache.glob("manifest.*-of-*.json"))
        if parts:
            raise FileNotFoundError(
                f"{cache} holds {len(parts)} partial manifest(s) ({parts[0].name}, ...) but no {MANIFEST_NAME}: "
                f"run `sdxs data merge {cache}` after all `--shard-index` runs have finished."
            )
        raise FileNotFoundError(f"{path} not found: `cache_dir` must be a folder written by `sdxs prepare`.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an SDXS latent cache manifest (format {manifest.get('format')!r}).")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(
            f"{path} has cache version {manifest.get('version')}, this sdxs reads version {CACHE_VERSION}: "
            "run `sdxs prepare` again."
        )
    return manifest
