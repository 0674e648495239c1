"""The inputs of `sdxs prepare` besides a folder: WebDataset tar shards and local Hugging Face datasets.

Each reader returns what `folder.scan_folder` returns — items (a key, captions, where the image bytes are) sorted by
key, and `(key, reason)` for everything it could not use — so planning, resume, `--num-shards` splits and the
manifest treat every input alike. Images are not held in memory: an item records where its bytes are (a tar offset,
a dataset row) and they are read when the image is probed and when its shard is encoded.

- WebDataset (what img2dataset writes): `.tar` shards of `KEY.jpg|png|webp|...` + `KEY.txt` (+ `KEY.json`), a folder
  of them or a brace pattern (`shards/{00000..00099}.tar`). Files are grouped by webdataset's key rule
  (`tariterators.base_plus_ext`); an item's key is `{tar path without .tar}/{member}`, so `00000.tar` holding
  `cat.png` + `cat.txt` prepares exactly like a folder `00000/` holding the same two files.
- Hugging Face: a `save_to_disk` folder, or `.parquet` / `.arrow` files (a folder of them or one file), read with
  `datasets` (Arrow, memory-mapped; parquet is first converted into datasets' Arrow cache). One image column and
  one caption column (a string or a list of strings); an item's key is its row number, zero-padded.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from sdxs.data.folder import IMAGE_EXTENSIONS, FolderItem, caption_lines, captions_from_value, scan_folder
from sdxs.pipeline import open_image_file

SOURCE_FORMATS = ("auto", "folder", "webdataset", "hf")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
TABLE_EXTENSIONS = (".parquet", ".arrow")


@dataclass(frozen=True)
class TarBlob:
    """An uncompressed tar member's bytes: `size` bytes at `offset` of `tar`."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(f"truncated tar member ({len(data)} of {self.size} bytes in {self.tar.name})")
        return data


@dataclass(frozen=True)
class RowBlob:
    """The image of row `row` in the `image_column` of a datasets.Dataset (decoding off: bytes or a path)."""

    dataset: Any
    row: int
    column: str

    def read(self) -> bytes:
        value = self.dataset[self.row][self.column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            data, path = value.get("bytes"), value.get("path")
            value = data if data is not None else path
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            return Path(value).read_bytes()
        raise ValueError(f"no image (column `{self.column}` of row {self.row} is empty)")


@dataclass
class SourceItem:
    """One image of a tar shard or dataset row with its captions. `rel` is its key in the cache (see module doc)."""

    rel: str
    captions: list[str]
    blob: TarBlob | RowBlob = field(repr=False)


# ------------------------------------------------------------------------------------------------------------
# Choosing the reader
# ------------------------------------------------------------------------------------------------------------


def scan_source(
    src: str | os.PathLike, source_format: str = "auto", caption_column: str = "text", image_column: str = "image"
) -> tuple[str, list[FolderItem | SourceItem], list[tuple[str, str]]]:
    """Find the images and captions of `src` -> (format, items sorted by key, [(key, reason)] skipped)."""
    fmt = detect_format(src) if source_format == "auto" else source_format
    if fmt not in SOURCE_FORMATS[1:]:
        raise ValueError(f"`source_format` must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}.")
    if fmt == "folder":
        items, skipped = scan_folder(src, caption_column)
        root = Path(src)
        return fmt, items, [(p.relative_to(root).as_posix(), r) for p, r in skipped]
    if fmt == "webdataset":
        return (fmt, *scan_webdataset(src))
    return (fmt, *scan_hf_dataset(src, caption_column, image_column))


def _is_pattern(src: str) -> bool:
    return "{" in src and "}" in src


def detect_format(src: str | os.PathLike) -> str:
    """`webdataset` for a brace pattern, a `.tar` or a folder of `.tar` files without images; `hf` for a
    `save_to_disk` folder, a `.parquet`/`.arrow` file or a folder of them without images; else `folder`."""
    text = os.fspath(src)
    path = Path(text)
    if _is_pattern(text) and not path.exists():
        return "webdataset"
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return "webdataset"
        if path.suffix.lower() in TABLE_EXTENSIONS:
            return "hf"
        raise ValueError(
            f"`src` {text!r} is a file, not a folder, .tar, .parquet or .arrow: pass the folder that holds the images."
        )
    if not path.is_dir():
        raise FileNotFoundError(f"`src` {text!r} does not exist; pass a folder, .tar shards or a dataset folder.")
    if any((path / name).is_file() for name in HF_MARKERS):
        return "hf"
    suffixes = set()
    for _, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            suffix = Path(name).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                return "folder"
            suffixes.add(suffix)
    if ".tar" in suffixes:
        return "webdataset"
    if suffixes & set(TABLE_EXTENSIONS):
        return "hf"
    return "folder"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"Reading this `src` needs the `{module.split('.')[0]}` package: pip install 'sdxs[scale]'."
        ) from e


