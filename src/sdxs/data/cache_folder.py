"""The cache folder rules of `sdxs prepare`: which finished shards a rerun keeps, refusing (or with `overwrite`,
clearing) a cache made with another model or options, and removing what a killed run of this worker left."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxs.data.encoders import encode_captions, move_to, trim_length
from sdxs.data.fingerprint import compare_fingerprints
from sdxs.data.planning import ShardPlan
from sdxs.data.shards import (
    EMPTY_PROMPT_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    atomic_save,
    partial_manifest_name,
    read_shard_meta,
    to_storage,
)


def is_done(path: Path, plan: ShardPlan, fingerprint: dict, options: dict) -> bool:
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


def check_existing_cache(out: Path, fingerprint: dict, options: dict, overwrite: bool) -> None:
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


def remove_stale_shards(out: Path, plans: list[ShardPlan], worker: int, num_workers: int = 1) -> None:
    """Delete this worker's shard files that the current plan no longer has (the source folder changed), the
    temp files a killed run of this worker left (a save is temp file + rename: `.NAME.PID.tmp`) and, in a split,
    this worker's partial manifest (written again at the end).

    Only files made with the same model and options reach here (`check_existing_cache` runs first). Other workers
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
        # this worker's earlier part describes shards that may have just been removed: until this run writes it
        # again, a merge (the last rank of `accelerate launch`, `sdxs data merge`) must find it missing
        leftovers += [out / partial_manifest_name(worker, num_workers)]
        leftovers += [*out.glob(f".{partial_manifest_name(worker, num_workers)}.*.tmp")]
    for f in leftovers:
        f.unlink(missing_ok=True)


def write_empty_prompt(out, enc, device, fingerprint, storage_dtype, offload) -> None:
    path = out / EMPTY_PROMPT_NAME
    meta = read_shard_meta(path) if path.exists() else None
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return
    move_to(enc.text_encoder, device, offload)
    embeds, mask = encode_captions(enc, [""], 1, device)  # (1, 1+L, D), (1, 1+L)
    length = trim_length(mask, enc.text_recipe["padding_side"])
    tensors = {"embeds": to_storage(embeds[:, :length], storage_dtype), "mask": mask[:, :length].to(torch.uint8)}
    atomic_save(tensors, path, {"fingerprint": fingerprint})
