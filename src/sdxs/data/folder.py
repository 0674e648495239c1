"""Find image–caption pairs in a folder (recursively), the input format of `sdxs prepare`.

Captions come from, in this order of precedence:

1. a same-name `.txt` sidecar (`cat.png` + `cat.txt`); every non-empty line is one caption;
2. `metadata.jsonl` or `metadata.csv` in the image's folder or any parent folder up to `src` (the diffusers
   ImageFolder convention): a `file_name` column relative to the metadata file's folder and a caption column
   (`text` by default). In JSON lines the caption may also be a list of strings (several captions).

Nothing is dropped silently: every file under `src` is either an item or a `(path, reason)` in `skipped`, except
hidden files, the metadata files themselves and sidecars that belong to an image.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass
class FolderItem:
    """One image with its captions. `rel` is the posix path relative to the scanned folder (the item's key)."""

    path: Path
    rel: str
    captions: list[str] = field(default_factory=list)


def scan_folder(
    src: str | os.PathLike, caption_column: str = "text"
) -> tuple[list[FolderItem], list[tuple[Path, str]]]:
    """Find images and their captions under `src`.

    Args:
        src: the dataset folder, searched recursively (symlinked folders are not followed).
        caption_column: the caption column of `metadata.jsonl` / `metadata.csv`.

    Returns:
        `(items, skipped)`: items sorted by relative path, each with `.path`, `.rel` and `.captions` (at least one
        non-empty caption); skipped is a list of `(path, reason)` for files that are not usable images or have no
        caption. Image files are not opened here: unreadable images are found (and skipped) by `prepare`.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"`src` {str(root)!r} is not a folder; pass the folder that holds the images.")
    files = sorted(_walk(root), key=lambda p: p.relative_to(root).as_posix())
    images = {p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    metadata = _read_metadata(root, [p for p in files if p.name in METADATA_FILES], caption_column)

    items: list[FolderItem] = []
    skipped: list[tuple[Path, str]] = []
    used_sidecars: set[Path] = set()
    for path in sorted(images, key=lambda p: p.relative_to(root).as_posix()):
        sidecar = path.with_suffix(".txt")
        captions = None
        if sidecar.is_file():
            used_sidecars.add(sidecar)
            captions = read_caption_file(sidecar)
            if not captions:
                skipped.append((path, f"caption file {sidecar.name} is empty"))
                continue
        elif path in metadata:
            captions = metadata[path]
            if not captions:
                skipped.append((path, "metadata caption is empty"))
                continue
        if not captions:
            skipped.append((path, f"no caption (no {sidecar.name} and no metadata.jsonl/csv entry)"))
            continue
        items.append(FolderItem(path=path, rel=path.relative_to(root).as_posix(), captions=captions))

    for path in files:
        if path in images or path in used_sidecars or path.name in METADATA_FILES:
            continue
        if path.suffix.lower() == ".txt":
            reason = "caption file without an image of the same name"
        else:
            reason = (
                f"not an image (extension {path.suffix or '(none)'!r}; expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        skipped.append((path, reason))
    skipped.sort(key=lambda s: s[0].relative_to(root).as_posix())
    return items, skipped


def read_caption_file(path: Path) -> list[str]:
    """Non-empty, stripped lines of a caption sidecar (several lines = several captions)."""
    return caption_lines(path.read_text(encoding="utf-8", errors="replace"))


def caption_lines(text: str) -> list[str]:
    """The non-empty, stripped lines of a caption text (several lines = several captions)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def captions_from_value(value) -> list[str]:
    """The captions of a metadata or dataset cell: a string (one caption per line), a list of them, or None."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [line for v in values for line in caption_lines(str(v))]


def _read_metadata(root: Path, metadata_files: list[Path], column: str) -> dict[Path, list[str]]:
    """{image path: captions} from all metadata files; a deeper metadata file wins over a shallower one."""
    out: dict[Path, list[str]] = {}
    for meta in sorted(metadata_files, key=lambda p: len(p.relative_to(root).parts)):
        rows = read_rows(meta)
        for i, row in enumerate(rows):
            if "file_name" not in row or column not in row:
                raise ValueError(
                    f"{meta} row {i + 1} lacks the `file_name` or `{column}` column (has {sorted(row)}); "
                    "pass `caption_column` to name the caption column."
                )
            out[(meta.parent / str(row["file_name"])).resolve().absolute()] = captions_from_value(row[column])
    # keys are resolved paths; map them back onto the walked (unresolved) paths
    return {p: out[p.resolve().absolute()] for p in _walk(root) if p.resolve().absolute() in out}


def read_rows(path: Path) -> list[dict]:
    """The rows of a `.jsonl` (one JSON object per line) or `.csv` (with a header) table, as dicts."""
    return _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n + 1} is not valid JSON ({e}).") from e
    return rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
