"""What every trainer shares: the training loop (`fit`), checkpoints and resume, RNG, optimiser and LR schedule, EMA,
metrics (JSONL + loss-curve PNG) and sample grids.

A trainer (unet.py, vae.py, text_encoder.py) builds its model, data and loss, wraps them in a `Task` and calls `fit`.
`fit` reads top to bottom: prepare -> resume -> for each optimiser step: micro-batches, finite check, clip, step,
EMA, log, sample, checkpoint -> final checkpoint -> export.

Run folder:

    RUN/config.json            resolved config of the latest start (also inside every checkpoint)
    RUN/metrics.jsonl          one line per logged step {step, loss, lr, grad_norm, it_s, samples_s, ...}
    RUN/loss.png               loss curve, redrawn at every log and checkpoint
    RUN/samples/step-NNNNNNN.png
    RUN/checkpoints/step-NNNNNNN/
        <model>/               diffusers / transformers save_pretrained (safetensors): unet/, vae/, text_encoder/
        <model>_ema/           the EMA weights in the same format (when EMA is on)
        tokenizer/             (text-encoder runs)
        training_state/        optimizer.pt, lr_scheduler.pt, rank<R>.pt (RNG states + data position per rank)
        config.json            the resolved config
        state.json             {"trainer", "step", "samples_seen", "final", ...}; written last
    RUN/export/                hub layout written at the end (sdxs export)

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `step-N` only when complete, so a folder named
`step-N` is always whole; temp folders are ignored by `--resume latest` and removed by the next save.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxs.files import write_json
from sdxs.model_folder.read import CHECKPOINT_PREFIX, checkpoint_dirs, find_checkpoint
from sdxs.train.config import EMAConfig, OptimConfig, RunConfig, to_dict

logger = logging.getLogger("sdxs.train")

TMP_PREFIX = ".tmp-"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf: training stops before any checkpoint of the poisoned weights is written."""


