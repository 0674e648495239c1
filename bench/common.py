"""Shared by the bench/ scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def load_pipeline(model: str, dtype: torch.dtype):
    """A preset name (random weights: speed does not depend on them) or an exported model folder."""
    import os

    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, dtype=dtype, trust_remote_code=True)
    from sdxs.presets import build_pipeline

    return build_pipeline(model, seed=0, dtype=dtype)


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for WIDTHxHEIGHT."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1408, got {text!r}") from None
    return w, h


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


def environment(device: str, **extra) -> dict:
    """Date, device, threads and library versions, for the results file and the docs."""
    import accelerate
    import diffusers
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        **extra,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def write_results(name: str, env: dict, **payload) -> Path:
    """Print the environment line and write {env, ...payload} to bench/results/NAME-DATE.json."""
    print(json.dumps(env))
    out = Path(__file__).parent / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"env": env, **payload}, indent=2))
    return out
