"""How much each kind of conditioning helps the UNet, per noise band: the flow-matching MSE of the same cached
latents, noise and sigmas with the caption, with the image's own `encode_image` embedding (an image prompt), and
with the empty prompt. "empty - caption" is what the text tells the UNet; it is largest at high noise, where an
image's identity is decided.

    python experiments/cond_gap.py --cache runs/v2/cache --unet v1=. --unet v2=runs/v2/curve/step-0004400
    python experiments/cond_gap.py --cache runs/v2/cache --unet a=A --unet b=B --n 256 --json gap.json

The cache must have been made with `sdxs prepare --image-embeds`. Rows are split into skin-toned people (file names
with a skin-tone modifier) and everything else. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

BANDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
TONED = re.compile(r"-1f3f[b-f]")


def band_of(s: float) -> int:
    return next(i for i in range(len(BANDS) - 1) if BANDS[i] <= s < BANDS[i + 1])


@torch.no_grad()
def measure(unets: dict, cache: str, n: int, seed: int = 0) -> dict:
    """{(unet, conditioning, group, band): [per-sample MSE]} on the first `n` samples of a seeded shuffle."""
    from sdxs.data.loader import LatentShardLoader

    loader = LatentShardLoader(cache, batch_size=64, seed=seed, shuffle=True, sample_posterior=False)
    if not loader.has_image_embeds:
        raise ValueError(f"`--cache` {cache!r} has no image embeddings: prepare it with `sdxs prepare --image-embeds`.")
    empty_embeds, empty_mask = loader.empty_prompt()
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    seen = 0
    for batch in loader:
        x0 = batch["latents"]
        b = x0.shape[0]
        s = (torch.arange(b, dtype=torch.float32) + torch.rand(b, generator=gen)) / b  # evenly spread sigmas
        noise = torch.randn(x0.shape, generator=gen)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        groups = ["toned people" if TONED.search(k) else "the rest" for k in batch["keys"]]
        conds = {
            "caption": (batch["embeds"], batch["mask"]),
            "image prompt": (batch["image_embeds"], batch["image_mask"]),
            "empty": (empty_embeds.expand(b, -1, -1), empty_mask.expand(b, -1)),
        }
        for name, unet in unets.items():
            for cond, (embeds, mask) in conds.items():
                pred = unet(xs, s * 1000, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
                err = ((pred - (noise - x0)) ** 2).mean((1, 2, 3))
                for j in range(b):
                    for group in ("all", groups[j]):
                        out.setdefault((name, cond, group, band_of(float(s[j]))), []).append(float(err[j]))
        seen += b
        if seen >= n:
            break
    return out


def table(res: dict, unets, group: str) -> str:
    head = " | ".join(f"{BANDS[i]:.1f}-{BANDS[i + 1]:.1f}" for i in range(len(BANDS) - 1))
    lines = [f"**{group}**", "", f"| UNet | conditioning | {head} | all |", "|---|---|" + "---:|" * len(BANDS)]
    for name in unets:
        for cond in ("caption", "image prompt", "empty"):
            cells = [res.get((name, cond, group, i), []) for i in range(len(BANDS) - 1)]
            every = sum(cells, [])
            row = " | ".join(f"{sum(c) / len(c):.3f}" if c else "-" for c in cells)
            lines.append(f"| {name} | {cond} | {row} | {sum(every) / max(len(every), 1):.3f} (n={len(every)}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from diffusers import UNet2DConditionModel

    from sdxs.model_folder.read import resolve_component

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="a latent cache made with --image-embeds")
    p.add_argument("--unet", action="append", required=True, metavar="NAME=PATH", help="a UNet, checkpoint or model")
    p.add_argument("--n", type=int, default=768, help="samples (a multiple of 64)")
    p.add_argument("--json", help="also write the per-band means here")
    args = p.parse_args(argv)
    unets = {}
    for spec in args.unet:
        name, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--unet {spec!r}: use NAME=PATH")
        folder = resolve_component(path, "unet")  # a run, checkpoint (EMA first), model or unet folder
        unets[name] = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    res = measure(unets, args.cache, args.n)
    for group in ("all", "toned people", "the rest"):
        print(table(res, unets, group) + "\n")
    if args.json:
        means = [{"unet": k[0], "conditioning": k[1], "group": k[2], "band": f"{BANDS[k[3]]:.1f}-{BANDS[k[3] + 1]:.1f}",
                  "n": len(v), "mse": sum(v) / len(v)} for k, v in sorted(res.items())]  # fmt: skip
        Path(args.json).write_text(json.dumps(means, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
