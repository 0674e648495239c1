"""Quality and time per Euler step count: the curve a model's `default_num_inference_steps` is chosen from.

    python bench/bench_steps.py --model . --data /work/runs/data/emoji                  # 1, 2, 3, 4, 6, 8, 12, 20, 40
    python bench/bench_steps.py --model . --data DATA --steps 4 --steps 8 --per-kind 4   # a quick look

For each step count, the same prompts and seeds (bare names of `--per-kind` training emoji per kind, and the same
emoji in the robustness classes' eval-only phrasings) are generated and scored by the strict check
(`sdxs.eval.strict`: retrieval among every render at 32x32 on white, nearest-render distance, edge energy), with
the seconds per image of the batched generation (guidance 4: two UNet rows per image and step). Prints a Markdown
table and writes JSON to bench/results/. The default step count is the fewest steps whose retrieval and image
quality are within noise of 40 steps (say so in docs/benchmarks.md with this table).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import environment, print_table, write_results

from sdxs import eval as ev
from sdxs.eval import robust as er
from sdxs.eval import strict as es
from sdxs.model_folder import load_local_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".")
    ap.add_argument("--data", required=True, help="a folder made by `sdxs data emoji`")
    ap.add_argument("--steps", type=int, action="append", help="step counts (repeatable; default 1-40)")
    ap.add_argument("--per-kind", type=int, default=8, help="training emoji per kind (bare names)")
    ap.add_argument("--robust-per-kind", type=int, default=2, help="per kind and robustness class (0: none)")
    ap.add_argument("--holdout-tags", type=float, default=0.25, help="the run's captions.holdout_tags")
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pipe = load_local_pipeline(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    renders = es.load_renders(args.data)
    gallery = es.PixelGallery(renders)
    train = [r for r in renders if r.split == "train"]
    bare = es.pick_per_kind(train, args.per_kind, args.seed)
    rows = []
    for steps in args.steps or [1, 2, 3, 4, 6, 8, 12, 20, 40]:
        gen = ev.GenerationSettings(steps=steps, seed=args.seed, batch_size=args.batch_size)
        start = time.perf_counter()
        images = ev.generate_from_prompts(pipe, [r.bare for r in bare], gen)
        seconds = (time.perf_counter() - start) / len(images)
        scores = es.score_images(gallery, images, bare, "bare names")
        row = {
            "steps": steps,
            "bare_top1": round(scores.top(1), 1),
            "bare_top5": round(scores.top(5), 1),
            "nearest": round(scores.median_nearest(), 4),
            "edge": round(scores.median_edge(), 3),
            "s_per_image": round(seconds, 3),
        }
        if args.robust_per_kind:
            robust = er.robust_eval(
                renders,
                es.load_caption_lines(args.data),
                lambda prompts, gen=gen: ev.generate_from_prompts(pipe, prompts, gen),
                per_kind=args.robust_per_kind,
                holdout_share=args.holdout_tags,
                seed=args.seed,
                gallery=gallery,
            )
            row["robust_top5_mean"] = round(robust.summary()["mean over classes"], 1)
        rows.append(row)
        print(row, flush=True)
    print_table(rows)
    env = environment("cpu", model=args.model, per_kind=args.per_kind)
    print(write_results("steps", env, rows=rows))


if __name__ == "__main__":
    main()
