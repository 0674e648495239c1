"""Pick a model's default CFG scale: prompt-fidelity retrieval of training captions at several guidance scales.

    python scripts/sweep_guidance.py --model . --data data/emoji --guidance 3 4 5 7 9 --n 96

Uses the eval's own generation and feature space (`sdxs.evaluate`), on a caption subset drawn with another seed
than `sdxs eval`'s (so the eval's numbers are not the ones the default was tuned on). Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from sdxs import evaluate as ev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 4.0, 5.0, 7.0, 9.0])
    parser.add_argument("--n", type=int, default=96, help="training captions per guidance scale")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1000, help="caption subset and sampling seed (eval uses 0)")
    args = parser.parse_args()

    items = ev.load_emoji_dataset(args.data)
    group = ev.pick_subset([it for it in items if it.split == "train"], args.n, args.seed)
    pipe, _ = ev.load_eval_pipeline(args.model, "auto", "auto", progress=False)
    pipe.set_progress_bar_config(disable=True)
    index = ev.RetrievalIndex(ev.gallery_features([it.path for it in items]))
    print(f"| guidance | top-1 | top-5 | n={len(group)} training captions, {args.steps} steps, seed {args.seed} |")
    print("|---:|---:|---:|---|")
    for g in args.guidance:
        gen = ev.GenerationSettings(steps=args.steps, guidance=g, seed=args.seed)
        images = ev.generate_from_prompts(pipe, [it.caption for it in group], gen)
        ranks = index.ranks(np.stack([ev.thumbnail_features(im) for im in images]), [it.index for it in group])
        print(f"| {g:g} | {ev.topk_percent(ranks, 1):.1f}% | {ev.topk_percent(ranks, 5):.1f}% | |", flush=True)


if __name__ == "__main__":
    main()
