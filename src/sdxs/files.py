"""Writing files so that a crash never leaves half of one: a temp file beside the target, then `os.replace`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write `data` as JSON to `path` atomically (parents created; values JSON lacks are written as `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
    os.replace(tmp, path)
    return path
