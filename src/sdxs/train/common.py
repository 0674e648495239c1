"""What every trainer shares: the training loop (`fit`) and its `Task`, the accelerator, partial weight loading.

A trainer (unet.py, vae.py, text_encoder.py, lora.py) builds its model, data and loss, wraps them in a `Task` and calls
`fit`. `fit` reads top to bottom: setup -> resume -> for each optimiser step: `_train_step` (micro-batches, finite
check, clip, step, EMA), `_log`, `_write_samples`, `_write_checkpoint` -> final checkpoint -> export.

Run folder:

    RUN/config.json            resolved config of the latest start (also inside every checkpoint)
    RUN/metrics.jsonl          one line per logged step {step, loss, lr, grad_norm, it_s, samples_s, ...}
    RUN/loss.png               loss curve, redrawn at every log and checkpoint
    RUN/samples/step-NNNNNNN.png
    RUN/checkpoints/step-NNNNNNN/   see checkpoint.py (atomic writes, pruning, RNG / data state)
    RUN/export/                hub layout written at the end (sdxs export)

Checkpoints live in checkpoint.py, metrics in metrics.py, the optimiser, LR schedule and EMA in optim.py, the
index sampler of in-memory datasets in batches.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdxs.files import write_json
from sdxs.train.checkpoint import (
    find_checkpoint,
    load_rank_state,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from sdxs.train.config import RunConfig, to_dict
from sdxs.train.metrics import MetricsLog, plot_loss_curve, progress_bar
from sdxs.train.optim import (
    EMA,
    EXTEND_MODES,
    build_lr_scheduler,
    build_optimizer,
    lr_factor,
    resume_lr_anchor,
)
from sdxs.train.stop import CheckpointClock, StopOnSignal, TrainingStopped

logger = logging.getLogger("sdxs.train")


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
# Accelerator
# ----------------------------------------------------------------------------------------------------------------


def make_accelerator(run: RunConfig, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from sdxs.train.engines import refuse_sharded_engines, requested_engine

    if run.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"`run.mixed_precision` must be 'no', 'bf16' or 'fp16', got {run.mixed_precision!r}.")
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # Checked before the Accelerator is built: with no GPU, accelerate turns an FSDP launch into plain multi-process
    # CPU data parallelism (MULTI_CPU) without a word, so the launch's request is read from its environment.
    refuse_sharded_engines(requested_engine() or "")
    # With no accelerator present, say so: otherwise multi-process CPU launches (gloo) fall back to one process each.
    cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=run.mixed_precision, kwargs_handlers=kwargs, cpu=cpu)
    refuse_sharded_engines(accelerator.distributed_type.value)
    if accelerator.device.type == "cpu":
        # Masked attention (-10000 bias) and small activations make subnormal floats; on x86 CPUs they run ~10-30x
        # slower. Flushing them to zero changes nothing a model can learn from.
        torch.set_flush_denormal(True)
    return accelerator


# ----------------------------------------------------------------------------------------------------------------
# Partial loading (optimiser, LR schedule and EMA: optim.py)
# ----------------------------------------------------------------------------------------------------------------


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
# The training loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Loop:
    """What `fit`'s helpers share: the run's objects and the position in it (step, samples seen, LR anchor)."""

    task: Task
    cfg: Any
    accelerator: Any
    run_dir: Path
    model: torch.nn.Module  # wrapped by accelerator.prepare once resumed
    optimizer: Any
    opt_name: str
    ema: EMA | None
    noise_gen: torch.Generator
    scheduler: Any = None
    step: int = 0
    samples_seen: int = 0
    lr_anchor: tuple[int, float] | None = None  # see lr_factor / resume_lr_anchor

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def per_step(self) -> int:  # samples per optimiser step, all ranks together
        return self.task.batch_size * self.cfg.optim.grad_accum * self.accelerator.num_processes


def fit(task: Task, cfg, resume: str | None = None, accelerator=None) -> Path:
    """Train `task.model` for cfg.run.max_steps optimiser steps; returns the final checkpoint folder."""
    run = cfg.run
    accelerator = accelerator or make_accelerator(run, task.find_unused_parameters)
    loop = _setup(task, cfg, accelerator)  # optimiser, EMA (from the initial weights), noise generator
    ckpt = _resume(loop, resume) if resume else None  # before wrapping, so all ranks agree
    # the one LR mechanism, from the step the run starts at (see build_lr_scheduler)
    loop.scheduler = build_lr_scheduler(loop.optimizer, cfg.optim, run.max_steps, loop.lr_anchor, loop.step)
    if loop.ema is not None:
        loop.ema.model.to(accelerator.device)
    # wrap for the device and distribution (DDP etc.); the LR schedule stays ours (see build_lr_scheduler)
    loop.model, loop.optimizer = accelerator.prepare(loop.model, loop.optimizer)
    if ckpt is not None:
        _resume_rank(loop, ckpt)
    _log_plan(loop)
    metrics = MetricsLog(loop.run_dir / "metrics.jsonl", loop.step, enabled=loop.main)
    bar = progress_bar(loop.main and run.progress_bar, loop.step, run.max_steps)

    # one iteration = one optimiser step of grad_accum micro-batches; Ctrl-C / SIGTERM stop after a step (stop.py)
    loop.model.train()
    t_last, steps_since = time.perf_counter(), 0
    clock = CheckpointClock(run.checkpoint_every_minutes)
    with StopOnSignal() as stop:
        while loop.step < run.max_steps:
            mean_loss, grad_norm, info = _train_step(loop)
            steps_since += 1
            if loop.step % run.log_every == 0 or loop.step == run.max_steps:
                _log(loop, metrics, bar, mean_loss, grad_norm, info, steps_since, t_last)
                t_last, steps_since = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if run.sample_every and loop.step % run.sample_every == 0 and loop.step < run.max_steps:
                _write_samples(loop)
            timed = clock.due(accelerator)  # on every rank, every step (the ranks agree)
            periodic = timed or (run.checkpoint_every and loop.step % run.checkpoint_every == 0)
            if periodic and loop.step < run.max_steps:
                ckpt = _write_checkpoint(loop, final=False)
                clock.reset()
            if stop.requested(accelerator) and loop.step < run.max_steps:
                if bar is not None:
                    bar.close()
                if not periodic:
                    ckpt = _write_checkpoint(loop, final=False)
                raise TrainingStopped(stop.signum, loop.step, ckpt)

    # the end: statistics the model config records (VAE scaling factor), final checkpoint, samples, export
    if bar is not None:
        bar.close()
    _before_final_save(loop, metrics)
    final = _write_checkpoint(loop, final=True)
    _write_samples(loop)
    if loop.main and run.export_at_end and task.export_fn is not None:
        task.export_fn(loop.run_dir)
    accelerator.wait_for_everyone()
    return final


def _setup(task: Task, cfg, accelerator) -> _Loop:
    """Check the config, write RUN/config.json, build the optimiser, EMA and noise generator."""
    run, optim = cfg.run, cfg.optim
    run_dir = Path(run.output_dir).resolve()
    if optim.grad_accum < 1:
        raise ValueError(f"`optim.grad_accum` must be >= 1, got {optim.grad_accum}.")
    if accelerator.is_main_process:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", to_dict(cfg))
    model = task.model
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer, opt_name = build_optimizer(model.parameters(), optim, accelerator.device)
    if optim.extend not in EXTEND_MODES:
        raise ValueError(f"`optim.extend` must be one of {EXTEND_MODES}, got {optim.extend!r}.")
    ema = EMA(model, cfg.ema) if cfg.ema.enabled else None
    noise_gen = torch.Generator(accelerator.device).manual_seed(run.seed + accelerator.process_index)
    return _Loop(task, cfg, accelerator, run_dir, model, optimizer, opt_name, ema, noise_gen)


def _resume(loop: _Loop, resume: str) -> Path:
    """Load checkpoint `resume` (a path or "latest"): weights, EMA, optimiser, step and LR anchor."""
    task, optim, run = loop.task, loop.cfg.optim, loop.cfg.run
    ckpt = find_checkpoint(loop.run_dir, resume)
    state = read_state(ckpt, task.name)
    load_model = task.load_model or load_exact
    load_model(task.inner(loop.model), ckpt / task.name)
    if loop.ema is not None:
        if not (ckpt / f"{task.name}_ema").is_dir():
            raise ValueError(f"`ema.enabled` is true but checkpoint {str(ckpt)!r} has no EMA weights.")
        load_model(task.inner(loop.ema.model), ckpt / f"{task.name}_ema")
    loop.optimizer.load_state_dict(torch.load(ckpt / "training_state" / "optimizer.pt", weights_only=False))
    step = loop.step = int(state["step"])
    loop.samples_seen = int(state["samples_seen"])
    old_anchor = tuple(state["lr_anchor"]) if state.get("lr_anchor") else None
    old_max = int(state.get("max_steps") or json.loads((ckpt / "config.json").read_text())["run"]["max_steps"])
    loop.lr_anchor = resume_lr_anchor(step, optim, old_max, run.max_steps, old_anchor)
    if old_max != run.max_steps and loop.main:
        _log_new_length(step, optim, old_max, run.max_steps, old_anchor, loop.lr_anchor)
    return ckpt


def _log_new_length(step: int, optim, old_max: int, new_max: int, old_anchor, anchor) -> None:
    """What a resume with another run.max_steps does to the LR: a cosine follows `optim.extend`, a constant
    schedule with `optim.decay_steps` cools down before the new end (a plain constant one is unchanged)."""
    if optim.schedule == "cosine":
        logger.info(
            "run.max_steps %d -> %d with optim.extend=%r: lr at step %d %.3g -> %.3g (%s)",
            old_max,
            new_max,
            optim.extend,
            step,
            lr_factor(step, optim, old_max, old_anchor) * optim.lr,
            lr_factor(step, optim, new_max, anchor) * optim.lr,
            "as if planned this long from the start"
            if optim.extend == "replan"
            else "carried on from where it was, down to the floor at the new end",
        )
    elif optim.decay_steps:
        logger.info(
            "run.max_steps %d -> %d: lr %.3g at step %d, cooling down linearly over steps %d-%d to %.3g",
            old_max,
            new_max,
            lr_factor(step, optim, new_max, anchor) * optim.lr,
            step,
            max(new_max - optim.decay_steps, step),
            new_max,
            optim.min_lr_ratio * optim.lr,
        )


def _resume_rank(loop: _Loop, ckpt: Path) -> None:
    """This rank's data position, RNG states and noise generator (after wrapping)."""
    rank_state = load_rank_state(ckpt, loop.accelerator.process_index)
    loop.task.data.load_state_dict(rank_state["data"], replan=loop.cfg.run.replan_data)
    set_rng_state(rank_state["rng"])
    loop.noise_gen.set_state(rank_state["noise_gen"].to(loop.noise_gen.get_state().device))
    logger.info("resumed from %s at step %d", ckpt, loop.step)


