"""The argument parsers of the `sdxs` command's own subcommands (generate, upscale, refine, encode-image, serve,
info, init): flags, defaults, help and examples. Each `add_*_parser` takes the function that runs the command, so this
module depends on nothing but argparse types; `sdxs.cli` wires them together and runs them."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sdxs.cli_types import positive_int, probability, seed_int

Handler = Callable[[argparse.Namespace], int]

EPILOG = """\
examples:
  sdxs generate "smiling face with heart-eyes" -o face.png
  sdxs generate "red apple" --steps 20 --seed 7 --num-images 4 -o apples.png
  sdxs generate -i --steps 20                 # interactive prompt loop, model stays loaded
  sdxs upscale face.png                        # -> face-2x.png
  sdxs refine "a cat"                          # print a detailed prompt
  sdxs encode-image photo.jpg -o variation.png # image prompt -> variation
  sdxs serve --port 8000                       # web page + API on http://127.0.0.1:8000/
  sdxs info

Errors are one line with exit code 2; set SDXS_DEBUG=1 for a traceback.
"""


INIT_EPILOG = """\
Every component comes from --base (a model folder) when given, else fresh from --preset (random weights, seeded);
--text-encoder, --vae and --unet swap in trained ones. A source SRC may be a training run (its latest checkpoint),
a checkpoint folder, a model folder or the component folder itself; from runs and checkpoints the EMA weights are
taken when the run kept them. A text encoder brings its tokenizer; a fresh UNet fits the text encoder's width.

examples:
  sdxs init runs/emoji/model --preset emoji --text-encoder runs/emoji/text_encoder
  sdxs init runs/emoji/model --base runs/emoji/model --vae runs/emoji/vae
  sdxs init runs/emoji/model-v2 --base . --shift 1          # the shipped model with the noise shift of v2
  sdxs init out/ --preset tiny                       # random weights: for tests and benchmarks only