# ----------------------------------------------------------------------------------------------------------------
# The task a trainer hands to `fit`
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Task:
    """Everything `fit` needs to know about one trainer."""

    name: str  # folder of the trained model inside a checkpoint: "unet" | "vae" | "text_encoder"
    model: torch.nn.Module  # the trainable model (unwrapped, fp32)
    loss_fn: Callable[[torch.nn.Module, dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    data: Any  # iterator of batches with state_dict() / load_state_dict() (per rank)
    batch_size: int  # samples per micro-batch per rank (for samples/s)
    save_model: Callable[[torch.nn.Module, Path], None]  # writes inner(model) (and tokenizer) in its library's format
    # resume: reads save_model's folder back into inner(model) exactly (None: `load_exact`, every tensor by name)
    load_model: Callable[[torch.nn.Module, Path], None] | None = None
    sample_fn: Callable[[torch.nn.Module, Path], None] | None = None  # main process: writes a grid for these weights
    before_final_save: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # e.g. VAE latent statistics
    export_fn: Callable[[Path], None] | None = None  # exports the run folder at the end (main process)
    find_unused_parameters: bool = False  # DDP: True when some batches skip parts of the model (vision tower)
    inner: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m  # the part that is saved (model minus wrapper)


# ----------------------------------------------------------------------------------------------------------------
# Accelerator, seeds, RNG
# ----------------------------------------------------------------------------------------------------------------


def make_accelerator(run: RunConfig, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if run.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"`run.mixed_precision` must be 'no', 'bf16' or 'fp16', got {run.mixed_precision!r}.")
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # With no accelerator present, say so: otherwise multi-process CPU launches (gloo) fall back to one process each.
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=run.mixed_precision, kwargs_handlers=kwargs, cpu=cpu)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # checkpoints save the main process's optimizer state and unwrapped weights: right for DDP, where every rank
        # holds everything, wrong for sharded training; refuse rather than write a checkpoint that resumes wrongly
        raise ValueError(
            f"`accelerate launch` with {accelerator.distributed_type.value} is not supported by sdxs train (its "
            "checkpoints assume every rank holds the full model and optimizer): use DDP (`accelerate launch "
            "--multi_gpu`), which the card-sized models fit with 8-bit Adam and gradient checkpointing."
        )
    if accelerator.device.type == "cpu":
        # Masked attention (-10000 bias) and small activations make subnormal floats; on x86 CPUs they run ~10-30x
        # slower. Flushing them to zero changes nothing a model can learn from.
        torch.set_flush_denormal(True)
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ----------------------------------------------------------------------------------------------------------------
# Optimiser, LR schedule, EMA, partial loading
# ----------------------------------------------------------------------------------------------------------------


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW8bit (bitsandbytes) on CUDA when it loads, else torch AdamW; returns (optimizer, what was chosen and why)."""
    if cfg.optimizer not in ("auto", "adamw", "adamw8bit"):
        raise ValueError(f"`optim.optimizer` must be 'auto', 'adamw' or 'adamw8bit', got {cfg.optimizer!r}.")
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    reason = "requested"
    if cfg.optimizer in ("auto", "adamw8bit"):
        if device.type != "cuda":
            reason = f"bitsandbytes 8-bit optimisers need CUDA, device is {device.type}"
        else:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, **kwargs), "AdamW8bit (bitsandbytes)"
            except Exception as e:  # not installed, or its CUDA library fails to load
                reason = f"bitsandbytes failed to load: {type(e).__name__}: {e}"
    return torch.optim.AdamW(params, **kwargs), f"torch AdamW ({reason})"


EXTEND_MODES = ("replan", "continue")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int, anchor: tuple[int, float] | None = None) -> float:
    """Multiplier of cfg.lr at optimiser step `step` (0-based): linear warmup, then constant or cosine.

    `anchor` = (step s0, factor f0): from s0 on, a cosine from f0 down to `min_lr_ratio` at `max_steps` (a cosine
    run extended with `optim.extend = "continue"`, see `resume_lr_anchor`)."""
    if anchor is not None and cfg.schedule == "cosine" and step >= anchor[0]:
        s0, f0 = anchor
        progress = min((step - s0) / max(max_steps - s0, 1), 1.0)
        return cfg.min_lr_ratio + (f0 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"`optim.schedule` must be 'constant' or 'cosine', got {cfg.schedule!r}.")


def resume_lr_anchor(
    step: int, cfg: OptimConfig, old_max_steps: int, new_max_steps: int, anchor: tuple[int, float] | None
) -> tuple[int, float] | None:
    """The schedule anchor after resuming at `step` a run planned for `old_max_steps` with `new_max_steps`.

    Same length, or a constant schedule: the checkpoint's anchor unchanged. Otherwise `cfg.extend` decides:
    "replan" -> None (the schedule of a run planned that long from the start), "continue" -> (step, the factor the
    old plan had at `step`), so the LR carries on from where it was down to the floor at the new end."""
    if cfg.extend not in EXTEND_MODES:
        raise ValueError(f"`optim.extend` must be one of {EXTEND_MODES}, got {cfg.extend!r}.")
    if old_max_steps == new_max_steps or cfg.schedule != "cosine":
        return anchor
    if cfg.extend == "replan":
        return None
    return (step, lr_factor(step, cfg, old_max_steps, anchor))


def build_lr_scheduler(optimizer, cfg: OptimConfig, max_steps: int, anchor=None):
    # Not passed through accelerator.prepare: accelerate would step it once per process, distorting the warmup.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps, anchor))


class EMA:
    """Exponential moving average of a model's parameters, kept as a full model so it saves like the model."""

    def __init__(self, model: torch.nn.Module, cfg: EMAConfig):
        self.decay = cfg.decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """diffusers' EMAModel warm-up: min(decay, (1 + step) / (10 + step)), so early weights fade out fast."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, model: torch.nn.Module, step: int) -> None:
        """One EMA update after optimiser step `step` (0-based, restored on resume, so resuming is exact).

        Only trained parameters move: a frozen one (a LoRA run's base UNet) equals its copy at every step."""
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters(), strict=True) if p.requires_grad]
        ema = [e for e, _ in pairs]
        raw = [p.detach().to(e.dtype) for e, p in pairs]
        torch._foreach_lerp_(ema, raw, 1.0 - self.decay_at(step))  # ema += (1 - decay) * (raw - ema)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files in `folder` (diffusers or transformers layout, sharded or not)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r}.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_matching(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor whose name and shape match into `model`; report the rest (how SDXS grows a model)."""
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "shape_mismatch": [], "missing": [], "unexpected": []}
    with torch.no_grad():
        for name, tensor in own.items():
            if name not in state:
                report["missing"].append(name)
            elif tuple(state[name].shape) != tuple(tensor.shape):
                report["shape_mismatch"].append(f"{name} {tuple(state[name].shape)} -> {tuple(tensor.shape)}")
            else:
                tensor.copy_(state[name].to(tensor.dtype))
                report["loaded"].append(name)
    report["unexpected"] = sorted(set(state) - set(own))
    return report


