"""The LoRA demo of docs/training-lora.md: a sepia-toned copy of an emoji subset, and the before/after measurement.

    python scripts/lora_sepia.py data data/emoji/train runs/lora-sepia/images
    python scripts/lora_sepia.py grid --model . --lora runs/lora-sepia/run/export --out media/lora-before-after.png

`data`: a seeded, category-balanced choice of `--count` emoji (no skin-tone variants), each recoloured to sepia
(luminance mapped onto a brown-to-cream ramp; alpha kept), captions copied unchanged: the LoRA learns a style, not
a trigger word, so every prompt moves toward it.
`grid`: the same prompts and seeds through the base model, the LoRA at scale 0.5 and at 1.0; prints the "sepia
distance" of each (mean |image - sepia(image)| over RGB pixels in [0, 1]: 0 for an image already sepia) and
writes a labelled grid (rows = prompts, columns = base / 0.5 / 1.0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

PROMPTS = [
    "grinning face, 3d render",
    "red apple, 3d render",
    "dog face, 3d render",
    "rocket, 3d render",
    "green heart, 3d render",
    "sun, 3d render",
    "blue car, 3d render",
    "pizza, 3d render",
    "frog, 3d render",
    "rainbow, 3d render",
    "watermelon, 3d render",
    "butterfly, 3d render",
    "party popper, 3d render",
    "house, 3d render",
    "strawberry, 3d render",
    "crystal ball, 3d render",
]


def sepia(image: PIL.Image.Image) -> PIL.Image.Image:
    """Luminance onto a dark-brown -> tan -> cream ramp (alpha, if any, unchanged)."""
    rgba = image.convert("RGBA")
    toned = PIL.ImageOps.colorize(rgba.convert("L"), black="#2a1a0c", mid="#a9804f", white="#fff3dc")
    toned.putalpha(rgba.getchannel("A"))
    return toned if image.mode == "RGBA" else toned.convert("RGB")


def sepia_distance(image: PIL.Image.Image) -> float:
    """Mean |x - sepia(x)| over RGB pixels in [0, 1]: how far an image's colours are from its own sepia version."""
    rgb = image.convert("RGB")
    a = np.asarray(rgb, dtype=np.float32) / 255
    b = np.asarray(sepia(rgb), dtype=np.float32) / 255
    return float(np.abs(a - b).mean())


def cmd_data(args) -> None:
    src, out = Path(args.src), Path(args.out)
    splits = Path(args.splits) if args.splits else src.parent / "splits.jsonl"
    rows = [json.loads(ln) for ln in splits.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["split"] == "train" and not r["skin_tones"]]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    rng = random.Random(args.seed)
    for group in by_group.values():
        rng.shuffle(group)
    chosen: list[dict] = []
    while len(chosen) < args.count and any(by_group.values()):  # round robin over the categories
        for group in sorted(by_group):
            if by_group[group] and len(chosen) < args.count:
                chosen.append(by_group[group].pop())
    out.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        path = src.parent / r["file_name"]
        sepia(PIL.Image.open(path)).save(out / (path.stem + ".png"))
        shutil.copy2(path.with_suffix(".txt"), out / (path.stem + ".txt"))
    print(f"{len(chosen)} sepia images in {out}")


def cmd_grid(args) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from sdxs.grid import make_grid

    pipe = DiffusionPipeline.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[: args.prompts]

    def generate(scale: float | None) -> list:
        kw = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
        return [
            pipe(p, num_inference_steps=args.steps, seed=args.seed + i, **kw).images[0] for i, p in enumerate(prompts)
        ]

    columns = {"base": generate(None)}
    pipe.load_lora_weights(args.lora)
    columns["LoRA 0.5"] = generate(0.5)
    columns["LoRA 1.0"] = generate(1.0)
    result = {}
    for name, images in columns.items():
        d = [sepia_distance(im) for im in images]
        result[name] = {"mean": float(np.mean(d)), "per_prompt": [round(x, 4) for x in d]}
        print(f"{name:9s} sepia distance {np.mean(d):.4f} (mean of {len(d)} prompts)")
    closer = sum(lb < b for lb, b in zip(result["LoRA 1.0"]["per_prompt"], result["base"]["per_prompt"], strict=True))
    print(f"LoRA 1.0 closer to sepia than base on {closer}/{len(prompts)} prompts")
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": prompts, **result}, indent=1))
    shown = prompts[: args.rows]
    images, labels = [], []
    for i, p in enumerate(shown):
        for name, col in columns.items():
            images.append(col[i])
            labels.append(f"{p.split(',')[0]} - {name}")
    grid = make_grid(images, labels, columns=len(columns), cell=args.cell)
    grid.quantize(colors=256, method=PIL.Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the sepia subset")
    d.add_argument("src", help="the emoji train folder (image + caption files)")
    d.add_argument("out", help="output folder (outside the repo)")
    d.add_argument("--splits", help="splits.jsonl with groups (default: beside the src folder)")
    d.add_argument("--count", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)
    g = sub.add_parser("grid", help="base vs LoRA: numbers and a grid")
    g.add_argument("--model", default=".")
    g.add_argument("--lora", required=True, help="folder with pytorch_lora_weights.safetensors")
    g.add_argument("--out", default="media/lora-before-after.png")
    g.add_argument("--json", help="also write the numbers here")
    g.add_argument("--prompts", type=int, default=16, help="prompts measured")
    g.add_argument("--rows", type=int, default=6, help="prompts shown in the grid")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cell", type=int, default=128)
    g.set_defaults(func=cmd_grid)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
