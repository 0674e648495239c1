"""Prompt fidelity of training captions, split by kind of emoji, at one or more guidance scales.

    python scripts/prompt_fidelity.py --model . --data data/emoji                       # the eval's group, split
    python scripts/prompt_fidelity.py --guidance 3 4 6 9 --seed 1000 --train-captions 96   # pick a default CFG

Uses the eval's own generation settings and feature space (`sdxs.eval`). With the default seed 0 it regenerates
`sdxs eval`'s 200 training captions exactly (its totals are reproduced) and splits the retrieval ranks by kind: a
person in five skin tones is the easiest to retrieve (the shape is shared, the tone picks the image), a flag the
hardest (small coloured details on one shape). To tune the guidance scale, use another seed, so that the default is
not chosen on the captions the eval reports.
"""

from __future__ import annotations

import argparse

import numpy as np

from sdxs import eval as ev

KINDS = {"all": lambda c: True, **ev.CAPTION_KINDS}  # the report's per-kind split, plus the whole group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--train-captions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="caption subset and sampling seeds (sdxs eval: 0)")
    args = parser.parse_args()

    items = ev.load_emoji_dataset(args.data)
    group = ev.pick_subset([it for it in items if it.split == "train"], args.train_captions, args.seed)
    pipe, _ = ev.load_eval_pipeline(args.model, "auto", "auto", progress=False)
    pipe.set_progress_bar_config(disable=True)
    index = ev.RetrievalIndex(ev.gallery_features([it.path for it in items]))
    print(f"{len(group)} training captions, {args.steps} steps, seed {args.seed}\n")
    print("| guidance | captions | n | top-1 | top-5 |")
    print("|---:|---|---:|---:|---:|")
    for guidance in args.guidance:
        gen = ev.GenerationSettings(steps=args.steps, guidance=guidance, seed=args.seed)
        images = ev.generate_from_prompts(pipe, [it.caption for it in group], gen)
        ranks = index.ranks(np.stack([ev.thumbnail_features(im) for im in images]), [it.index for it in group])
        for kind, is_kind in KINDS.items():
            sel = np.array([is_kind(it.caption) for it in group])
            top1, top5 = ev.topk_percent(ranks[sel], 1), ev.topk_percent(ranks[sel], 5)
            print(f"| {guidance:g} | {kind} | {sel.sum()} | {top1:.1f}% | {top5:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