def log_load_report(report: dict[str, list[str]], source: str) -> None:
    total = len(report["loaded"]) + len(report["shape_mismatch"]) + len(report["missing"])
    logger.info(
        "init from %s: %d/%d tensors loaded, %d shape mismatches, %d missing (kept fresh), %d unexpected (ignored)",
        source,
        len(report["loaded"]),
        total,
        len(report["shape_mismatch"]),
        len(report["missing"]),
        len(report["unexpected"]),
    )
    for key in ("shape_mismatch", "missing", "unexpected"):
        for name in report[key][:20]:
            logger.info("  %s: %s", key, name)
        if len(report[key]) > 20:
            logger.info("  ... and %d more %s", len(report[key]) - 20, key)


def load_exact(model: torch.nn.Module, folder: str | Path) -> None:
    """Resume: load a checkpoint's weights; only tied weights (saved once by transformers) may be absent."""
    report = load_matching(model, read_weights(folder))
    bad = report["shape_mismatch"] + [n for n in report["missing"] if not n.endswith("lm_head.weight")]
    if bad:
        raise ValueError(f"checkpoint {str(folder)!r} does not fit the model: {bad[:5]} ...")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Metrics and images
# ----------------------------------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = path.read_text().splitlines() if path.exists() and resume_step > 0 else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Loss (and a smoothed curve) against step, log-scale y, written with matplotlib's Agg backend."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 5:
        k = max(len(loss) // 20, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------


def fit(task: Task, cfg, resume: str | None = None, accelerator=None) -> Path:
    """Train `task.model` for cfg.run.max_steps optimiser steps; returns the final checkpoint folder."""
    run, optim = cfg.run, cfg.optim
    accelerator = accelerator or make_accelerator(run, task.find_unused_parameters)
    run_dir = Path(run.output_dir).resolve()
    main = accelerator.is_main_process
    if optim.grad_accum < 1:
        raise ValueError(f"`optim.grad_accum` must be >= 1, got {optim.grad_accum}.")
    if main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", to_dict(cfg))

    # 1. Optimiser, LR schedule, EMA (the EMA starts from the initial weights, before any wrapping)
    model = task.model
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer, opt_name = build_optimizer(model.parameters(), optim, accelerator.device)
    if optim.extend not in EXTEND_MODES:
        raise ValueError(f"`optim.extend` must be one of {EXTEND_MODES}, got {optim.extend!r}.")
    lr_anchor: tuple[int, float] | None = None  # see lr_factor / resume_lr_anchor
    # the lambda reads `lr_anchor` when called, so a resume that sets it is seen (the logged lr follows it)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, run.max_steps, lr_anchor))
    ema = EMA(model, cfg.ema) if cfg.ema.enabled else None

    # 2. Resume: weights, optimiser, schedule, EMA, data position, step, RNG — before wrapping, so all ranks agree
    step, samples_seen = 0, 0
    noise_gen = torch.Generator(accelerator.device).manual_seed(run.seed + accelerator.process_index)
    ckpt = None
    if resume:
        ckpt = find_checkpoint(run_dir, resume)
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("trainer") != task.name:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} was written by the {state.get('trainer')} trainer, not {task.name}."
            )
        load_model = task.load_model or load_exact
        load_model(task.inner(model), ckpt / task.name)
        if ema is not None:
            if not (ckpt / f"{task.name}_ema").is_dir():
                raise ValueError(f"`ema.enabled` is true but checkpoint {str(ckpt)!r} has no EMA weights.")
            load_model(task.inner(ema.model), ckpt / f"{task.name}_ema")
        optimizer.load_state_dict(torch.load(ckpt / "training_state" / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "training_state" / "lr_scheduler.pt", weights_only=False))
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        old_anchor = tuple(state["lr_anchor"]) if state.get("lr_anchor") else None
        old_max = state.get("max_steps") or json.loads((ckpt / "config.json").read_text())["run"]["max_steps"]
        lr_anchor = resume_lr_anchor(step, optim, int(old_max), run.max_steps, old_anchor)
        if int(old_max) != run.max_steps and optim.schedule == "cosine" and main:
            before = lr_factor(step, optim, int(old_max), old_anchor) * optim.lr
            after = lr_factor(step, optim, run.max_steps, lr_anchor) * optim.lr
            logger.info(
                "run.max_steps %d -> %d with optim.extend=%r: lr at step %d %.3g -> %.3g (%s)",
                int(old_max),
                run.max_steps,
                optim.extend,
                step,
                before,
                after,
                "as if planned this long from the start"
                if optim.extend == "replan"
                else "carried on from where it was, down to the floor at the new end",
            )
    if ema is not None:
        ema.model.to(accelerator.device)

    # 3. Wrap for the device and distribution (DDP etc.); the LR schedule stays ours (see build_lr_scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    if ckpt is not None:
        rank_file = ckpt / "training_state" / f"rank{accelerator.process_index}.pt"
        if not rank_file.is_file():
            raise ValueError(
                f"{str(ckpt)!r} has no state for rank {accelerator.process_index}: resume with as many processes."
            )
        rank_state = torch.load(rank_file, weights_only=False)
        task.data.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        noise_gen.set_state(rank_state["noise_gen"].to(noise_gen.get_state().device))
        logger.info("resumed from %s at step %d", ckpt, step)

    world = accelerator.num_processes
    per_step = task.batch_size * optim.grad_accum * world
    if main:
        logger.info("optimizer: %s", opt_name)
        logger.info(
            "effective batch %d = %d per rank x %d accumulation x %d processes; %d steps, mixed precision %s",
            per_step,
            task.batch_size,
            optim.grad_accum,
            world,
            run.max_steps,
            run.mixed_precision,
        )
    metrics = MetricsLog(run_dir / "metrics.jsonl", step, enabled=main)
    bar = _progress_bar(main and run.progress_bar, step, run.max_steps)

    def write_checkpoint(final: bool) -> Path:
        raw = accelerator.unwrap_model(model)

        def write_main(folder: Path) -> None:
            task.save_model(task.inner(raw), folder / task.name)
            if ema is not None:
                task.save_model(task.inner(ema.model), folder / f"{task.name}_ema")
            torch.save(optimizer.state_dict(), folder / "training_state" / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "training_state" / "lr_scheduler.pt")
            write_json(folder / "config.json", to_dict(cfg))
            write_json(
                folder / "state.json",
                {
                    "trainer": task.name,
                    "step": step,
                    "samples_seen": samples_seen,
                    "final": final,
                    "world_size": world,
                    "optimizer": opt_name,
                    "ema": ema is not None,
                    "max_steps": run.max_steps,  # the plan the LR schedule was following
                    "lr_anchor": list(lr_anchor) if lr_anchor is not None else None,
                    "time": time.time(),
                },
            )

        # per-tensor sums of this rank's weights: equal on all ranks iff gradients were synchronised (a cheap check)
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for p in raw.parameters()]).cpu()
        rank_state = {
            "rng": rng_state(),
            "noise_gen": noise_gen.get_state(),
            "data": task.data.state_dict(),
            "param_sums": sums,
        }
        path = save_checkpoint(accelerator, run_dir, step, write_main, rank_state, final, run.keep_last)
        if main:
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        return path

    def write_samples() -> None:
        if main and task.sample_fn is not None:
            weights = ema.model if ema is not None and cfg.ema.use_for_export else accelerator.unwrap_model(model)
            with torch.random.fork_rng(devices=[]):  # sampling never moves the training RNG
                task.sample_fn(weights, run_dir / "samples" / f"step-{step:07d}.png")
        accelerator.wait_for_everyone()

    # 4. The loop: one iteration = one optimiser step of grad_accum micro-batches
    model.train()
    t_last, steps_since = time.perf_counter(), 0
    while step < run.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = optim.lr * lr_factor(step, optim, run.max_steps, lr_anchor)
        loss_sum, info = torch.zeros((), device=accelerator.device), {}
        for micro in range(optim.grad_accum):
            batch = next(task.data)
            # gradients are all-reduced only on the last micro-batch (DDP no_sync before it)
            sync = micro == optim.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, info = task.loss_fn(model, batch, noise_gen)
                accelerator.backward(loss / optim.grad_accum)
            loss_sum += loss.detach() / optim.grad_accum
        mean_loss = accelerator.reduce(loss_sum, reduction="mean")  # every rank sees the same value
        if not torch.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"loss is {mean_loss.item()} at step {step + 1}: training stopped, no checkpoint written after step "
                f"{step}. Lower `optim.lr`, raise `optim.warmup_steps`, try run.mixed_precision=bf16 instead of fp16, "
                "or check the data; resume from the last checkpoint with --resume latest."
            )
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model), step)
        step += 1
        samples_seen += per_step
        steps_since += 1

        if step % run.log_every == 0 or step == run.max_steps:
            dt = max(time.perf_counter() - t_last, 1e-9)
            record = {
                "step": step,
                "loss": mean_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "it_s": steps_since / dt,
                "samples_s": steps_since * per_step / dt,
                "samples_seen": samples_seen,
                **info,
            }
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    it_s=f"{record['it_s']:.2f}",
                    samples_s=f"{record['samples_s']:.1f}",
                )
            t_last, steps_since = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if run.sample_every and step % run.sample_every == 0 and step < run.max_steps:
            write_samples()
        if run.checkpoint_every and step % run.checkpoint_every == 0 and step < run.max_steps:
            write_checkpoint(final=False)

    # 5. The end: statistics the model config records (VAE scaling factor), final checkpoint, samples, export
    if bar is not None:
        bar.close()
    if task.before_final_save is not None:
        stats = task.before_final_save(accelerator.unwrap_model(model))
        if ema is not None:
            task.before_final_save(ema.model)
        if main and stats:
            metrics.write({"step": step, **stats})
    final = write_checkpoint(final=True)
    write_samples()
    if main and run.export_at_end and task.export_fn is not None:
        task.export_fn(run_dir)
    accelerator.wait_for_everyone()
    return final


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable()
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


class IndexBatches:
    """Endless, seeded, rank-split batches of indices into a small in-memory dataset, resumable by (epoch, position).

    Used by the VAE and text-encoder trainers, whose data are image/caption folders rather than latent shards.
    Every epoch is one permutation (seed + epoch) shared by all ranks; rank r takes every world-th batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the dataset is empty.")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0  # position: batches of this epoch already taken by this rank

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        per_epoch = max(self.n // (self.batch_size * self.world), 1)
        if self.position >= per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        start = (self.position * self.world + self.rank) * self.batch_size
        self.position += 1
        return [int(order[(start + i) % self.n]) for i in range(self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
