"""Training checkpoints: atomic writes, pruning, and the per-rank RNG / data state that makes a resume exact.

    RUN/checkpoints/step-NNNNNNN/
        <model>/               diffusers / transformers save_pretrained (safetensors): unet/, vae/, text_encoder/
        <model>_ema/           the EMA weights in the same format (when EMA is on)
        tokenizer/             (text-encoder runs)
        training_state/        optimizer.pt, lr_scheduler.pt, rank<R>.pt (RNG states + data position per rank)
                               (lr_scheduler.pt is not read back: a resume rebuilds the schedule from state.json)
        config.json            the resolved config
        state.json             {"trainer", "step", "samples_seen", "final", ...}; written last

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `step-N` only when complete, so a folder named
`step-N` is always whole; temp folders (`.tmp-step-N`, `.tmp-old-step-N`) are ignored by `--resume latest` and
removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxs.model_folder.read import CHECKPOINT_PREFIX, checkpoint_dirs, find_checkpoint

__all__ = [
    "CHECKPOINT_PREFIX",
    "TMP_PREFIX",
    "checkpoint_dirs",
    "find_checkpoint",
    "load_rank_state",
    "prune_checkpoints",
    "read_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

TMP_PREFIX = ".tmp-"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_state(ckpt: Path, trainer: str) -> dict[str, Any]:
    """state.json of checkpoint `ckpt`, refused when another trainer wrote it."""
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("trainer") != trainer:
        raise ValueError(f"checkpoint {str(ckpt)!r} was written by the {state.get('trainer')} trainer, not {trainer}.")
    return state


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """This rank's {"rng", "noise_gen", "data", "param_sums"}; refused when the checkpoint had fewer processes."""
    rank_file = ckpt / "training_state" / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{str(ckpt)!r} has no state for rank {rank}: resume with as many processes.")
    return torch.load(rank_file, weights_only=False)


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    write_main: Callable[[Path], None],
    rank_state: dict,
    final: bool,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically: every rank saves its RNG/data state, the main process the rest, then rename."""
    root = run_dir / "checkpoints"
    name = f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp, dst = root / f"{TMP_PREFIX}{name}", root / name
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "training_state").mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rank_state, tmp / "training_state" / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_main(tmp)  # models, optimizer, schedule, config, and state.json last
        old = root / f"{TMP_PREFIX}old-{name}"
        if dst.exists():  # the same step saved again (e.g. final == last periodic): replace it
            # renamed aside first: a kill during the delete must not leave a `step-N` that has state.json but
            # lacks some weights (it would be resumed from)
            if old.exists():
                shutil.rmtree(old)
            os.replace(dst, old)
        os.replace(tmp, dst)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return dst


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints plus every final one; remove stale temp folders."""
    dirs = checkpoint_dirs(run_dir)
    periodic = [d for d in dirs if not json.loads((d / "state.json").read_text()).get("final")]
    for d in periodic[: max(len(periodic) - keep_last, 0)]:
        # renamed first, so a kill during the delete leaves a temp folder (never listed), not a checkpoint folder
        # that still has state.json but lacks some weights
        gone = d.with_name(f"{TMP_PREFIX}old-{d.name}")
        if gone.exists():
            shutil.rmtree(gone)
        os.replace(d, gone)
        shutil.rmtree(gone, ignore_errors=True)
    # temp folders of saves and deletes that a kill interrupted (every rank is past its save when this runs)
    for d in (Path(run_dir) / "checkpoints").glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
