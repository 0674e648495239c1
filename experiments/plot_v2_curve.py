"""The v2 curve (issue 16): each strict metric against training samples since v1, per kind, one line per recipe.

The numbers live in docs/v2-curve.csv (one row per scored checkpoint; every row came from
`python scripts/strict_eval.py --model MODEL --unet CKPT --data DATA --per-kind 12 --held-out 0 --no-refine
--json OUT.json`, see docs/training-emoji.md, unless its point name says otherwise). `--add` appends the row of one
such JSON, then the figure is drawn with the issue's targets as dotted lines. The held-out columns are filled only for
the points that had a full eval (`strict_eval.py` with its default 60 held-out emoji and 60 held-out skin tones): the
curve checks skip them for time, and held-out emoji are what falls when training emoji are fitted.

    python experiments/plot_v2_curve.py                                        # media/v2-curve.png from the CSV
    python experiments/plot_v2_curve.py --add E "E step 400" 25600 runs/e/strict/step-400.json
    python experiments/plot_v2_curve.py --fit --since 250000 --rate 17.5 --rate 57  # compute the targets need

`--fit` answers "how much more compute do the targets need" from the curve itself: for each target it fits a straight
line (least squares) to each recipe line's points at or past `--since` samples (the rising part of its curve) and
prints the slope, where the line meets the target, and the hours that takes at each `--rate` (samples/s). A
straight line through a curve that bends is a rough yardstick, so the table also says how far the points scatter
around it; it is a reading of the curve, not a promise.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

KINDS = {  # CSV column suffix -> the strict eval's kind
    "all": "all",
    "toned": "toned people",
    "other": "other people",
    "objects": "objects/animals/food/travel",
    "smileys": "smileys",
    "symbols": "symbols",
    "flags": "flags",
}
TARGETS = {  # issue 16, top-5 %: (bare names, exact captions)
    "toned": (90, None),
    "objects": (70, 85),
    "smileys": (60, None),
    "symbols": (60, None),
    "flags": (30, None),
}
CSV = Path(__file__).resolve().parents[1] / "docs" / "v2-curve.csv"
# a line that continues another's point: F = E resumed from the shipped v2.0, G = F resumed from the shipped v2
BRANCHES = {
    "F": ("E", "E step 3600"),
    "G": ("F", "F step 2000 (full eval, 24 per kind)"),
    "H": ("G", "G step 11239 (full eval, 24 per kind)"),
    "I": ("H", "H step 13239 (full eval, 24 per kind)"),
}


def row_from_json(line: str, point: str, samples: int, path: Path, header: list[str]) -> list[str]:
    """One CSV row from a strict_eval.py JSON (bare names, exact captions, image prompts, nearest/edge of bare)."""
    rows = json.loads(path.read_text())["rows"]
    by = {(r["group"], r["kind"]): r for r in rows}

    def top5(group: str, kind: str) -> str:
        r = by.get((group, kind))
        return "" if r is None else f"{r['top5']:.0f}"

    values = {"line": line, "point": point, "samples": str(samples)}
    for short, kind in KINDS.items():
        values[f"bare_{short}"] = top5("training, bare name", kind)
        values[f"exact_{short}"] = top5("training, exact caption", kind)
    for short in ("all", "toned", "objects"):
        values[f"image_{short}"] = top5("image prompts, training images", KINDS[short])
    bare = by[("training, bare name", "all")]
    values["nearest_bare"], values["edge_bare"] = f"{bare['nearest']:.3f}", f"{bare['edge']:.2f}"
    values["heldout_emoji"] = top5("held-out emoji, bare name", "all")  # blank unless scored with --held-out N
    values["heldout_tones"] = top5("held-out skin tones, bare name", "all")
    return [values.get(h, "") for h in header]


def fit_targets(rows: list[dict], since: int, rates: list[float]) -> str:
    """Markdown table: per target, the straight line through the points at >= `since` samples and where it meets the
    target (see the module docstring)."""
    import numpy as np

    goals = [(f"bare_{k}", b) for k, (b, _) in TARGETS.items() if b] + [
        (f"exact_{k}", e) for k, (_, e) in TARGETS.items() if e
    ]
    goals.append(("image_all", 50))
    head = "| metric | target | points | last | slope per 100k samples | scatter (rms) | meets the target at | more samples |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    out[0] += "".join(f" hours at {r:g}/s |" for r in rates)
    out[1] += "---|" * len(rates)
    last_x = max(int(r["samples"]) for r in rows)
    for col, target in goals:
        pts = [(int(r["samples"]), float(r[col])) for r in rows if r[col] and int(r["samples"]) >= since]
        if len(pts) < 3:
            out.append(f"| {col} | {target} | {len(pts)} | | too few points to fit | | | |" + " |" * len(rates))
            continue
        x, y = np.array(pts, dtype=float).T
        slope, icpt = np.polyfit(x, y, 1)
        rms = float(np.sqrt(np.mean((y - (slope * x + icpt)) ** 2)))
        now = slope * last_x + icpt
        if now >= target:
            at, more = "reached", 0.0
        elif slope <= 0:
            at, more = "never (flat or falling)", float("inf")
        else:
            x_hit = (target - icpt) / slope
            at, more = f"{x_hit / 1e6:.2f}M samples", x_hit - last_x
        hours = "".join(f" {more / r / 3600:.1f} |" if np.isfinite(more) else " - |" for r in rates)
        more_txt = f"{more / 1e6:.2f}M" if np.isfinite(more) else "-"
        out.append(
            f"| {col} | {target} | {len(pts)} | {y[np.argmax(x)]:.0f} | {slope * 1e5:+.1f} | {rms:.1f} | {at} | "
            f"{more_txt} |{hours}"
        )
    return "\n".join(out)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v1 = next(r for r in rows if r["point"] == "v1")
    lines = sorted({r["line"] for r in rows}, key=lambda n: (n != "A-D", n))
    colours = dict(
        zip(lines, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"], strict=False)
    )
    fig, axes = plt.subplots(2, 5, figsize=(24, 8.5), sharex=True)
    panels = [*KINDS, "image", "heldout", "nearest"]
    for ax, panel in zip(axes.flat, panels, strict=True):
        for line in lines:
            start = BRANCHES.get(line, ("A-D", "v1"))
            first = next(r for r in rows if (r["line"], r["point"]) == start)
            own = sorted((r for r in rows if r["line"] == line and r is not first), key=lambda r: int(r["samples"]))
            pts = [first, *own]
            x = [int(r["samples"]) / 1000 for r in pts]
            if panel == "nearest":
                ax.plot(x, [float(r["nearest_bare"]) for r in pts], "o-", ms=3, color=colours[line], label=line)
                continue
            if panel == "image":
                ys = [(x_, float(r["image_all"])) for x_, r in zip(x, pts, strict=True) if r["image_all"]]
                ax.plot(*zip(*ys, strict=True), "o-", ms=3, color=colours[line], label=f"{line}, all kinds")
                continue
            if panel == "heldout":  # only the points scored with held-out prompts (the full evals)
                for col, style, what in (("heldout_emoji", "o-", "emoji"), ("heldout_tones", "s--", "tones")):
                    ys = [(x_, float(r[col])) for x_, r in zip(x, pts, strict=True) if r.get(col)]
                    if ys:
                        ax.plot(*zip(*ys, strict=True), style, ms=4, color=colours[line], label=f"{line}, {what}")
                continue
            for kind_of_prompt, style in (("bare", "o-"), ("exact", "s--")):
                ys = [float(r[f"{kind_of_prompt}_{panel}"]) for r in pts]
                ax.plot(x, ys, style, ms=3, color=colours[line], label=f"{line}, {kind_of_prompt}")
        if panel == "nearest":
            ax.axhline(0.06, ls=":", color="k")
            ax.set_title("nearest-render distance, bare names (target <= 0.06)")
            ax.set_ylim(0, 0.2)
        elif panel == "heldout":
            ax.axhline(20, ls=":", color="k")
            ax.set_title("held-out emoji (o-) / skin tones (s--), 60 each,\nbare names top-5 % (full evals only)")
            ax.set_ylim(-3, 103)
            ax.legend(fontsize=7)
        elif panel == "image":
            ax.axhline(50, ls=":", color="k")
            ax.axhline(float(v1["image_all"]), ls=":", color="grey")
            ax.set_title("image prompts top-5 % (target 50; v1 grey)")
            ax.set_ylim(-3, 103)
        else:
            bare, exact = TARGETS.get(panel, (None, None))
            for t in (bare, exact):
                if t is not None:
                    ax.axhline(t, ls=":", color="k")
            ax.set_title(f"{KINDS[panel]} top-5 % (targets dotted)")
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training samples since v1 (thousands)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    fig.suptitle(
        "sdxs-emoji v2: strict top-5 per kind, 12 training emoji per kind (one image = 8 points; 24 at the points named "
        "'full eval'), bare names (o-) and exact captions (s--)",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--add", nargs=4, metavar=("LINE", "POINT", "SAMPLES", "JSON"), action="append", default=[])
    ap.add_argument("--out", type=Path, default=CSV.parents[1] / "media" / "v2-curve.png")
    ap.add_argument("--fit", action="store_true", help="print the compute each target needs at the curve's rate")
    ap.add_argument("--since", type=int, default=250_000, help="--fit uses the points at >= this many samples")
    ap.add_argument("--rate", type=float, action="append", default=[], help="samples/s for --fit's hours column")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        table = list(csv.reader(f))
    header = table[0]
    for line, point, samples, path in args.add:
        table = [r for r in table if not (r[0] == line and r[1] == point)]  # re-scoring a point replaces it
        table.append(row_from_json(line, point, int(samples), Path(path), header))
    if args.add:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows(table)
    rows = [dict(zip(header, r, strict=True)) for r in table[1:]]
    if args.fit:
        for line in sorted({r["line"] for r in rows}):
            print(f"\n{line} (points at >= {args.since:,} samples):\n")
            print(fit_targets([r for r in rows if r["line"] == line], args.since, args.rate or [17.5]))
        return
    plot(rows, args.out)


if __name__ == "__main__":
    main()
