"""Throughput of `sdxs prepare` (images/s) for a preset with random weights, on generated images.

    python bench/bench_prepare.py                         # tiny preset, CPU, 256 images of 128x128
    python bench/bench_prepare.py --images 512 --batch-size 32 --device cuda

Prints a table and writes JSON to bench/results/prepare-<preset>-<device>.json. The first shard is a warm-up:
timed images/s are over the rest, end to end (decode + resize + text encoder + VAE encoder + write).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

RESULTS = Path(__file__).parent / "results"


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a red apple number {i} on a wooden table, 3d render\nfruit {i}")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128, help="side of the generated square images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import diffusers
    import transformers

    from sdxs.data.prepare import prepare
    from sdxs.presets import build_pipeline

    pipe = build_pipeline(args.preset, seed=0).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        make_images(src, args.images, args.size)
        common = dict(pipe=pipe, batch_size=args.batch_size, shard_size=args.shard_size, device=args.device)
        prepare(src, out, stop_after_shards=1, progress=False, **common)  # warm-up: the first shard
        warm = args.shard_size
        start = time.perf_counter()
        manifest = prepare(src, out, progress=False, **common)
        seconds = time.perf_counter() - start
        shutil.rmtree(out)
    timed = manifest["count_written"] - warm
    result = {
        "preset": args.preset,
        "device": args.device,
        "hardware": cpu_model() if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "image_size": args.size,
        "timed_images": timed,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 3),
        "images_per_s": round(timed / seconds, 2),
        "buckets": manifest["counts"],
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'preset':8} {'device':6} {'batch':>5} {'images':>6} {'seconds':>8} {'images/s':>9}")
    print(
        f"{args.preset:8} {args.device:6} {args.batch_size:>5} {timed:>6} {seconds:>8.2f} {result['images_per_s']:>9.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"prepare-{args.preset}-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
