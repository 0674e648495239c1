"""The `sdxs` command: generate, upscale, refine, encode-image, serve, info, plus the data/train/eval subcommands.

Every subcommand is a function `fn(args) -> int` set with `set_defaults(func=fn)`. User errors (bad flags, bad
sizes, missing files) are printed as one line on stderr with exit code 2; set SDXS_DEBUG=1 to see the traceback.

Heavy libraries (torch, diffusers) are imported inside the commands so that `sdxs --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sdxs
from sdxs import runtime
from sdxs.cli_types import (
    EXIT_USER_ERROR,
    OneLineParser,
    generation_flags,
    model_flags,
    positive_int,
    probability,
    seed_int,
)
from sdxs.files import (
    check_image_inputs,
    check_output,
    check_upscale_sizes,
    next_numbered_path,
    output_paths,
    save_images,
)
from sdxs.runtime import (  # noqa: F401 - names tests and older callers use as `sdxs.cli.<name>`
    DEVICES,
    DTYPES,
    SPEED_FEATURES,
    SPEEDUPS,
    UserError,
    default_model_dir,
    pick_device,
    pick_dtype,
    quiet_libraries,
    random_seed,
    resolve_model,
    torch_dtype,
)

# Subcommands that other modules own: each exposes `register(subparsers)`.
EXTERNAL_COMMANDS = ("sdxs.data.cli", "sdxs.train.cli", "sdxs.eval.cli")

# Errors a user can fix (bad flag values, missing files, unreachable hub repos): one line, exit code 2.
USER_ERRORS = (ValueError, TypeError, OSError)

# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on an interactive terminal only, so logs and pipes stay clean."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def load_pipeline(args: argparse.Namespace):
    """The model of `--model` on `--device` in `--dtype` with `--speedup` features (`sdxs.runtime.load_pipeline`)."""
    return runtime.load_pipeline(
        args.model,
        device=args.device,
        dtype=args.dtype,
        speedups=getattr(args, "speedup", None) or [],
        verbose=getattr(args, "verbose", False),
        progress=show_progress(args),
    )


# ----------------------------------------------------------------------------------------------------------------
# Generation helpers (output paths: sdxs.files; shared flags: sdxs.cli_types)
# ----------------------------------------------------------------------------------------------------------------


def _generation_kwargs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return dict(
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        num_images_per_prompt=args.num_images,
        seed=seed,
    )


def _preflight(args: argparse.Namespace) -> None:
    """Sizes and the pixel limit, from the model's JSON files, before it loads (`sdxs.preflight`)."""
    from sdxs.preflight import check_generation

    model = resolve_model(args.model)
    check_generation(model, args.width, args.height, args.steps, args.num_images, args.max_pixels)


def _report(paths: Sequence[Path], images: Sequence[Any], seed: int, seconds: float) -> None:
    for i, (path, image) in enumerate(zip(paths, images, strict=True)):
        print(f"{path}  {image.width}x{image.height}  seed {seed + i}  {seconds:.2f} s")


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """Text to image: write PNG(s) and print each path with its size, seed and the time taken."""
    if not args.interactive and not args.prompt:
        raise UserError("generate needs a PROMPT (or -i for an interactive prompt loop)")
    check_output(args.output)
    _preflight(args)
    pipe = load_pipeline(args)
    if args.interactive:
        return _interactive_loop(pipe, args)
    seed = random_seed() if args.seed is None else args.seed
    start = time.perf_counter()
    images = pipe(args.prompt, **_generation_kwargs(args, seed)).images
    seconds = time.perf_counter() - start
    paths = output_paths(args.output, len(images))
    save_images(images, paths)
    _report(paths, images, seed, seconds)
    return 0