def _log_plan(loop: _Loop) -> None:
    if not loop.main:
        return
    run, optim = loop.cfg.run, loop.cfg.optim
    logger.info("optimizer: %s", loop.opt_name)
    logger.info(
        "effective batch %d = %d per rank x %d accumulation x %d processes; %d steps, mixed precision %s",
        loop.per_step,
        loop.task.batch_size,
        optim.grad_accum,
        loop.accelerator.num_processes,
        run.max_steps,
        run.mixed_precision,
    )


def _train_step(loop: _Loop) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """One optimiser step of grad_accum micro-batches; returns (mean loss over ranks, grad norm, the loss's info)."""
    task, optim, accelerator, model = loop.task, loop.cfg.optim, loop.accelerator, loop.model
    loss_sum, info = torch.zeros((), device=accelerator.device), {}
    for micro in range(optim.grad_accum):
        batch = next(task.data)
        # gradients are all-reduced only on the last micro-batch (DDP no_sync before it)
        sync = micro == optim.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            loss, info = task.loss_fn(model, batch, loop.noise_gen)
            accelerator.backward(loss / optim.grad_accum)
        loss_sum += loss.detach() / optim.grad_accum
    mean_loss = accelerator.reduce(loss_sum, reduction="mean")  # every rank sees the same value
    if not torch.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"loss is {mean_loss.item()} at step {loop.step + 1}: training stopped, no checkpoint written after step "
            f"{loop.step}. Lower `optim.lr`, raise `optim.warmup_steps`, try run.mixed_precision=bf16 instead of "
            "fp16, or check the data; resume from the last checkpoint with --resume latest."
        )
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip > 0 else None
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.step(accelerator.unwrap_model(model), loop.step)
    loop.step += 1
    loop.samples_seen += loop.per_step
    return mean_loss, grad_norm, info


