"""Two strict evals compared prompt by prompt: is a change between two models more than a few lucky prompts?

    python scripts/strict_eval.py --model . --data data/emoji --json runs/strict-shipped.json
    python scripts/strict_eval.py --model runs/f/export --data data/emoji --json runs/strict-f.json
    python scripts/compare_strict.py runs/strict-shipped.json runs/strict-f.json

Both files must come from `scripts/strict_eval.py --json` with the same emoji (same --data, --per-kind,
--held-out, --seed), which is what makes the comparison paired: the same prompt, the same seed, two models. Per group
and kind it prints top-k before and after, the prompts gained and lost, and the two-sided exact sign test (McNemar)
on them (`sdxs.eval.strict.paired_changes`); with the typed-prompt classes too when both files have them
(`--robust-per-kind` > 0, or a `--robust-only` file), per class and pooled. Top-k of 24 or 60 prompts moves by several points on noise alone; a
group whose p is above ~0.05 did not change in a way this eval can tell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdxs.eval.strict import paired_changes


def load(path: Path) -> dict[str, list[dict]]:
    payload = json.loads(path.read_text())
    if "prompts" not in payload and "robust_prompts" not in payload:
        raise ValueError(
            f"{path}: no per-prompt records; it predates them. Score the model again with scripts/strict_eval.py --json"
        )
    groups = dict(payload.get("prompts") or {})  # none in a `--robust-only` file: its typed classes only
    # the prompts as people type them (`--robust-per-kind`): one group per class, and all classes pooled
    robust = payload.get("robust_prompts") or {}
    for label, records in robust.items():
        groups[f"typed: {label}"] = records
    if robust:
        groups["typed: all classes"] = [r for records in robust.values() for r in records]
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="strict_eval.py --json of the model compared against (e.g. shipped)")
    ap.add_argument("after", type=Path, help="strict_eval.py --json of the candidate")
    ap.add_argument("--k", type=int, default=5, help="hit = the prompted emoji among the k nearest renders")
    args = ap.parse_args()
    rows = paired_changes(load(args.before), load(args.after), k=args.k)
    if not rows:
        raise ValueError("the two files share no prompts: were they scored with the same --data, --per-kind, --seed?")
    print(f"before: {args.before}\nafter:  {args.after}\n")
    print(f"| prompts | kind | n | top-{args.k} before | after | gained | lost | p (sign test) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " *" if r["p"] < 0.05 else ""
        print(
            f"| {r['group']} | {r['kind']} | {r['n']} | {r['before']:.1f}% | {r['after']:.1f}% | {r['gained']} | "
            f"{r['lost']} | {r['p']:.3f}{mark} |"
        )
    print("\n* p < 0.05: more than the noise of the same prompts drawn again")


if __name__ == "__main__":
    main()
