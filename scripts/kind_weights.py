"""Write a `data.sample_weights` table for an emoji dataset: one weight per kind of emoji (the strict eval's kinds).

The trainer multiplies these weights into its balance (`data.balance_pattern`), so a kind can be drawn more often
(one-off pictures such as objects and flags, which must be learnt emoji by emoji) or less often (toned people, which
share their picture with their neighbours and score ~100% already). It prints each kind's share of the draws before
and after, with the balance the config uses.

    python scripts/kind_weights.py /work/runs/data/emoji /work/runs/e/weights.csv \\
        --weight objects=2 --weight flags=1.5 --weight "toned people=0.5" --balance "-1f3f[b-f]" --power 0.5

On a multi-style dataset (`sdxs data emoji --styles ...`) `--style-weight 3d=2` multiplies a style's weight in too
(the VAE trainer's `data.sample_weights` reads the same table), and the report adds each style's share.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from pathlib import Path

from sdxs.eval.strict import KINDS, kind_of


def kind_by_prefix(text: str) -> str:
    """`objects` -> "objects/animals/food/travel": a kind named by any unambiguous prefix."""
    hits = [k for k in KINDS if k.startswith(text.strip().lower())]
    if len(hits) != 1:
        raise SystemExit(f"--weight: {text!r} names {'no' if not hits else 'more than one'} kind of {KINDS}.")
    return hits[0]


def shares(rows, weight, pattern: str, power: float, column: str = "kind") -> dict[str, float]:
    """Each value of `column`'s share of the draws: `weight(row)` times the balance (`pattern`, `power`)."""
    keys = [re.sub(pattern, "", Path(r["file_name"]).stem) if pattern else r["file_name"] for r in rows]
    sizes = Counter(keys)
    per = Counter()
    for r, k in zip(rows, keys, strict=True):
        per[r.get(column, "")] += weight(r) * sizes[k] ** -power
    total = sum(per.values())
    return {k: v / total for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="the folder `sdxs data emoji` wrote (holds splits.jsonl)")
    ap.add_argument("out", type=Path, help="the weights table to write (.csv)")
    ap.add_argument("--split", default="train", help="the split that was prepared (keys are relative to it)")
    ap.add_argument("--weight", action="append", default=[], metavar="KIND=W", help="e.g. objects=2 (repeatable)")
    ap.add_argument("--style-weight", action="append", default=[], metavar="STYLE=W", help="e.g. 3d=2 (repeatable)")
    ap.add_argument("--balance", default="-1f3f[b-f]", help="the config's data.balance_pattern, for the report")
    ap.add_argument("--power", type=float, default=1.0, help="the config's data.balance_power, for the report")
    args = ap.parse_args()

    weights = {}
    for item in args.weight:
        kind, _, value = item.partition("=")
        weights[kind_by_prefix(kind)] = float(value)
    style_weights = {}
    for item in args.style_weight:
        style, _, value = item.partition("=")
        style_weights[style.strip()] = float(value)
    rows = []
    with open(args.data / "splits.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == args.split:
                r["kind"] = kind_of(r["group"], r["name"], r["skin_tones"])
                r["file_name"] = Path(r["file_name"]).relative_to(args.split).as_posix()
                rows.append(r)
    if not rows:
        raise SystemExit(f"{args.data / 'splits.jsonl'} has no row of split {args.split!r}.")
    styles = Counter(r.get("style", "") for r in rows)
    unknown = sorted(set(style_weights) - set(styles))
    if unknown:
        raise SystemExit(f"--style-weight: {', '.join(unknown)} not among the dataset's styles {sorted(styles)}.")

    def weight(r) -> float:
        return weights.get(r["kind"], 1.0) * style_weights.get(r.get("style", ""), 1.0)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "weight", "kind"])
        for r in rows:
            w.writerow([r["file_name"], weight(r), r["kind"]])
    before = {c: shares(rows, lambda r: 1.0, args.balance, args.power, c) for c in ("kind", "style")}
    after = {c: shares(rows, weight, args.balance, args.power, c) for c in ("kind", "style")}
    print(f"{len(rows)} images -> {args.out}\n\n| kind | images | weight | share of draws before | after |")
    print("|---|---:|---:|---:|---:|")
    counts = Counter(r["kind"] for r in rows)
    for k in KINDS:
        b, a = before["kind"].get(k, 0.0), after["kind"].get(k, 0.0)
        print(f"| {k} | {counts[k]} | {weights.get(k, 1.0):g} | {b:.1%} | {a:.1%} |")
    if style_weights:
        print("\n| style | images | weight | share of draws before | after |\n|---|---:|---:|---:|---:|")
        for style, n in sorted(styles.items()):
            b, a = before["style"][style], after["style"][style]
            print(f"| {style} | {n} | {style_weights.get(style, 1.0):g} | {b:.1%} | {a:.1%} |")


if __name__ == "__main__":
    main()