def _interactive_loop(pipe, args: argparse.Namespace) -> int:
    """Read prompts from stdin until EOF, an empty line or "quit"; the model stays loaded between prompts."""
    tty = sys.stdin.isatty()
    if tty:
        print("Type a prompt and press Enter (empty line, 'quit' or Ctrl-D to stop).", file=sys.stderr)
    counter = 1
    pending = [args.prompt] if args.prompt else []
    while True:
        if pending:
            prompt = pending.pop(0)
        else:
            if tty:
                print("prompt> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:  # EOF
                break
            prompt = line.strip()
        if prompt == "" or prompt.lower() in ("quit", "exit", "q"):
            break
        # a fixed --seed is reused for every prompt so prompt changes can be compared; else a new one each time
        seed = random_seed() if args.seed is None else args.seed
        start = time.perf_counter()
        try:
            images = pipe(prompt, **_generation_kwargs(args, seed)).images
        except USER_ERRORS as e:
            # a bad prompt or size must not end the session: report it and read the next prompt
            print(f"sdxs generate: error: {_one_line(e)}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        paths = []
        for _ in images:
            path, counter = next_numbered_path(args.output, counter)
            paths.append(path)
        save_images(images, paths)
        _report(paths, images, seed, seconds)
        sys.stdout.flush()
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """2x upscale with the VAE (encode 8x, decode 16x); tiles keep memory bounded for large inputs."""
    inputs = [Path(p) for p in args.images]
    check_image_inputs(inputs)
    if args.output and len(inputs) > 1:
        raise UserError("--output names one file; with several images, omit it (each is written as NAME-2x.png)")
    outputs = [Path(args.output) if args.output else p.with_name(f"{p.stem}-2x.png") for p in inputs]
    for out in outputs:
        check_output(out)
    if args.tile_overlap < 0 or args.tile_overlap > args.tile_size // 2:
        raise UserError(f"--tile-overlap {args.tile_overlap}: must be in [0, --tile-size/2 = {args.tile_size // 2}]")
    max_pixels = args.max_pixels or None  # 0: no limit
    check_upscale_sizes(inputs, max_pixels)  # from the file headers, before the model loads
    pipe = load_pipeline(args)
    for path, out in zip(inputs, outputs, strict=True):
        start = time.perf_counter()
        image = pipe.image_upscale(
            str(path), tile_size=args.tile_size, tile_overlap=args.tile_overlap, max_pixels=max_pixels
        )[0]
        seconds = time.perf_counter() - start
        save_images([image], [out])
        print(f"{out}  {image.width}x{image.height}  {seconds:.2f} s")
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """Expand short prompts into detailed ones with the text encoder's language-model head; one line each."""
    pipe = load_pipeline(args)
    refined = pipe.refine_prompts(
        list(args.prompts),
        instruction=args.instruction,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        add_skin_tone=args.add_skin_tone,
        min_token_prob=args.min_token_prob,
        cut_after_unlikely=args.cut_after_unlikely,
    )
    for text in refined:
        print(" ".join(text.split()))  # one line per prompt, so the output can be piped
    return 0


def cmd_encode_image(args: argparse.Namespace) -> int:
    """Image prompt: embed an image with the vision tower and generate variations from that embedding."""
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    if args.embeds_only and not args.save_embeds:
        raise UserError("--embeds-only needs --save-embeds FILE")
    if args.save_embeds:
        check_output(args.save_embeds, "--save-embeds", suffixes=(".safetensors",))
    if not args.embeds_only:
        check_output(args.output)
        _preflight(args)
    pipe = load_pipeline(args)
    embeds, mask = pipe.encode_image(str(path))
    if args.save_embeds:
        from safetensors.torch import save_file

        save_file(
            {"prompt_embeds": embeds.cpu().contiguous(), "prompt_attention_mask": mask.cpu().contiguous()},
            args.save_embeds,
        )
        print(f"{args.save_embeds}  embeddings {tuple(embeds.shape)}")
    if args.embeds_only:
        return 0
    seed = random_seed() if args.seed is None else args.seed
    kwargs = _generation_kwargs(args, seed)
    start = time.perf_counter()
    images = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, **kwargs).images
    seconds = time.perf_counter() - start
    paths = output_paths(args.output, len(images))
    save_images(images, paths)
    _report(paths, images, seed, seconds)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve the HTTP API and the web page with uvicorn."""
    import uvicorn

    from sdxs.server import ServerSettings, create_app

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"sdxs serve: warning: listening on {args.host}: anyone who can reach it can use the model", file=sys.stderr
        )
    folder = resolve_model(args.model)
    pipe = load_pipeline(args)
    settings = ServerSettings(
        default_steps=args.steps,
        default_guidance=args.guidance,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_side=args.max_side,
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        model_name=Path(folder).name if Path(folder).is_dir() else folder,  # a folder's name or a hub id
    )
    app = create_app(pipe, settings)
    print(f"sdxs serve: http://{args.host}:{args.port}/  (API docs at /docs; Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Summarise the model (components, parameters, defaults) and the presets; no weights are loaded."""
    from sdxs.model_folder.read import print_info, summary

    info = summary(args.model, args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print_info(info)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Assemble a model folder (`sdxs.model_folder.assemble`) and print its path."""
    from sdxs.model_folder import assemble

    logging.basicConfig(format="%(message)s", level=logging.INFO)
    logging.getLogger("sdxs.model_folder").setLevel(logging.INFO)
    quiet_libraries(args.verbose)
    out = assemble(
        args.out,
        preset=args.preset,
        base=args.base,
        text_encoder=args.text_encoder,
        vae=args.vae,
        unet=args.unet,
        seed=args.seed,
        dtype=torch_dtype(args.dtype) if args.dtype else None,
        verify=not args.no_verify,
        shift=args.shift,
        text_normalization=None if args.text_normalization is None else _names(args.text_normalization),
    )
    print(out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------

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


def build_parser() -> argparse.ArgumentParser:
    """The `sdxs` parser: this module's subcommands, then those of EXTERNAL_COMMANDS, in `sdxs --help` order."""
    parser = OneLineParser(
        prog="sdxs",
        description="SDXS: a compact text-to-image diffusion model: run it, serve it, train it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdxs {sdxs.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    model, gen = model_flags(), generation_flags()
    add_generate_parser(sub, model, gen)
    add_upscale_parser(sub, model)
    add_refine_parser(sub, model)
    add_encode_image_parser(sub, model, gen)
    add_serve_parser(sub, model)
    add_info_parser(sub)
    add_init_parser(sub)

    for module_name in EXTERNAL_COMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


def add_generate_parser(sub, model: argparse.ArgumentParser, gen: argparse.ArgumentParser) -> None:
    """`sdxs generate PROMPT`: text to image."""
    p = _add(
        sub,
        "generate",
        cmd_generate,
        "text to image: write PNG(s), print paths, seeds and timing",
        epilog='examples:\n  sdxs generate "red apple, 3d render" -o apple.png --seed 1\n'
        "  sdxs generate -i -o out/img.png   # prompts from stdin -> out/img-001.png, out/img-002.png, ...",
        parents=(model, gen),
    )
    p.add_argument("prompt", nargs="?", help="what to draw (optional with -i)")
    p.add_argument("-o", "--output", default="image.png", help="PNG path; several images get -1, -2, ... suffixes")
    p.add_argument("-i", "--interactive", action="store_true", help="read prompts from stdin until EOF / 'quit'")


def add_upscale_parser(sub, model: argparse.ArgumentParser) -> None:
    """`sdxs upscale IMAGE...`: 2x with the VAE."""
    p = _add(
        sub,
        "upscale",
        cmd_upscale,
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


def add_refine_parser(sub, model: argparse.ArgumentParser) -> None:
    """`sdxs refine PROMPT...`: detailed prompts from short ones."""
    p = _add(
        sub,
        "refine",
        cmd_refine,
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


def add_encode_image_parser(sub, model: argparse.ArgumentParser, gen: argparse.ArgumentParser) -> None:
    """`sdxs encode-image IMAGE`: variations of an image."""
    p = _add(
        sub,
        "encode-image",
        cmd_encode_image,
        "image prompt: generate variations of an image from its embedding",
        epilog="examples:\n  sdxs encode-image photo.jpg -o variation.png --seed 3\n"
        "  sdxs encode-image photo.jpg --save-embeds photo.safetensors --num-images 0",
        parents=(model, gen),
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", default="variation.png", help="PNG path (default: variation.png)")
    p.add_argument("--save-embeds", metavar="FILE", help="also save (prompt_embeds, prompt_attention_mask)")
    p.add_argument("--embeds-only", action="store_true", help="with --save-embeds: save them and generate nothing")


def add_serve_parser(sub, model: argparse.ArgumentParser) -> None:
    """`sdxs serve`: the HTTP API and web page."""
    p = _add(
        sub,
        "serve",
        cmd_serve,
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


def add_info_parser(sub) -> None:
    """`sdxs info`: model and preset summary."""
    p = _add(
        sub,
        "info",
        cmd_info,
        "model and preset summary with parameter counts (loads no weights)",
        epilog="examples:\n  sdxs info\n  sdxs info --model path/to/model --preset emoji --json",
    )
    p.add_argument("--model", metavar="FOLDER", help="model folder (default: $SDXS_MODEL, else the repo root)")
    p.add_argument("--preset", action="append", help="only these presets (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_init_parser(sub) -> None:
    """`sdxs init OUT`: assemble a model folder."""
    p = _add(
        sub,
        "init",
        cmd_init,
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
    p.add_argument("--no-verify", action="store_true", help="skip reloading the folder with plain diffusers")
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _one_line(error: BaseException) -> str:
    """The error message on one line (pipeline messages may wrap); the class name when there is no message."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sdxs`; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    debug = os.environ.get("SDXS_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and argparse errors (already printed as one line)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USER_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, *USER_ERRORS) as e:
        if debug:
            raise
        print(f"sdxs {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
