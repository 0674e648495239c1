"""The manifest of a latent cache: `build_manifest` for one worker, `merge` for the parts of a `--num-shards` run."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sdxs.data.encoders import Encoders
from sdxs.data.fingerprint import compare_fingerprints
from sdxs.data.shards import CACHE_FORMAT, CACHE_VERSION, EMPTY_PROMPT_NAME, MANIFEST_NAME
from sdxs.files import write_json


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
