"""The `sdxs` command: generate, upscale, refine, encode-image, serve, info, plus the data/train/eval subcommands.

Every subcommand is a function `fn(args) -> int` set with `set_defaults(func=fn)`. User errors (bad flags, bad
sizes, missing files) are printed as one line on stderr with exit code 2; set SDXS_DEBUG=1 to see the traceback.

Heavy libraries (torch, diffusers) are imported inside the commands so that `sdxs --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sdxs

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    import torch

# Subcommands that other modules own: each exposes `register(subparsers)`. A module that does not exist yet is
# skipped (and only then: an ImportError inside an existing module is a bug and must surface).
EXTERNAL_COMMANDS = ("sdxs.data.cli", "sdxs.train.cli", "sdxs.eval.cli", "sdxs.assemble")

# Errors a user can fix (bad flag values, missing files, unreachable hub repos): one line, exit code 2.
USER_ERRORS = (ValueError, TypeError, OSError)
EXIT_USER_ERROR = 2

DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SPEEDUPS = ("channels_last", "fused_qkv", "compile", "cuda_graphs")  # SDXSPipeline.SPEEDUPS (a test keeps them equal)
# A hub repository id ("owner/name"); anything else that does not exist locally is a missing folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, never with a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Model, device and dtype
# ----------------------------------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The repository root (the shipped model lives there): src/sdxs/__init__.py -> parents[2]."""
    return Path(sdxs.__file__).resolve().parents[2]


def resolve_model(model: str | None) -> str:
    """A local folder with model_index.json or a hub id; raise `UserError` with the folder to pass otherwise."""
    if model is None:
        model = os.environ.get("SDXS_MODEL")
    if model is None:
        root = default_model_dir()
        if (root / "model_index.json").is_file():
            return str(root)
        raise UserError(
            f"no model found at {root} (no model_index.json); pass --model FOLDER, a folder holding "
            "model_index.json (e.g. one written by `sdxs export`), or set SDXS_MODEL"
        )
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model}: {path} has no model_index.json; pass the folder that holds it")
        return str(path)
    if HUB_ID.match(model) and not model.startswith("."):
        return model  # a hub repository id: diffusers downloads (or finds it in the cache)
    raise UserError(f"--model {model}: no such folder; pass a folder holding model_index.json")


def pick_device(device: str = "auto") -> str:
    """`auto`: CUDA when available, then Apple MPS, else the CPU."""
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bf16 on CUDA GPUs that support it (fp16 otherwise), fp16 on MPS, fp32 on the CPU."""
    import torch

    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype != "auto":
        return named[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32  # half precision on the CPU is slow and less accurate


def quiet_libraries(verbose: bool, progress: bool = True) -> None:
    """Keep library warnings (config notes, slow-kernel fallbacks) out of the way unless asked for, and the
    libraries' own progress bars (weight loading) off when `progress` is false."""
    import warnings

    import diffusers
    import transformers

    if not progress:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if verbose:
        return
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    # Python warnings from the libraries (FutureWarning, UserWarning) are notes for their developers, not ours
    for module in ("diffusers", "transformers", "torch", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", module=module)


_quiet_libraries = quiet_libraries  # the name sdxs.evaluate imports


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on an interactive terminal only, so logs and pipes stay clean."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def load_pipeline(args: argparse.Namespace):
    """Load the model named by `--model` on `--device` in `--dtype` (both chosen automatically by default)."""
    folder = resolve_model(args.model)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    quiet_libraries(getattr(args, "verbose", False), progress=show_progress(args))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, trust_remote_code=True)
    speedups = list(dict.fromkeys(getattr(args, "speedup", None) or []))
    if "cpu_offload" in speedups:
        if not device.startswith("cuda"):
            raise ValueError(f"`--speedup cpu_offload` needs a CUDA device, got {device!r}: leave it out on {device}.")
        pipe.enable_model_cpu_offload(device=device)  # each model moves to the GPU only while it runs
    else:
        pipe = pipe.to(device)
    if "vae_tiling" in speedups:
        pipe.enable_vae_tiling()
    if "vae_slicing" in speedups:
        pipe.enable_vae_slicing()
    pipe.enable_speedups(*[s for s in speedups if s in SPEEDUPS])
    pipe.set_progress_bar_config(disable=not show_progress(args), leave=False)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Argument types and shared flags
