"""Where the server's memory goes: the server's kind of image work, in-process, with glibc's own account of its heaps.

    OMP_NUM_THREADS=1 python bench/stress_server_malloc.py                  # trim once, at the end
    OMP_NUM_THREADS=1 python bench/stress_server_malloc.py --trim-each-job  # as the server does now
    MALLOC_ARENA_MAX=1 OMP_NUM_THREADS=1 python bench/stress_server_malloc.py
    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 python bench/stress_server_malloc.py

Loads the model (the repo root by default) and runs two rounds of mixed work on ONE worker thread, as the server
does: generations at several sizes and batch sizes, upscales of 128..512-pixel inputs, an image prompt. After each
round it prints RSS and glibc's `mallinfo2` (bytes in malloc's heaps, in use and free, and in mmapped blocks),
then RSS after `malloc_trim(0)`. Free bytes in the heaps that RSS still counts are what the server kept before
it trimmed after each job (docs/reliability.md). glibc only (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trim-each-job", action="store_true", help="malloc_trim(0) after every job (the server's fix)")
    args = p.parse_args(argv)

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    proc = psutil.Process()

    def report(tag: str) -> None:
        m = libc.mallinfo2()
        mb = lambda n: n / 2**20  # noqa: E731
        print(
            f"{tag}: RSS {mb(proc.memory_info().rss):.0f} MB | malloc heaps {mb(m.arena):.0f} MB "
            f"(in use {mb(m.uordblks):.0f}, free {mb(m.fordblks):.0f}), mmapped blocks {mb(m.hblkhd):.0f} MB",
            flush=True,
        )

    from sdxs import runtime

    pipe = runtime.load_pipeline(args.model, device="cpu", dtype="float32", speedups=[], verbose=False, progress=False)
    pipe.set_progress_bar_config(disable=True)
    gc.collect()
    report("loaded")

    def noise(w: int, h: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(w + h).integers(0, 256, (h, w, 3), dtype=np.uint8))

    def generate(w: int, h: int, n: int) -> None:
        pipe("a red apple", width=w, height=h, num_images_per_prompt=n, num_inference_steps=2, seed=1)

    def image_prompt() -> None:
        embeds, mask = pipe.encode_image(noise(512, 512))
        pipe(prompt_embeds=embeds, prompt_attention_mask=mask, width=128, height=128, num_images_per_prompt=2,
             num_inference_steps=2, seed=2)  # fmt: skip

    jobs = [lambda s=s: generate(*s) for s in [(128, 128, 1), (256, 256, 1), (64, 64, 4), (256, 128, 2),
                                                (128, 256, 4), (256, 256, 4)]]  # fmt: skip
    jobs += [lambda s=s: pipe.image_upscale(noise(*s)) for s in [(128, 128), (256, 256), (512, 384)]]
    jobs.append(image_prompt)

    trims: list[float] = []
    with ThreadPoolExecutor(1) as worker:  # the server's device thread: its allocations, its malloc arena
        for r in range(args.rounds):
            for job in jobs:
                worker.submit(job).result()
                if args.trim_each_job:
                    start = time.perf_counter()
                    worker.submit(libc.malloc_trim, 0).result()
                    trims.append(time.perf_counter() - start)
            gc.collect()
            report(f"after round {r + 1}")
        worker.submit(libc.malloc_trim, 0).result()
    report("after malloc_trim(0)")
    if trims:
        print(
            f"malloc_trim after each job: mean {1000 * sum(trims) / len(trims):.1f} ms, max {1000 * max(trims):.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
