"""The strict, per-kind prompt-fidelity check of `sdxs.eval.strict` on a model folder or a training checkpoint.

    python scripts/strict_eval.py --model . --data data/emoji                        # the shipped model
    python scripts/strict_eval.py --model runs/v2/model --unet runs/v2/unet/checkpoints/step-000400 \\
        --json runs/v2/strict/step-400.json                                           # one point of a curve
    python scripts/strict_eval.py --model . --per-kind 8 --no-refine --no-image-prompts   # a quick look
    python scripts/strict_eval.py --model . --robust-only --steps 8                   # prompts as people type them

`--unet` swaps a UNet folder into the model (a checkpoint's `unet_ema/` when it has one, else its `unet/`; `--weights
raw` for the raw weights; a run folder means its latest checkpoint), so a run's checkpoints can be scored while it
trains; `--text-encoder` does the same for a text encoder (with the tokenizer saved beside it: `sdxs train
text-align` runs). `--loss-bands CACHE` also prints the flow-matching loss per noise band on a fixed batch of that latent cache
(the same noise for every model compared).
On a dataset of several styles (`sdxs data emoji --styles 3d,twemoji,noto`) every group is scored on the default
style among its renders, and the held-out (emoji, style) pairs add rows per style ("held-out style pairs, twemoji":
`NAME, TAG` among that style's renders, up to `--held-out` per style) and for all styles together.
Prints a Markdown table; `--json` keeps the numbers (per group and kind, and per prompt: `scripts/compare_strict.py`
compares two such files prompt by prompt), `--grid` writes the labelled bare-name grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdxs import eval as ev
from sdxs.eval import strict as es
from sdxs.grid import make_grid
from sdxs.model_folder import load_local_pipeline
from sdxs.model_folder.read import resolve_component


def loss_bands(pipe, cache: str, bands=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), n: int = 512, seed: int = 0) -> list[dict]:
    """Flow-matching MSE of the pipeline's UNet per sigma band, on `n` cached latents with fixed noise and sigmas."""
    from sdxs.data.loader import LatentShardLoader

    loader = LatentShardLoader(cache, batch_size=64, seed=seed, shuffle=False, sample_posterior=False)
    gen = torch.Generator().manual_seed(seed)
    rows = {i: [] for i in range(len(bands) - 1)}
    seen = 0
    with torch.no_grad():
        for batch in loader:
            x0 = batch["latents"]
            b = x0.shape[0]
            # evenly spread sigmas, the same for every model compared
            s = (torch.arange(b, dtype=torch.float32) + torch.rand(b, generator=gen)) / b
            noise = torch.randn(x0.shape, generator=gen)
            xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
            pred = pipe.unet(
                xs, s * 1000, encoder_hidden_states=batch["embeds"], encoder_attention_mask=batch["mask"]
            ).sample
            err = ((pred - (noise - x0)) ** 2).mean((1, 2, 3))
            for j in range(b):
                for i in range(len(bands) - 1):
                    if bands[i] <= s[j] < bands[i + 1]:
                        rows[i].append(float(err[j]))
            seen += b
            if seen >= n:
                break
    return [
        {"band": f"{bands[i]:.1f}-{bands[i + 1]:.1f}", "n": len(v), "mse": round(sum(v) / max(len(v), 1), 4)}
        for i, v in rows.items()
    ]