# ----------------------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (`sdxs generate: error: ... (see --help)`) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _model_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="FOLDER",
        help="model folder with model_index.json, or a hub id (default: $SDXS_MODEL, else the repo root)",
    )
    g.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda, then mps, else cpu")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="default: bf16/fp16 on GPUs, fp32 on cpu")
    g.add_argument(
        "--speedup",
        action="append",
        choices=[*SPEEDUPS, "vae_tiling", "vae_slicing", "cpu_offload"],
        metavar="FEATURE",
        help="opt-in speed/memory feature, repeatable: %(choices)s (see docs/pipeline.md#speed)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    return p


def _generation_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt: what to steer away from")
    g.add_argument("--steps", type=positive_int, default=40, help="denoising steps (default: 40)")
    g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance; 1 disables (default: 4)")
    g.add_argument("--width", type=positive_int, help="pixels, a multiple of the model's size step (default: model's)")
    g.add_argument("--height", type=positive_int, help="pixels, a multiple of the model's size step")
    g.add_argument("--seed", type=seed_int, help="image i uses seed + i (default: random, printed)")
    g.add_argument("--num-images", type=positive_int, default=1, help="images to make (default: 1)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------------------------


def output_paths(output: str | os.PathLike, n: int) -> list[Path]:
    """One image -> `output` itself; several -> `stem-1.png`, `stem-2.png`, ... beside it."""
    out = Path(output)
    if out.suffix == "":
        out = out.with_suffix(".png")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]


def next_numbered_path(output: str | os.PathLike, start: int = 1) -> tuple[Path, int]:
    """The first `stem-NNN.png` beside `output` that does not exist yet (never overwrite earlier results)."""
    out = Path(output)
    suffix = out.suffix or ".png"
    n = start
    while True:
        path = out.with_name(f"{out.stem}-{n:03d}{suffix}")
        if not path.exists():
            return path, n + 1
        n += 1


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_output(output: str | os.PathLike, flag: str = "--output", suffixes: Sequence[str] = IMAGE_SUFFIXES) -> None:
    """Refuse an output path that cannot be written, before any model is loaded or image made (`UserError`)."""
    out = Path(output).expanduser()
    if out.suffix and out.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {output}: unknown file extension {out.suffix!r}; use one of {', '.join(suffixes)} "
            "(no extension means .png)"
        )
    if out.is_dir():
        raise UserError(f"{flag} {output}: is a folder; give a file name inside it, e.g. {out / 'image.png'}")
    folder = out.parent
    while not folder.exists():  # save_images creates missing folders: the nearest existing one must take them
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{flag} {output}: {folder} is a file, not a folder; pick another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {output}: cannot write in {folder} (permission denied); pick another folder")