# ------------------------------------------------------------------------------------------------------------
# WebDataset tar shards
# ------------------------------------------------------------------------------------------------------------


def tar_paths(src: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root the keys are relative to, the `.tar` files of `src` sorted by path)."""
    text = os.fspath(src)
    if _is_pattern(text) and not Path(text).exists():
        braceexpand = _need("braceexpand")
        paths = [Path(p) for p in braceexpand.braceexpand(text)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"`src` pattern {text!r} names {len(missing)} missing file(s) of {len(paths)} (first: {missing[0]}); "
                "fix the range or pass the folder that holds the .tar shards."
            )
        root = Path(os.path.commonpath([str(p.parent.absolute()) for p in paths]))
        return root, sorted({p.absolute() for p in paths})
    path = Path(text)
    if path.is_file():
        return path.parent, [path]
    tars = sorted(p for p in path.rglob("*.tar") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not tars:
        raise FileNotFoundError(f"`src` {text!r} holds no .tar shards; pass --format folder for a folder of images.")
    return path, tars


def scan_webdataset(src: str | os.PathLike) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """Images and `KEY.txt` captions of every tar under `src` (member headers and captions only are read)."""
    base_plus_ext = _need("webdataset.tariterators").base_plus_ext
    root, tars = tar_paths(src)
    items: list[SourceItem] = []
    skipped: list[tuple[str, str]] = []
    for tar in tars:
        prefix = tar.relative_to(root).with_suffix("").as_posix()
        members, error = _tar_members(tar)
        if error is not None:
            skipped.append((f"{prefix}.tar", error))
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            key, suffix = base_plus_ext(m.name)
            group = groups.setdefault(key if key is not None else m.name, {})
            suffix = (suffix or "").lower()
            if suffix in group:
                skipped.append((f"{prefix}/{m.name}", f"a second member named {m.name} in {tar.name}"))
            else:
                group[suffix] = m
        for key, group in groups.items():
            _scan_group(tar, prefix, key, group, items, skipped)
    items.sort(key=lambda it: it.rel)
    skipped.sort(key=lambda s: s[0])
    return items, skipped


def _tar_members(tar: Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The regular members of an uncompressed tar (headers only) and the error that ended the listing, if any."""
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(tar, "r:") as t:
            for m in t:
                if m.isreg() and not Path(m.name).name.startswith("."):
                    members.append(m)
                t.members = []  # the listing is ours; TarFile would keep every header otherwise
    except (tarfile.TarError, OSError) as e:
        return members, f"not a readable uncompressed tar ({e}); img2dataset writes plain .tar shards"
    return members, None


