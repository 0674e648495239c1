"""Make the README's example images in media/ with the model at the repo root (or --model), on CPU in seconds.

    python scripts/make_media.py [--model .] [--out media]

Writes media/txt2img.png (prompts), media/apple.png (the source of the other examples), media/upscale.png (128 px -> image_upscale 256 px, beside bicubic),
media/image-prompt.png (source -> encode_image variations), media/img2img.png (source -> strengths) and
media/refine.md (refine_prompts inputs and outputs, greedy), and for a model that declares styles (`style_tags`)
media/styles.png (the same subjects, one row per style, `__call__(style=...)`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image
import torch

from sdxs.grid import make_grid

PROMPTS = [
    "grinning face, 3d render",
    "red apple, 3d render",
    "dog face, 3d render",
    "thumbs up, 3d render",
    "birthday cake, 3d render",
    "rocket, 3d render",
    "sun with face, 3d render",
    "green heart, 3d render",
]
SOURCE = "red apple, 3d render"  # the image the upscale, image-prompt and img2img examples start from
REFINE = ["cat", "pizza", "smiling face", "rocket", "blue heart"]
STYLE_SUBJECTS = ["red apple", "grinning face", "rocket", "dog face", "sun with face"]  # media/styles.png columns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".", help="model folder (default: the repo root)")
    parser.add_argument("--out", default="media", help="output folder")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    from diffusers import DiffusionPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = DiffusionPipeline.from_pretrained(args.model, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps

    images = pipe(PROMPTS, num_inference_steps=steps, seed=0).images
    make_grid(images, PROMPTS, columns=4).save(out / "txt2img.png")

    source = pipe(SOURCE, num_inference_steps=steps, seed=0).images[0]
    source.save(out / "apple.png")  # the README's usage example reads it
    up = pipe.image_upscale(source)[0]
    bicubic = source.resize(up.size, PIL.Image.Resampling.BICUBIC)
    side = up.width
    make_grid(
        [source.resize(up.size, PIL.Image.Resampling.NEAREST), bicubic, up],
        [f"{source.width} px (nearest)", f"bicubic {side} px", f"image_upscale {side} px"],
        columns=3,
        cell=side,
    ).save(out / "upscale.png")

    emb, mask = pipe.encode_image(source)
    variations = pipe(
        prompt_embeds=emb.expand(3, -1, -1),
        prompt_attention_mask=mask.expand(3, -1),
        num_inference_steps=steps,
        seed=10,
    ).images
    make_grid([source, *variations], ["source", *(f"encode_image, seed {10 + i}" for i in range(3))]).save(
        out / "image-prompt.png"
    )

    strengths = [0.4, 0.6, 0.8]
    edits = [
        pipe("green apple, 3d render", image=source, strength=s, num_inference_steps=steps, seed=0).images[0]
        for s in strengths
    ]
    make_grid([source, *edits], ["source", *(f'"green apple", strength {s}' for s in strengths)]).save(
        out / "img2img.png"
    )

    styles = dict(pipe.config.get("style_tags") or {})
    if styles:  # one row per style: the same subjects and seeds, the style's tag at the end
        cells, labels = [], []
        for name, tag in styles.items():
            cells += pipe(STYLE_SUBJECTS, style=name, num_inference_steps=steps, seed=0).images
            labels += [f"{p}, {tag}" for p in STYLE_SUBJECTS]  # what the model read
        make_grid(cells, labels, columns=len(STYLE_SUBJECTS)).save(out / "styles.png")

    with torch.no_grad():
        refined = pipe.refine_prompts(REFINE, max_new_tokens=40, do_sample=False)
    rows = ["| input | refine_prompts (greedy) |", "|---|---|"]
    rows += [f"| {p} | {r.replace('|', '/').strip()} |" for p, r in zip(REFINE, refined, strict=True)]
    (out / "refine.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print("\n".join(rows))
    print(
        f"wrote {out}/txt2img.png upscale.png image-prompt.png img2img.png refine.md" + (" styles.png" * bool(styles))
    )


if __name__ == "__main__":
    main()
