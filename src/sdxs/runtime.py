"""Where and how a model runs: which model folder, which device and dtype, which speed features, quiet libraries.

The library side of the `sdxs` command's model flags (`--model`, `--device`, `--dtype`, `--speedup`), shared by
the CLI, the evaluation commands, the server and the bench scripts. Nothing here parses arguments; torch and
diffusers are imported inside the functions, so importing this module stays cheap (`sdxs --help` is fast).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "fp16", "bf16")
# The one map from dtype names to torch dtypes: the short names every command takes, and torch's own names.
_DTYPE_NAMES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
DTYPE_NAMES = tuple(_DTYPE_NAMES)
# The UNet speed features of `SDXSPipeline.enable_speedups` (pipeline.py keeps its own copy as a standalone hub
# file; tests/test_speedups.py keeps the two equal), and the memory features of diffusers' pipelines.
SPEEDUPS = ("channels_last", "fused_qkv", "compile", "cuda_graphs")
MEMORY_FEATURES = ("vae_tiling", "vae_slicing", "cpu_offload")
SPEED_FEATURES = (*SPEEDUPS, *MEMORY_FEATURES)
# A hub repository id ("owner/name"); anything else that does not exist locally is a missing folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UserError(Exception):
    """An error whose message is the whole story: the CLI prints it as one line, never with a traceback."""


def torch_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """The torch dtype named `name` ("fp32", "fp16", "bf16" or torch's "float32", "float16", "bfloat16")."""
    import torch

    if name not in _DTYPE_NAMES:
        raise ValueError(f"{flag} {name!r}: unknown dtype; choose one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, _DTYPE_NAMES[name])


def flag_values(args, names: str) -> dict:
    """The parsed flags `names` (space-separated argparse dests) as keyword arguments of the same names: what a
    subcommand hands on to the library function whose parameters its flags are named after."""
    return {name: getattr(args, name) for name in names.split()}


def random_seed() -> int:
    """A fresh seed for a request or command that named none (printed or returned, so the image can be redone)."""
    return secrets.randbelow(2**31)


def default_model_dir() -> Path:
    """The repository root (the shipped model lives there): src/sdxs/runtime.py -> parents[2]."""
    return Path(__file__).resolve().parents[2]


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

    if dtype != "auto":
        return torch_dtype(dtype)
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


def apply_speed_features(pipe, features, device: str):
    """Turn on `features` (names of `SPEED_FEATURES`, repeats ignored) and move `pipe` to `device`; returns it.

    `cpu_offload` keeps each model on the CPU until it runs (CUDA only) instead of moving the whole pipeline.
    """
    features = list(dict.fromkeys(features or []))
    unknown = [f for f in features if f not in SPEED_FEATURES]
    if unknown:
        raise ValueError(f"unknown speed feature(s) {unknown}: choose from {list(SPEED_FEATURES)}.")
    if "cpu_offload" in features:
        if not device.startswith("cuda"):
            raise ValueError(f"`--speedup cpu_offload` needs a CUDA device, got {device!r}: leave it out on {device}.")
        pipe.enable_model_cpu_offload(device=device)  # each model moves to the GPU only while it runs
    else:
        pipe = pipe.to(device)
    if "vae_tiling" in features:
        pipe.enable_vae_tiling()
    if "vae_slicing" in features:
        pipe.enable_vae_slicing()
    pipe.enable_speedups(*[f for f in features if f in SPEEDUPS])
    return pipe


def load_pipeline(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    speedups=(),
    verbose: bool = False,
    progress: bool = False,
):
    """Load `model` (a folder or hub id; default: $SDXS_MODEL, else the repo root) as users do: plain diffusers
    with the folder's own pipeline.py, on `device` in `dtype` (both chosen automatically by default), with the
    speed features `speedups` on and progress bars only when `progress`."""
    folder = resolve_model(model)
    device = pick_device(device)
    torch_dtype_ = pick_dtype(dtype, device)
    quiet_libraries(verbose, progress=progress)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype_, trust_remote_code=True)
    pipe = apply_speed_features(pipe, speedups, device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe
