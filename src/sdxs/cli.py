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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sdxs
from sdxs import runtime
from sdxs.cli_parsers import (
    EPILOG,
    add_encode_image_parser,
    add_generate_parser,
    add_info_parser,
    add_init_parser,
    add_refine_parser,
    add_serve_parser,
    add_upscale_parser,
)
from sdxs.cli_types import (
    EXIT_USER_ERROR,
    OneLineParser,
    generation_flags,
    model_flags,
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


def _style(args: argparse.Namespace) -> dict[str, str]:
    """`style=` for `__call__` when `--style` is given (a pipeline.py from before styles takes no such argument)."""
    return {"style": args.style} if args.style else {}


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
    from sdxs.preflight import check_style

    check_style(resolve_model(args.model), args.style)
    pipe = load_pipeline(args)
    if args.interactive:
        return _interactive_loop(pipe, args)
    seed = random_seed() if args.seed is None else args.seed
    start = time.perf_counter()
    images = pipe(args.prompt, **_style(args), **_generation_kwargs(args, seed)).images
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
            images = pipe(prompt, **_style(args), **_generation_kwargs(args, seed)).images
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


def _style_tags(items: list[str]) -> dict[str, str]:
    """`--style 3d="3d render" --style twemoji=flat` -> {"3d": "3d render", "twemoji": "flat"}; `--style ""` -> {}."""
    tags = {}
    for item in items:
        if not item.strip():
            continue
        name, eq, tag = item.partition("=")
        if not (eq and name.strip() and tag.strip()):
            raise UserError(f"--style {item!r}: write NAME=TAG, e.g. --style twemoji=flat ('' clears the styles)")
        tags[name.strip()] = tag.strip()
    return tags


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
        default_steps=args.default_steps,
        style_tags=None if args.style is None else _style_tags(args.style),
    )
    print(out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------


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
    add_generate_parser(sub, cmd_generate, model, gen)
    add_upscale_parser(sub, cmd_upscale, model)
    add_refine_parser(sub, cmd_refine, model)
    add_encode_image_parser(sub, cmd_encode_image, model, gen)
    add_serve_parser(sub, cmd_serve, model)
    add_info_parser(sub, cmd_info)
    add_init_parser(sub, cmd_init)

    for module_name in EXTERNAL_COMMANDS:
        importlib.import_module(module_name).register(sub)
    return parser


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
