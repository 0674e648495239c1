"""The VAE section of `sdxs eval` alone, per style: R/2 -> R reconstruction of the VAE against bicubic 2x.

    python scripts/vae_styles.py --model . --data data/emoji3 --images 200 --grid media/vae-styles.png

On a multi-style dataset (`sdxs data emoji --styles 3d,twemoji,noto`) the sets are those of `sdxs eval`'s VAE
table (`sdxs.eval.suite.vae_subsets`: per style, the same seeded draw as the eval's): `--images` training images per
style (seed `--seed` + 1), plus the validation split per style with `--validation`. Prints the per-style Markdown
table (PSNR of the VAE and bicubic, the VAE's wins, Sobel edge error, edge energy ratio) and the wall time; `--grid`
saves originals / VAE / bicubic side by side, `--grid-images` per style, if the PNG is under `--grid-max-kb`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sdxs import eval as ev
from sdxs.eval.report import _version, describe_hardware, save_small_png, vae_style_table
from sdxs.grid import make_grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".", help="model folder (default: the repo root)")
    p.add_argument("--data", default="data/emoji3", help="an `sdxs data emoji` folder")
    p.add_argument("--images", type=int, default=200, help="training images per style (default: 200)")
    p.add_argument("--validation", action="store_true", help="also the validation split, per style")
    p.add_argument("--seed", type=int, default=0, help="as `sdxs eval --seed` (training draw: seed + 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--grid", type=Path, help="PNG of originals / VAE / bicubic")
    p.add_argument("--grid-images", type=int, default=4, help="images per style in the grid (default: 4)")
    p.add_argument("--grid-max-kb", type=int, default=150, help="write the grid only if smaller (default: 150)")
    args = p.parse_args(argv)

    import torch

    items = ev.load_emoji_dataset(args.data)
    train = [it for it in items if it.split == "train"]
    validation = [it for it in items if it.split != "train"] if args.validation else []
    sets, styles = ev.vae_subsets(train, validation, args.seed, args.images)
    sets = {label: subset for label, subset in sets.items() if subset}
    t0 = time.perf_counter()
    pipe, name = ev.load_eval_pipeline(args.model, args.device, args.dtype, False)
    load_s = time.perf_counter() - t0
    resolution = int(pipe.config.default_width)
    t1 = time.perf_counter()
    results = [
        ev.evaluate_vae(
            pipe, subset, label, args.batch_size, resolution=resolution, style=styles.get(label), keep=args.grid_images
        )
        for label, subset in sets.items()
    ]
    vae_s = time.perf_counter() - t1
    print(f"model {name}, data {args.data} ({len(items)} images), {resolution // 2} -> {resolution} px")
    print(f"hardware: {describe_hardware(pipe.device)}")
    print(
        f"software: torch {torch.__version__}, diffusers {_version('diffusers')}, transformers {_version('transformers')}"
    )
    print(f"time: pipeline load {load_s:.1f} s, VAE + bicubic on {sum(r.count for r in results)} images {vae_s:.1f} s")
    print()
    print("\n".join(vae_style_table(results)))
    if args.grid is not None:
        import PIL.Image

        cells, labels = [], []
        for r in [r for r in results if r.label.endswith("training")] or results:
            for i in range(min(args.grid_images, r.count)):
                for kind in ("original", "VAE", "bicubic"):
                    cells.append(PIL.Image.fromarray(r.samples[kind][i]))
                    labels.append(f"{r.style or r.label}: {kind}")
        grid = make_grid(cells, labels, columns=6, cell=resolution)
        tmp = args.grid.with_suffix(".tmp.png")
        size = save_small_png(grid, tmp, max_bytes=args.grid_max_kb * 1000)
        if size < args.grid_max_kb * 1000:
            tmp.replace(args.grid)
            print(f"\ngrid: {args.grid} ({size / 1000:.0f} KB)")
        else:
            tmp.unlink()
            print(f"\ngrid not written: {size / 1000:.0f} KB >= {args.grid_max_kb} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