def _scan_group(tar, prefix, key, group, items, skipped) -> None:
    """Files sharing one webdataset key: each image with the key's `txt` caption; every other file is skipped."""
    images = {s: m for s, m in group.items() if "." + s.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
    caption = group.get("txt")
    captions = _member_captions(tar, caption) if caption is not None else []
    for suffix, m in sorted(group.items()):
        rel = f"{prefix}/{m.name.removeprefix('./')}"
        if suffix in images:
            if caption is None:
                skipped.append((rel, f"no caption (no {Path(key).name}.txt in {tar.name})"))
            elif not captions:
                skipped.append((rel, f"caption file {Path(key).name}.txt is empty"))
            else:
                items.append(SourceItem(rel, captions, TarBlob(tar, m.offset_data, m.size)))
        elif suffix == "txt":
            if not images:
                skipped.append((rel, "caption file without an image of the same key"))
        elif suffix != "json":  # img2dataset's per-sample metadata
            ext = "." + suffix.rsplit(".", 1)[-1] if suffix else "(none)"
            skipped.append((rel, f"not an image (extension {ext!r}; expected one of {', '.join(IMAGE_EXTENSIONS)})"))


def _member_captions(tar: Path, member: tarfile.TarInfo) -> list[str]:
    return caption_lines(TarBlob(tar, member.offset_data, member.size).read().decode("utf-8", errors="replace"))


# ------------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ------------------------------------------------------------------------------------------------------------


def load_hf_dataset(src: str | os.PathLike):
    """The datasets.Dataset of a `save_to_disk` folder or of `.parquet` / `.arrow` files (one file or a folder)."""
    datasets = _need("datasets")
    path = Path(src)
    if path.is_dir() and any((path / name).is_file() for name in HF_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(
                f"`src` {str(path)!r} holds several splits ({', '.join(ds)}); pass one split's folder, "
                f"e.g. {str(path / next(iter(ds)))!r}."
            )
        return ds
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TABLE_EXTENSIONS)
    kinds = {p.suffix.lower() for p in files}
    if not files or len(kinds) > 1:
        raise ValueError(
            f"`src` {str(path)!r} must hold .parquet or .arrow files (one kind) or be a save_to_disk folder; "
            f"found {sorted(kinds) or 'none'}."
        )
    if kinds == {".arrow"}:  # memory-mapped in place
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in files])
    return datasets.load_dataset("parquet", data_files=[str(p) for p in files], split="train")


def scan_hf_dataset(
    src: str | os.PathLike, caption_column: str = "text", image_column: str = "image"
) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """One item per row with a caption; the image bytes stay in the (memory-mapped) dataset until used."""
    datasets = _need("datasets")
    ds = load_hf_dataset(src)
    for flag, column in (("--image-column", image_column), ("--caption-column", caption_column)):
        if column not in ds.column_names:
            raise ValueError(
                f"`{flag.lstrip('-').replace('-', '_')}` {column!r} is not a column of {os.fspath(src)!r} "
                f"(columns: {', '.join(ds.column_names)}); pass {flag} NAME."
            )
    images = ds.select_columns([image_column])
    if isinstance(images.features[image_column], datasets.Image):
        images = images.cast_column(image_column, datasets.Image(decode=False))
    width = len(str(max(len(ds) - 1, 0)))
    items: list[SourceItem] = []
    skipped: list[tuple[str, str]] = []
    row = 0
    for batch in ds.select_columns([caption_column]).iter(batch_size=1024):
        for value in batch[caption_column]:
            rel = f"{row:0{width}d}"
            captions = captions_from_value(value)
            if captions:
                items.append(SourceItem(rel, captions, RowBlob(images, row, image_column)))
            else:
                skipped.append((rel, f"no caption (column `{caption_column}` is empty)"))
            row += 1
    return items, skipped


# ------------------------------------------------------------------------------------------------------------
# Opening an item's image
# ------------------------------------------------------------------------------------------------------------


def item_image(item: FolderItem | SourceItem) -> Path | PIL.Image.Image:
    """What `load_rgb_image` takes for `item`: the file of a folder item, else the image opened from its bytes
    exactly as `load_rgb_image` opens a file (first frame loaded, palette -> RGBA, info and EXIF kept)."""
    if isinstance(item, FolderItem):
        return item.path
    data = item.blob.read()
    if not data:
        raise ValueError("empty file (0 bytes)")
    return open_image_file(io.BytesIO(data), repr(item.rel))


def item_header(item: FolderItem | SourceItem) -> Path | io.BytesIO:
    """What `planning.probe_size` reads `item`'s size from: its file, or its bytes in memory (a tar member or a
    dataset cell is read whole: one image at a time)."""
    return item.path if isinstance(item, FolderItem) else io.BytesIO(item.blob.read())


__all__ = [
    "SOURCE_FORMATS",
    "RowBlob",
    "SourceItem",
    "TarBlob",
    "detect_format",
    "item_header",
    "item_image",
    "load_hf_dataset",
    "scan_hf_dataset",
    "scan_source",
    "scan_webdataset",
    "tar_paths",
]
