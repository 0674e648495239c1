"""Optimiser (AdamW8bit on CUDA, else torch AdamW), the LR schedule (warmup, constant or cosine, `optim.extend` on
resume) and the EMA of the weights."""

from __future__ import annotations

import copy
import math

import torch

from sdxs.train.config import EMAConfig, OptimConfig


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
    """Multiplier of cfg.lr at optimiser step `step` (0-based): linear warmup, then constant (with an optional linear
    cool-down over the last `cfg.decay_steps` steps) or cosine.

    `anchor` = (step s0, factor f0): from s0 on, a cosine from f0 down to `min_lr_ratio` at `max_steps` (a cosine
    run extended with `optim.extend = "continue"`, see `resume_lr_anchor`)."""
    if cfg.decay_steps < 0 or (cfg.decay_steps and cfg.schedule != "constant"):
        raise ValueError(
            f"`optim.decay_steps` ({cfg.decay_steps}) is a cool-down of the constant schedule: use a number >= 0 with "
            f"schedule 'constant', or 0 with {cfg.schedule!r}."
        )
    if anchor is not None and cfg.schedule == "cosine" and step >= anchor[0]:
        s0, f0 = anchor
        progress = min((step - s0) / max(max_steps - s0, 1), 1.0)
        return cfg.min_lr_ratio + (f0 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        left = max_steps - step  # the floor is reached at max_steps, as the cosine's is
        if cfg.decay_steps and left < cfg.decay_steps:
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * max(left, 0) / cfg.decay_steps
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


def build_lr_scheduler(optimizer, cfg: OptimConfig, max_steps: int, anchor=None, step: int = 0):
    """The run's one LR mechanism: a LambdaLR that sets every group's lr to cfg.lr * lr_factor(s) at step s.

    Built once the run's first step is known: 0, or the resumed step with its `anchor` (see resume_lr_anchor), so its
    first lr is already that step's; `scheduler.step()` after each optimiser step moves on to the next. The schedule
    is a function of (step, config, max_steps, anchor) alone, so a resume rebuilds it rather than loading it.
    Not passed through accelerator.prepare: accelerate would step it once per process, distorting the warmup."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the lr the factor scales (a resumed optimizer carries the previous start's)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, max_steps, anchor), last_epoch=step - 1
    )


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
