"""media/v2-progress.png: the shipped model beside a v2 training checkpoint, same plain prompts and seeds.

    python experiments/v2_progress.py --unet /work/runs/v2/curve/step-0004400 --v2-model /work/runs/v2/model \\
        --out media/v2-progress.png

Row 1 is the shipped model (repo root), row 2 the v2 UNet swapped into the v2 model folder (scheduler shift 1);
each column one prompt at the pipeline's defaults (40 steps), seed 0. Plain prompts, as a user types them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from sdxs.grid import make_grid
from sdxs.model_folder import load_local_pipeline
from sdxs.model_folder.read import resolve_component

PROMPTS = ["red apple", "penguin", "pizza", "rocket", "green heart", "grinning face", "thumbs up", "flag: Japan"]


def generate(pipe, prompts: list[str], seed: int) -> list:
    return [pipe(p, generator=torch.Generator().manual_seed(seed)).images[0] for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path, required=True, help="a checkpoint folder or a UNet folder")
    parser.add_argument("--v2-model", type=Path, required=True, help="the model folder the v2 run trains in")
    parser.add_argument("--base", type=Path, default=Path("."), help="the shipped model (default: repo root)")
    parser.add_argument("--label", default=None, help="row label of the v2 images (default: the folder name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("media/v2-progress.png"))
    args = parser.parse_args()

    base = load_local_pipeline(str(args.base), dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    images = generate(base, PROMPTS, args.seed)
    labels = [f"v1: {p}" for p in PROMPTS]
    del base
    v2 = load_local_pipeline(str(args.v2_model), dtype=torch.float32)
    v2.register_modules(unet=UNet2DConditionModel.from_pretrained(resolve_component(args.unet, "unet")).eval())
    v2.set_progress_bar_config(disable=True)
    tag = args.label or args.unet.name
    images += generate(v2, PROMPTS, args.seed)
    labels += [f"{tag}: {p}" for p in PROMPTS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, labels, columns=len(PROMPTS), cell=96).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
