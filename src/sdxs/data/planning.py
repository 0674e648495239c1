"""Planning for `sdxs prepare`: which of a worker's images are kept, their buckets, and the shards they go in."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from sdxs.data.buckets import cover_scale, nearest_bucket
from sdxs.data.folder import FolderItem
from sdxs.data.shards import shard_name
from sdxs.data.sources import SourceItem, item_header


@dataclass
class ShardPlan:
    name: str  # relative path of the shard file
    bucket: tuple[int, int]  # (width, height) at output resolution
    items: list[FolderItem | SourceItem]


def probe_size(path: Path | io.BytesIO) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the file header only (no pixel decoding)."""
    size = path.getbuffer().nbytes if isinstance(path, io.BytesIO) else path.stat().st_size
    if size == 0:
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
    items: list[FolderItem | SourceItem], sizes: dict[str, tuple[int, int]], shard_size: int, worker: int
) -> list[ShardPlan]:
    """Group items by bucket (sorted by key) and cut each bucket into shards of at most `shard_size` images."""
    by_bucket: dict[tuple[int, int], list[FolderItem | SourceItem]] = {}
    for item in items:
        by_bucket.setdefault(sizes[item.rel], []).append(item)
    plans = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        for part, start in enumerate(range(0, len(group), shard_size)):
            plans.append(ShardPlan(shard_name(bucket, worker, part), bucket, group[start : start + shard_size]))
    return plans


def skip_reason(e: Exception) -> str:
    """A one-line skip reason; load_rgb_image's ValueError already reads "... is not a readable image (...)"."""
    if isinstance(e, ValueError):
        return str(e)
    return f"unreadable image ({type(e).__name__}: {e})"


def _try_probe(item: FolderItem | SourceItem):
    try:
        return probe_size(item_header(item)), None
    except Exception as e:
        return None, skip_reason(e)


def plan_worker(
    items: list[FolderItem | SourceItem],
    scan_skipped: list[tuple[str, str]],
    buckets: list[tuple[int, int]],
    ratio: int,
    max_upscale: float | None,
    shard_size: int,
    shard_index: int,
    num_shards: int,
    num_workers: int,
) -> tuple[list[ShardPlan], list[list[str]]]:
    """This worker's part of a scanned source (`sources.scan_source`: items, `(key, reason)` skipped), every
    `num_shards`-th entry by sorted key; their buckets from the image headers only, and the shards they go in
    -> (plans, [[key, reason]] of the entries skipped so far)."""
    entries = sorted([(it.rel, it) for it in items] + list(scan_skipped), key=lambda e: e[0])
    mine = entries[shard_index::num_shards]
    my_items = [e[1] for e in mine if not isinstance(e[1], str)]
    skipped = [[rel, r] for rel, r in mine if isinstance(r, str)]
    sizes, kept = {}, []
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        probed = list(pool.map(_try_probe, my_items))
    for item, (size, reason) in zip(my_items, probed, strict=True):
        if reason is None:
            try:
                sizes[item.rel] = assign_bucket(size, buckets, ratio, max_upscale)
                kept.append(item)
                continue
            except ValueError as e:
                reason = str(e)
        skipped.append([item.rel, reason])
    return plan_shards(kept, sizes, shard_size, shard_index), skipped
