"""Writing files: atomically (a temp file beside the target, then `os.replace`, so a crash never leaves half of
one), and the image output paths of `sdxs generate/upscale/encode-image` (checked before any model loads)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdxs.runtime import UserError


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write `data` as JSON to `path` atomically (parents created; values JSON lacks are written as `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
    os.replace(tmp, path)
    return path


def output_paths(output: str | os.PathLike, n: int) -> list[Path]:
    """One image -> `output` itself; several -> `stem-1.png`, `stem-2.png`, ... beside it."""
    out = Path(output)
    if out.suffix == "":
        out = out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]


def next_numbered_path(output: str | os.PathLike, start: int = 1) -> tuple[Path, int]:
    """The first `stem-NNN.png` beside `output` that does not exist yet (never overwrite earlier results)."""
    out = Path(output)
    suffix = out.suffix or ".png"
    n = start
    while True:
        path = out.with_name(f"{out.stem}-{n:03d}{suffix}")
        if not path.exists():
            return path, n + 1
        n += 1


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_output(output: str | os.PathLike, flag: str = "--output", suffixes: Sequence[str] = IMAGE_SUFFIXES) -> None:
    """Refuse an output path that cannot be written, before any model is loaded or image made (`UserError`)."""
    out = Path(output).expanduser()
    if out.suffix and out.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {output}: unknown file extension {out.suffix!r}; use one of {', '.join(suffixes)} "
            "(no extension means .png)"
        )
    if out.is_dir():
        raise UserError(f"{flag} {output}: is a folder; give a file name inside it, e.g. {out / 'image.png'}")
    folder = out.parent
    while not folder.exists():  # save_images creates missing folders: the nearest existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {output}: {folder} is a file, not a folder; pick another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: cannot write in {folder} (permission denied); pick another folder")
    _probe_write(out.parent, flag, output)


def _probe_write(folder: Path, flag: str, output) -> None:
    """Make the folders and a scratch file there, then take them away again: what `os.access` cannot tell (root on
    a read-only mount, /proc, a full disk, a name the file system refuses) fails now, not after the work."""
    made = []
    try:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        probe = folder / f".sdxs-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {output}: cannot write there ({e.strerror or e}); pick another output path") from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def check_image_inputs(paths: Sequence[str | os.PathLike]) -> None:
    """Every input must be an existing file (before any model load)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")


def save_images(images: Sequence[Any], paths: Sequence[Path]) -> None:
    """Each image to its path, atomically (a temp file beside it, then `os.replace`): never half a PNG."""
    from PIL import Image

    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)


def check_upscale_sizes(paths: Sequence[str | os.PathLike], max_pixels: int | None) -> None:
    """`sdxs upscale`'s inputs must be readable images of at most `max_pixels` (None: no limit) pixels, read from
    their headers (`UserError` naming --max-pixels otherwise)."""
    from PIL import Image

    for path in map(Path, paths):
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
        if max_pixels is not None and w * h > max_pixels:
            raise UserError(
                f"{path} is {w}x{h} = {w * h} pixels, more than --max-pixels {max_pixels} (about "
                f"{upscale_minutes(w * h)} on a CPU); pass --max-pixels {w * h} (or 0 for no limit) to upscale it"
            )


def upscale_minutes(pixels: int) -> str:
    """A rough CPU estimate from the measured 41 s per 1024x1024 input on 2 cores (docs/cli.md)."""
    return f"{max(1, round(41 * pixels / 1024**2 / 60))} min"