"""


def _add(subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str, epilog: str = "", parents=()):
    p = subparsers.add_parser(
        name,
        help=help,
        description=help,
        epilog=epilog or None,
        parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def add_generate_parser(sub, func: Handler, model: argparse.ArgumentParser, gen: argparse.ArgumentParser) -> None:
    """`sdxs generate PROMPT`: text to image."""
    p = _add(
        sub,
        "generate",
        func,
        "text to image: write PNG(s), print paths, seeds and timing",
        epilog='examples:\n  sdxs generate "red apple, 3d render" -o apple.png --seed 1\n'
        "  sdxs generate -i -o out/img.png   # prompts from stdin -> out/img-001.png, out/img-002.png, ...",
        parents=(model, gen),
    )
    p.add_argument("prompt", nargs="?", help="what to draw (optional with -i)")
    p.add_argument("-o", "--output", default="image.png", help="PNG path; several images get -1, -2, ... suffixes")
    p.add_argument("-i", "--interactive", action="store_true", help="read prompts from stdin until EOF / 'quit'")
    p.add_argument(
        "--style",
        metavar="NAME",
        help="one of the model's styles (model_index.json style_tags), by name or tag: its tag ends the prompt",
    )


def add_upscale_parser(sub, func: Handler, model: argparse.ArgumentParser) -> None:
    """`sdxs upscale IMAGE...`: 2x with the VAE."""
    p = _add(
        sub,
        "upscale",
        func,
        "2x upscale image(s) with the VAE decoder",
        epilog="examples:\n  sdxs upscale face.png             # -> face-2x.png\n  sdxs upscale a.png b.png",
        parents=(model,),
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", help="output PNG (one input only; default: NAME-2x.png beside the input)")
    p.add_argument("--tile-size", type=positive_int, default=512, help="input tile side for large images")
    p.add_argument("--tile-overlap", type=int, default=64, help="tile overlap in input pixels")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=2048 * 2048,
        help="refuse inputs with more pixels than this before starting (default 2048x2048, ~3 min on a 2-core "
        "CPU; 0: no limit)",
    )


def add_refine_parser(sub, func: Handler, model: argparse.ArgumentParser) -> None:
    """`sdxs refine PROMPT...`: detailed prompts from short ones."""
    p = _add(
        sub,
        "refine",
        func,
        "expand short prompt(s) into detailed ones (one line each on stdout)",
        epilog='examples:\n  sdxs refine "a cat" "a red apple" --seed 0',
        parents=(model,),
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--instruction", help="system instruction (default: the model's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=120)
    p.add_argument("--seed", type=seed_int, help="makes sampling reproducible")
    p.add_argument(
        "--add-skin-tone",
        action="store_true",
        help="keep a skin tone the model adds to a prompt naming none (default: dropped; a tone is another emoji)",
    )
    p.add_argument(
        "--min-token-prob",
        type=probability,
        default=0.05,
        help="drop an added tag with a token the model gave less than this probability (default 0.05; 0 keeps all)",
    )
    p.add_argument(
        "--cut-after-unlikely",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also drop the tags written after the first unlikely one (default; --no-cut-after-unlikely keeps them)",
    )


def add_encode_image_parser(sub, func: Handler, model: argparse.ArgumentParser, gen: argparse.ArgumentParser) -> None:
    """`sdxs encode-image IMAGE`: variations of an image."""
    p = _add(
        sub,
        "encode-image",
        func,
        "image prompt: generate variations of an image from its embedding",
        epilog="examples:\n  sdxs encode-image photo.jpg -o variation.png --seed 3\n"
        "  sdxs encode-image photo.jpg --save-embeds photo.safetensors --num-images 0",
        parents=(model, gen),
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", default="variation.png", help="PNG path (default: variation.png)")
    p.add_argument("--save-embeds", metavar="FILE", help="also save (prompt_embeds, prompt_attention_mask)")
    p.add_argument("--embeds-only", action="store_true", help="with --save-embeds: save them and generate nothing")


def add_serve_parser(sub, func: Handler, model: argparse.ArgumentParser) -> None:
    """`sdxs serve`: the HTTP API and web page."""
    p = _add(
        sub,
        "serve",
        func,
        "HTTP API + web page (FastAPI/uvicorn), one generation at a time",
        epilog="examples:\n  sdxs serve                          # http://127.0.0.1:8000/\n"
        "  sdxs serve --port 9000 --max-queue 8 --steps 20",
        parents=(model,),
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--steps", type=positive_int, help="default steps shown on the page (default: the model's)")
    p.add_argument("--guidance", type=float, default=4.0, help="default guidance shown on the page")
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--max-images", type=positive_int, default=4, help="images per request")
    p.add_argument("--max-side", type=positive_int, help="longest side in pixels (default: 2x the model's default)")
    p.add_argument("--max-pixels", type=positive_int, help="width x height limit (default: max-side squared)")
    p.add_argument("--max-queue", type=int, default=4, help="requests waiting for the device before 429")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit (413 above it)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def add_info_parser(sub, func: Handler) -> None:
    """`sdxs info`: model and preset summary."""
    p = _add(
        sub,
        "info",
        func,
        "model and preset summary with parameter counts (loads no weights)",
        epilog="examples:\n  sdxs info\n  sdxs info --model path/to/model --preset emoji --json",
    )
    p.add_argument("--model", metavar="FOLDER", help="model folder (default: $SDXS_MODEL, else the repo root)")
    p.add_argument("--preset", action="append", help="only these presets (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_init_parser(sub, func: Handler) -> None:
    """`sdxs init OUT`: assemble a model folder."""
    p = _add(
        sub,
        "init",
        func,
        "assemble a model folder from a preset and/or trained components (text encoder, VAE, UNet)",
        epilog=INIT_EPILOG,
    )
    p.add_argument("out", help="model folder to write (hub layout; component folders are replaced)")
    p.add_argument("--preset", default="emoji", help="shapes of fresh components (tiny | emoji | sdxs-1b)")
    p.add_argument("--base", metavar="MODEL", help="start from this model folder instead of fresh components")
    p.add_argument("--text-encoder", metavar="SRC", help="trained text encoder (+ tokenizer): run/checkpoint/folder")
    p.add_argument("--vae", metavar="SRC", help="trained VAE: run, checkpoint, model or vae folder")
    p.add_argument("--unet", metavar="SRC", help="trained UNet: run, checkpoint, model or unet folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh (random) components")
    p.add_argument("--shift", type=float, help="the scheduler's noise shift (default: the base's or the preset's)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the saved weights (default: as loaded)")
    p.add_argument(
        "--text-normalization",
        metavar="LIST",
        help="how the tokenizer reads text: comma list of nfkc, lowercase, prefix-space ('' for none); our own "
        "byte-level tokenizers only (default: as the base's or the preset's)",
    )
    p.add_argument(
        "--default-steps",
        type=positive_int,
        metavar="N",
        help="Euler steps the model takes when none are given (default: as the base's; bench/bench_steps.py)",
    )
    p.add_argument(
        "--style",
        action="append",
        metavar="NAME=TAG",
        help="a style the model draws and the caption tag that asks for it, repeated "
        "(--style 3d='3d render' --style twemoji=flat); --style '' clears them (default: as the base's)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip reloading the folder with plain diffusers")
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
