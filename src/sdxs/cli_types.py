"""argparse value types shared by every module that registers `sdxs` subcommands (cli.py, data/, train/, eval/),
and the flag groups (`model_flags`, `generation_flags`) the pipeline-running subcommands take as parents."""

from __future__ import annotations

import argparse

from sdxs.runtime import DEVICES, DTYPES, SPEED_FEATURES

EXIT_USER_ERROR = 2


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def probability(text: str) -> float:
    """A probability a filter can use: in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (`sdxs generate: error: ... (see --help)`) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def model_flags() -> argparse.ArgumentParser:
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
        choices=SPEED_FEATURES,
        metavar="FEATURE",
        help="opt-in speed/memory feature, repeatable: %(choices)s (see docs/pipeline.md#speed)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="show library warnings")
    return p


def generation_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt: what to steer away from")
    g.add_argument(
        "--steps", type=positive_int, help="denoising steps (default: the model's, from its model_index.json)"
    )
    g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance; 1 disables (default: 4)")
    g.add_argument("--width", type=positive_int, help="pixels, a multiple of the model's size step (default: model's)")
    g.add_argument("--height", type=positive_int, help="pixels, a multiple of the model's size step")
    g.add_argument("--seed", type=seed_int, help="image i uses seed + i (default: random, printed)")
    g.add_argument("--num-images", type=positive_int, default=1, help="images to make (default: 1)")
    g.add_argument(
        "--max-pixels",
        type=int,
        help="refuse width x height above this (default: twice the model's default side, squared; 0: no limit)",
    )
    return p