def check_image_inputs(paths: Sequence[str | os.PathLike]) -> None:
    """Every input must be an existing file (before any model load)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")


def save_images(images: Sequence[Any], paths: Sequence[Path]) -> None:
    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)


def _random_seed() -> int:
    return secrets.randbelow(2**31)


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
    pipe = load_pipeline(args)
    if args.interactive:
        return _interactive_loop(pipe, args)
    seed = _random_seed() if args.seed is None else args.seed
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
        seed = _random_seed() if args.seed is None else args.seed
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
    for path in inputs:  # the size from the file header, before the model loads
        from PIL import Image

        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
        if max_pixels is not None and w * h > max_pixels:
            raise UserError(
                f"{path} is {w}x{h} = {w * h} pixels, more than --max-pixels {max_pixels} (about "
                f"{_upscale_minutes(w * h)} on a CPU); pass --max-pixels {w * h} (or 0 for no limit) to upscale it"
            )
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


def _upscale_minutes(pixels: int) -> str:
    """A rough CPU estimate from the measured 41 s per 1024x1024 input on 2 cores (docs/cli.md)."""
    return f"{max(1, round(41 * pixels / 1024**2 / 60))} min"


def cmd_refine(args: argparse.Namespace) -> int:
    """Expand short prompts into detailed ones with the text encoder's language-model head; one line each."""
    pipe = load_pipeline(args)
    refined = pipe.refine_prompts(
        list(args.prompts), instruction=args.instruction, max_new_tokens=args.max_new_tokens, seed=args.seed
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
    seed = _random_seed() if args.seed is None else args.seed
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


def _format_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def model_parameter_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Parameters per component folder, read from safetensors headers (nothing is loaded into memory)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for sub in sorted(Path(folder).iterdir()):
        files = sorted(sub.glob("*.safetensors")) if sub.is_dir() else []
        if not files:
            continue
        total = 0
        for file in files:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = f.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
        counts[sub.name] = total
    return counts


def cmd_info(args: argparse.Namespace) -> int:
    """Summarise the model (components, parameters, defaults) and the presets; no weights are loaded."""
    from sdxs.presets import PRESETS, count_parameters

    info: dict[str, Any] = {"version": sdxs.__version__}
    try:
        folder = resolve_model(args.model)
    except UserError as e:
        folder = None
        info["model"] = {"error": str(e)}
    if folder is not None and Path(folder).is_dir():
        index = json.loads((Path(folder) / "model_index.json").read_text())
        components = {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[1]}
        settings = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
        info["model"] = {
            "folder": folder,
            "pipeline": index.get("_class_name"),
            "components": components,
            "parameters": model_parameter_counts(folder),
            "settings": settings,
        }
    elif folder is not None:
        info["model"] = {"hub_id": folder, "note": "not downloaded by `info`"}
    presets = args.preset or list(PRESETS)
    info["presets"] = {}
    for name in presets:
        preset = PRESETS.get(name)
        if preset is None:
            raise UserError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
        info["presets"][name] = {
            "default_size": list(preset.default_size),
            "note": preset.note,
            "parameters": count_parameters(name),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_info(info)
    return 0


def _print_info(info: dict[str, Any]) -> None:
    print(f"sdxs {info['version']}")
    model = info["model"]
    if "error" in model:
        print(f"model: none ({model['error']})")
    elif "hub_id" in model:
        print(f"model: {model['hub_id']} (hub id; {model['note']})")
    else:
        print(f"model: {model['folder']}")
        for name, cls in model["components"].items():
            n = model["parameters"].get(name)
            print(f"  {name:<17} {cls:<36} {_format_count(n) if n else '-':>10}")
        total = sum(model["parameters"].values())
        print(f"  {'total':<17} {'':<36} {_format_count(total):>10}")
        for key, value in model["settings"].items():
            if not isinstance(value, dict):
                print(f"  {key} = {value}")
    print("presets (random-weight shapes, counted on the meta device):")
    for name, p in info["presets"].items():
        total = sum(p["parameters"].values())
        parts = ", ".join(f"{k} {_format_count(v)}" for k, v in p["parameters"].items())
        w, h = p["default_size"]
        print(f"  {name:<8} {_format_count(total):>10}  {w}x{h}  {p['note']}")
        print(f"           {parts}")


# ----------------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  sdxs generate "a smiling face with heart eyes, 3d render" -o face.png
  sdxs generate "a red apple" --steps 20 --seed 7 --num-images 4 -o apples.png
  sdxs generate -i --steps 20                 # interactive prompt loop, model stays loaded
  sdxs upscale face.png                        # -> face-2x.png
  sdxs refine "a cat"                          # print a detailed prompt
  sdxs encode-image photo.jpg -o variation.png # image prompt -> variation
  sdxs serve --port 8000                       # web page + API on http://127.0.0.1:8000/
  sdxs info

Errors are one line with exit code 2; set SDXS_DEBUG=1 for a traceback.
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
    parser = OneLineParser(
        prog="sdxs",
        description="SDXS: a compact text-to-image diffusion model: run it, serve it, train it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdxs {sdxs.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    model, gen = _model_flags(), _generation_flags()

    p = _add(
        sub,
        "generate",
        cmd_generate,
        "text to image: write PNG(s), print paths, seeds and timing",
        epilog='examples:\n  sdxs generate "a red apple, 3d render" -o apple.png --seed 1\n'
        "  sdxs generate -i -o out/img.png   # prompts from stdin -> out/img-001.png, out/img-002.png, ...",
        parents=(model, gen),
    )
    p.add_argument("prompt", nargs="?", help="what to draw (optional with -i)")
    p.add_argument("-o", "--output", default="image.png", help="PNG path; several images get -1, -2, ... suffixes")
    p.add_argument("-i", "--interactive", action="store_true", help="read prompts from stdin until EOF / 'quit'")

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
    p.add_argument("--steps", type=positive_int, default=40, help="default steps shown on the page")
    p.add_argument("--guidance", type=float, default=4.0, help="default guidance shown on the page")
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--max-images", type=positive_int, default=4, help="images per request")
    p.add_argument("--max-side", type=positive_int, help="longest side in pixels (default: 2x the model's default)")
    p.add_argument("--max-pixels", type=positive_int, help="width x height limit (default: max-side squared)")
    p.add_argument("--max-queue", type=int, default=4, help="requests waiting for the device before 429")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit (413 above it)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))

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

    for module_name in EXTERNAL_COMMANDS:
        module = _import_optional(module_name)
        if module is not None:
            module.register(sub)
    return parser


def _import_optional(module_name: str):
    """Import a subcommand module; None only if that module (or its sdxs package) does not exist yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        parts = module_name.split(".")
        missing_self = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # sdxs.data, sdxs.data.cli
        if e.name in missing_self:
            return None
        raise


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
