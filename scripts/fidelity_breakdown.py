"""Prompt fidelity of `sdxs eval`'s training-caption group, split into skin-tone variants, flags and the rest.

    python scripts/fidelity_breakdown.py --model . --data data/emoji

Regenerates the eval's 200 training captions with the eval's own settings and seeds (its totals are reproduced
exactly) and splits the retrieval ranks by kind of emoji: a person in five skin tones is the easiest to retrieve
(the shape is shared, the tone picks the image), a flag the hardest (small coloured details on the same shape).
"""

from __future__ import annotations

import argparse

import numpy as np

from sdxs import evaluate as ev

KINDS = {
    "skin-tone variants": lambda c: "skin tone" in c,
    "flags": lambda c: c.startswith("flag"),
    "other": lambda c: "skin tone" not in c and not c.startswith("flag"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--train-captions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = ev.load_emoji_dataset(args.data)
    group = ev.pick_subset([it for it in items if it.split == "train"], args.train_captions, args.seed)
    pipe, _ = ev.load_eval_pipeline(args.model, "auto", "auto", progress=False)
    pipe.set_progress_bar_config(disable=True)
    index = ev.RetrievalIndex(ev.gallery_features([it.path for it in items]))
    images = ev.generate_from_prompts(pipe, [it.caption for it in group], ev.GenerationSettings(seed=args.seed))
    ranks = index.ranks(np.stack([ev.thumbnail_features(im) for im in images]), [it.index for it in group])
    print("| training captions | n | top-1 | top-5 |\n|---|---:|---:|---:|")
    print(f"| all | {len(group)} | {ev.topk_percent(ranks, 1):.1f}% | {ev.topk_percent(ranks, 5):.1f}% |")
    for name, is_kind in KINDS.items():
        sel = np.array([is_kind(it.caption) for it in group])
        print(
            f"| {name} | {sel.sum()} | {ev.topk_percent(ranks[sel], 1):.1f}% | {ev.topk_percent(ranks[sel], 5):.1f}% |"
        )


if __name__ == "__main__":
    main()