def _log(loop: _Loop, metrics: MetricsLog, bar, mean_loss, grad_norm, info: dict, steps: int, t_last: float) -> None:
    """One metrics.jsonl line (and the progress bar's numbers) for the `steps` steps since `t_last`."""
    dt = max(time.perf_counter() - t_last, 1e-9)
    record = {
        "step": loop.step,
        "loss": mean_loss.item(),
        "lr": loop.optimizer.param_groups[0]["lr"],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "it_s": steps / dt,
        "samples_s": steps * loop.per_step / dt,
        "samples_seen": loop.samples_seen,
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


def _write_samples(loop: _Loop) -> None:
    """The main process writes RUN/samples/step-N.png (EMA weights when they are the ones exported)."""
    task, ema = loop.task, loop.ema
    if loop.main and task.sample_fn is not None:
        use_ema = ema is not None and loop.cfg.ema.use_for_export
        weights = ema.model if use_ema else loop.accelerator.unwrap_model(loop.model)
        with torch.random.fork_rng(devices=[]):  # sampling never moves the training RNG
            task.sample_fn(weights, loop.run_dir / "samples" / f"step-{loop.step:07d}.png")
    loop.accelerator.wait_for_everyone()


def _before_final_save(loop: _Loop, metrics: MetricsLog) -> None:
    """The task's last word on the weights (e.g. VAE latent statistics), recorded in metrics.jsonl."""
    task = loop.task
    if task.before_final_save is None:
        return
    stats = task.before_final_save(loop.accelerator.unwrap_model(loop.model))
    if loop.ema is not None:
        task.before_final_save(loop.ema.model)
    if loop.main and stats:
        metrics.write({"step": loop.step, **stats})


def _write_checkpoint(loop: _Loop, final: bool) -> Path:
    """Checkpoint the current step (see checkpoint.py for the layout) and redraw the loss curve."""
    task, cfg, ema, optimizer = loop.task, loop.cfg, loop.ema, loop.optimizer
    raw = loop.accelerator.unwrap_model(loop.model)
    step, anchor = loop.step, loop.lr_anchor

    def write_main(folder: Path) -> None:
        task.save_model(task.inner(raw), folder / task.name)
        if ema is not None:
            task.save_model(task.inner(ema.model), folder / f"{task.name}_ema")
        torch.save(optimizer.state_dict(), folder / "training_state" / "optimizer.pt")
        torch.save(loop.scheduler.state_dict(), folder / "training_state" / "lr_scheduler.pt")
        write_json(folder / "config.json", to_dict(cfg))
        state = {
            "trainer": task.name,
            "step": step,
            "samples_seen": loop.samples_seen,
            "final": final,
            "world_size": loop.accelerator.num_processes,
            "optimizer": loop.opt_name,
            "ema": ema is not None,
            "max_steps": cfg.run.max_steps,  # the plan the LR schedule was following
            "lr_anchor": list(anchor) if anchor is not None else None,
            "time": time.time(),
        }
        write_json(folder / "state.json", state)

    # per-tensor sums of this rank's weights: equal on all ranks iff gradients were synchronised (a cheap check)
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in raw.parameters()]).cpu()
    rank_state = {
        "rng": rng_state(),
        "noise_gen": loop.noise_gen.get_state(),
        "data": loop.task.data.state_dict(),
        "param_sums": sums,
    }
    path = save_checkpoint(loop.accelerator, loop.run_dir, step, write_main, rank_state, final, cfg.run.keep_last)
    if loop.main:
        plot_loss_curve(loop.run_dir / "metrics.jsonl", loop.run_dir / "loss.png")
    return path


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable()
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
