"""The emoji dataset as the eval reads it: splits.jsonl rows (`sdxs data emoji`), images, fixed random subsets."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

# splits.jsonl `holdout` values (the emoji tool writes "skin tone"; accept "skin_tone" too)
HOLDOUT_EMOJI = "emoji"
HOLDOUT_TONE = "skin tone"


@dataclass
class EmojiItem:
    """One row of splits.jsonl; `index` is its position in the retrieval gallery (all rows, file order)."""

    index: int
    path: Path
    split: str
    holdout: str
    name: str
    caption: str  # the first caption line: "<name>, 3d render"
    style: str = ""  # the row's `style` ("3d", "twemoji", ...) on a multi-style dataset; "" when the row has none


Groups = dict[str, Sequence[EmojiItem]]  # labelled groups of items, e.g. "training captions (200)" -> its items


def read_splits(data_dir: str | os.PathLike) -> list[tuple[str, dict]]:
    """The rows of `data_dir/splits.jsonl` (written by `sdxs data emoji`) in file order, each with its place
    ("FILE:LINE") for messages. The one reader of that file: the eval's items and the strict eval's renders."""
    manifest = Path(data_dir) / "splits.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"--data {data_dir}: no splits.jsonl there; pass a folder made by `sdxs data emoji`")
    rows = []
    for line_no, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{manifest}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}:{line_no}: not a splits.jsonl row ({e})") from None
    if not rows:
        raise ValueError(f"{manifest} has no rows")
    return rows


def load_emoji_dataset(data_dir: str | os.PathLike) -> list[EmojiItem]:
    """Read `data_dir/splits.jsonl` (written by `sdxs data emoji`) into items, in file order."""
    items = []
    for where, row in read_splits(data_dir):
        try:
            path = Path(data_dir) / row["file_name"]
            caption = row["text"][0] if row.get("text") else row["name"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a splits.jsonl row ({e})") from None
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {path} does not exist")
        holdout = str(row.get("holdout") or "").replace("_", " ")
        style = str(row.get("style") or "")
        items.append(
            EmojiItem(len(items), path, row.get("split", "train"), holdout, row.get("name", ""), caption, style)
        )
    return items


def styles_of(items: Sequence[EmojiItem]) -> list[str]:
    """The distinct styles of `items` in first-seen order (`[""]` for a dataset whose rows have none)."""
    return list(dict.fromkeys(it.style for it in items))


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
