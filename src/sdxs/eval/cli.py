"""`sdxs eval`: the subcommand's flags, and a call into `sdxs.eval.evaluate`."""

from __future__ import annotations

import argparse
import shlex
import sys

from sdxs.eval.refine import DEFAULT_REFINE_PROMPTS
from sdxs.eval.suite import evaluate

EPILOG = """examples:
  sdxs eval --model . --data data/emoji                           # full run -> docs/eval.md, media/eval-grid.png
  sdxs eval --model . --data data/emoji --limit 8 --steps 10      # a quick look (numbers not for publishing)
  sdxs eval --model out/ --data data/emoji --device cuda --batch-size 32 --out runs/eval.md --grid runs/grid.png
"""


def register(subparsers) -> None:
    """Add `sdxs eval` to the top-level `sdxs` subparsers."""
    from sdxs.cli_types import positive_int, seed_int
    from sdxs.runtime import DEVICES, DTYPES

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on the emoji dataset and write docs/eval.md",
        description="VAE reconstruction, prompt fidelity, image prompts and refine_prompts on an emoji-format dataset "
        "(see docs/eval-method.md); writes a Markdown report and a sample grid.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", metavar="FOLDER", help="model folder or hub id (default: $SDXS_MODEL, else the repo root)"
    )
    p.add_argument("--data", default="data/emoji", help="folder made by `sdxs data emoji` (default: data/emoji)")
    p.add_argument("--out", default="docs/eval.md", help="report path (default: docs/eval.md)")
    p.add_argument("--grid", default="media/eval-grid.png", help="sample grid PNG (default: media/eval-grid.png)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda, then mps, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bf16/fp16 on GPUs, fp32 on cpu")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default: 4)")
    p.add_argument("--seed", type=seed_int, default=0, help="subset choice and generation seeds (default: 0)")
    p.add_argument("--width", type=positive_int, help="generated width (default: the model's)")
    p.add_argument("--height", type=positive_int, help="generated height (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per pipeline call (default: 16)")
    p.add_argument("--train-captions", type=positive_int, default=200, help="training captions to test (default: 200)")
    p.add_argument(
        "--vae-train-images", type=int, default=200, help="training images in the VAE table; 0: none (default: 200)"
    )
    p.add_argument("--image-prompts", type=positive_int, default=100, help="source images per split (default: 100)")
    p.add_argument("--limit", type=positive_int, help="cap every group at this many images (a quick run)")
    p.add_argument("--refine", nargs="*", metavar="PROMPT", help="prompts for the refine table (none: skip it)")
    p.add_argument("--refine-max-new-tokens", type=positive_int, default=80, help="(default: 80)")
    p.add_argument(
        "--strict-per-kind", type=int, default=24, help="training emoji per kind, strict section; 0: skip (default: 24)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `evaluate` with the command's flags and print where the report went."""
    from sdxs.runtime import flag_values, quiet_libraries

    if args.vae_train_images < 0:
        raise ValueError(f"--vae-train-images must be >= 0, got {args.vae_train_images}")
    quiet_libraries(False)
    flags = flag_values(
        args,
        "steps guidance seed width height batch_size train_captions vae_train_images image_prompts limit "
        "refine_max_new_tokens strict_per_kind device dtype",
    )
    result = evaluate(
        args.model,
        args.data,
        out_md=args.out,
        grid_path=args.grid,
        refine_prompts=DEFAULT_REFINE_PROMPTS if args.refine is None else args.refine,
        command=shlex.join(["sdxs", *sys.argv[1:]]) if sys.argv[1:2] == ["eval"] else None,
        progress=not args.quiet,
        **flags,
    )
    print(result.markdown_path)
    if result.grid_path is not None:
        print(result.grid_path)
    if result.strict_grid_path is not None:
        print(result.strict_grid_path)
    return 0
