"""Labelled image grids: training sample grids and the evaluation grid (one look instead of many files)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


def make_grid(images: Sequence, labels: Sequence[str], columns: int = 4, cell: int = 128) -> PIL.Image.Image:
    """Images in rows of `columns`, each `cell` px square with its (wrapped) label underneath, on white."""
    font = _label_font()
    wrap = max(8, cell // 7)  # characters per line of a 10 px font
    lines = [textwrap.wrap(label, wrap)[:3] or [""] for label in labels]
    line_h = 12
    label_h = 4 + line_h * max(len(ls) for ls in lines)
    rows = math.ceil(len(images) / columns)
    grid = PIL.Image.new("RGB", (columns * cell, rows * (cell + label_h)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, lines, strict=True)):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        thumb = image.convert("RGB").resize((cell, cell), PIL.Image.Resampling.LANCZOS)
        grid.paste(thumb, (x, y))
        for j, line in enumerate(text):
            draw.text((x + 3, y + cell + 2 + j * line_h), line, fill="black", font=font)
    return grid


def _label_font(size: int = 10) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (it has the accents of "flag of Curaçao", "São Tomé"; Pillow's built-in
    Aileron draws them as boxes), else Pillow's default font."""
    try:
        return PIL.ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return PIL.ImageFont.load_default()