def robust_payload(args, robust) -> dict:
    return {
        "model": args.model,
        "unet": str(args.unet) if args.unet else None,
        "text_encoder": str(args.text_encoder) if args.text_encoder else None,
        "steps": args.steps,
        "robust_rows": [row for s in robust.scores for row in s.rows()],
        "robust_summary": robust.summary(),
        "robust_prompts": {
            s.label: [{**r, "text": t} for r, t in zip(s.per_prompt(), s.prompts, strict=True)] for s in robust.scores
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--unet", type=Path, help="a UNet folder, training checkpoint or run folder to swap in")
    parser.add_argument(
        "--text-encoder",
        type=Path,
        help="a text encoder folder, checkpoint or run folder to swap in (with its tokenizer: `sdxs train text-align`)",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "raw"),
        default="auto",
        help="a checkpoint's EMA or raw weights (auto: EMA)",
    )
    parser.add_argument("--data", default="data/emoji")
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=60, help="held-out emoji, skin tones, style pairs per style")
    parser.add_argument("--image-prompts", type=int, default=48)
    parser.add_argument("--refine-per-kind", type=int, default=8)
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument(
        "--min-token-prob", type=float, help="refine_prompts' min_token_prob (default: the pipeline's; 0: no filter)"
    )
    parser.add_argument(
        "--cut-after-unlikely",
        action=argparse.BooleanOptionalAction,
        help="refine_prompts' cut_after_unlikely (default: the pipeline's)",
    )
    parser.add_argument("--no-image-prompts", action="store_true")
    parser.add_argument(
        "--robust-per-kind",
        type=int,
        default=8,
        help="training emoji per kind and robustness class (0: no robust rows)",
    )
    parser.add_argument("--robust-only", action="store_true", help="only the robustness classes (sdxs.eval.robust)")
    parser.add_argument(
        "--robust-classes", help='comma-separated robustness classes (default: all nine), e.g. "everyday words,plurals"'
    )
    parser.add_argument(
        "--holdout-tags", type=float, default=0.25, help="the training run's captions.holdout_tags (everyday words)"
    )
    parser.add_argument("--steps", type=int, help="Euler steps (default: the model's default_num_inference_steps)")
    parser.add_argument("--guidance", type=float, default=4.0, help="the pipeline's default: 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--loss-bands", metavar="CACHE", help="also print the loss per sigma band on this cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", type=Path)
    parser.add_argument(
        "--robust-grid", type=Path, help="a labelled grid of each robustness class's first prompt per kind (PNG)"
    )
    args = parser.parse_args()

    t0 = time.time()
    pipe = load_local_pipeline(args.model, dtype=torch.float32)
    if args.unet is not None:
        from diffusers import UNet2DConditionModel

        unet_dir = resolve_component(args.unet, "unet", args.weights)
        print(f"UNet weights: {unet_dir}", flush=True)
        pipe.unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    if args.text_encoder is not None:
        from sdxs.model_folder.read import swap_component

        te_dir = resolve_component(args.text_encoder, "text_encoder", args.weights)
        print(f"text encoder weights: {te_dir}", flush=True)
        swap_component(pipe, "text_encoder", te_dir)
    pipe.set_progress_bar_config(disable=True)
    refine_kwargs = {} if args.min_token_prob is None else {"min_token_prob": args.min_token_prob}
    if args.cut_after_unlikely is not None:
        refine_kwargs["cut_after_unlikely"] = args.cut_after_unlikely
    args.steps = args.steps or int(pipe.config.get("default_num_inference_steps") or 40)
    gen = ev.GenerationSettings(steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    renders = es.load_renders(args.data)
    generate = lambda prompts: ev.generate_from_prompts(pipe, prompts, gen)  # noqa: E731
    robust = None
    if args.robust_per_kind > 0:
        from sdxs.eval import robust as er

        robust = er.robust_eval(
            es.in_style(renders, es.styles_of(renders)[0]),  # the default style: prompts without a style tag
            es.load_caption_lines(args.data),
            generate,
            per_kind=args.robust_per_kind,
            holdout_share=args.holdout_tags,
            classes=er.parse_classes(args.robust_classes),
            seed=args.seed,
        )
    if args.robust_grid and robust is not None and robust.grid:
        args.robust_grid.parent.mkdir(parents=True, exist_ok=True)
        im = make_grid([im for im, _ in robust.grid], [p for _, p in robust.grid], columns=len(es.KINDS))
        ev.save_small_png(im, args.robust_grid)
    if args.robust_only:
        print(
            f"model {args.model}"
            + (f", UNet {args.unet}" if args.unet else "")
            + (f", text encoder {args.text_encoder}" if args.text_encoder else "")
            + f", {args.steps} steps, "
            f"{time.time() - t0:.0f} s\n"
        )
        print(er.markdown_table(robust))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(robust_payload(args, robust), indent=1))
        return
    result = es.strict_eval(
        renders,
        generate,
        None if args.no_image_prompts else (lambda paths: ev.generate_from_images(pipe, paths, gen)),
        None if args.no_refine else (lambda prompts: pipe.refine_prompts(prompts, seed=args.seed, **refine_kwargs)),
        per_kind=args.per_kind,
        held_out=args.held_out,
        image_prompts=0 if args.no_image_prompts else args.image_prompts,
        refine_per_kind=args.refine_per_kind,
        seed=args.seed,
    )
    print(
        f"model {args.model}"
        + (f", UNet {args.unet}" if args.unet else "")
        + (f", text encoder {args.text_encoder}" if args.text_encoder else "")
        + f", {args.steps} steps, "
        f"guidance {args.guidance}, {len(renders)} renders in the gallery, {time.time() - t0:.0f} s\n"
    )
    print(es.markdown_table(result.scores))
    if robust is not None:
        print("\nPrompts as people type them (eval-only templates and words, `sdxs.eval.robust`):\n")
        print(er.markdown_table(robust))
    if result.refine_kept is not None:
        print(f"\nrefine_prompts keeps the named emoji in {result.refine_kept:.1f}% of bare names")
        own, foreign = result.refine_tags
        print(f"and adds {own} of the emoji's own caption tags and {foreign} others (style and skin tones aside)")
        for a, b in result.refine_examples[:8]:
            print(f"  {a!r} -> {b!r}")
    bands = loss_bands(pipe, args.loss_bands) if args.loss_bands else None
    if bands:
        print("\n| sigma band | n | flow-matching MSE |\n|---|---:|---:|")
        for row in bands:
            print(f"| {row['band']} | {row['n']} | {row['mse']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": args.model,
            "unet": str(args.unet) if args.unet else None,
            "steps": args.steps,
            "guidance": args.guidance,
            "rows": [row for s in result.scores for row in s.rows()],
            "prompts": {s.label: s.per_prompt() for s in result.scores},  # for scripts/compare_strict.py
            "refine_kept": result.refine_kept,
            "refine_tags": dict(zip(("own", "foreign"), result.refine_tags, strict=True))
            if result.refine_tags
            else None,
            "refine_examples": result.refine_examples,
            "loss_bands": bands,
            **(robust_payload(args, robust) if robust is not None else {}),
        }
        args.json.write_text(json.dumps(payload, indent=1))
    if args.grid and result.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        ev.save_small_png(make_grid([im for im, _ in result.grid], [p for _, p in result.grid], columns=6), args.grid)


if __name__ == "__main__":
    main()
