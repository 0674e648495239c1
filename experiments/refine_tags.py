"""Which tags does `refine_prompts` add, and are they the emoji's own? Chooses `min_token_prob` on training names
that the strict eval's refine set does not use (so that set stays a test).

    python experiments/refine_tags.py --model . --data data/emoji --per-kind 24 --min-token-prob 0 0.02 0.05 0.1

For each threshold: the tags added after the name (style and skin-tone tags aside), how many are among the emoji's
own caption tags (its lines in splits.jsonl), how many are not, and the prompts whose refinement changed. The same
seed gives the same sampled tokens at every threshold, so the rows differ only in what the filter drops.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdxs.eval import strict as es
from sdxs.model_folder import load_local_pipeline
from sdxs.pipeline import SKIN_TONE_TAG

STYLE = "3d render"


def added_tags(refined: str, prompt: str) -> list[str]:
    """The tags a refinement added after the prompt's own, without the style tag and skin tones."""
    tags = [t.strip().lower() for t in refined.split(",")][len(prompt.split(",")) :]
    return [t for t in tags if t and t != STYLE and not SKIN_TONE_TAG.match(t)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--min-token-prob", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument(
        "--generate", default="{}", help="JSON of further `generate` arguments, e.g. '{\"min_p\": 0.1}'"
    )
    parser.add_argument("--seed", type=int, default=0, help="the strict eval's seed: its refine set is left out")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    renders = es.load_renders(args.data)
    train = [r for r in renders if r.split == "train"]
    test = {r.index for r in es.pick_per_kind(train, 8, args.seed + 2)}  # the refine set of strict_eval
    dev = es.pick_per_kind([r for r in train if r.index not in test], args.per_kind, args.seed + 7)
    rows = [json.loads(line) for line in (Path(args.data) / "splits.jsonl").read_text(encoding="utf-8").splitlines()]
    own = {}
    for r in dev:
        own[r.bare] = {t.strip().lower() for line in rows[r.index]["text"] for t in line.split(",")}

    pipe = load_local_pipeline(args.model, dtype=torch.float32)
    prompts = [r.bare for r in dev]
    results = {}
    for p in args.min_token_prob:
        refined = []
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            refined += pipe.refine_prompts(chunk, seed=args.seed + i, min_token_prob=p, **json.loads(args.generate))
        results[p] = refined

    print(f"{len(dev)} training names ({args.per_kind} per kind, none from the strict eval's refine set)\n")
    print("| min_token_prob | added tags | the emoji's own | not its own | share own |")
    print("|---:|---:|---:|---:|---:|")
    for p, refined in results.items():
        tags = [(t, t in own[q]) for q, r in zip(prompts, refined, strict=True) for t in added_tags(r, q)]
        n_own = sum(o for _, o in tags)
        share = 100.0 * n_own / max(len(tags), 1)
        print(f"| {p:g} | {len(tags)} | {n_own} | {len(tags) - n_own} | {share:.1f}% |")
    base, *others = args.min_token_prob
    for p in others:
        print(f"\nchanged by min_token_prob={p:g} (vs {base:g}):")
        for q, a, b in zip(prompts, results[base], results[p], strict=True):
            if a != b:
                print(f"  {q!r}: {a!r} -> {b!r}")
    if args.json:
        args.json.write_text(json.dumps({str(p): dict(zip(prompts, r, strict=True)) for p, r in results.items()}))


if __name__ == "__main__":
    main()
