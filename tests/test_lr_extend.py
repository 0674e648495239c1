"""`--resume` with a larger run.max_steps: `optim.extend` = "replan" (the longer plan's schedule, exactly) or
"continue" (from the LR reached, down to the floor at the new end, no jump)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sdxs.train.config import OptimConfig
from sdxs.train.metrics import read_metrics
from sdxs.train.optim import lr_factor, resume_lr_anchor


def _cfg(extend: str) -> OptimConfig:
    return OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, extend=extend)


def _curve(cfg, old_max, new_max, resume_at):
    """LR factors of a run planned for old_max, resumed at `resume_at` with new_max."""
    anchor = resume_lr_anchor(resume_at, cfg, old_max, new_max, None)
    before = [lr_factor(s, cfg, old_max) for s in range(resume_at)]
    return before + [lr_factor(s, cfg, new_max, anchor) for s in range(resume_at, new_max)]


def test_replan_is_exactly_the_longer_plan():
    cfg = _cfg("replan")
    curve = _curve(cfg, 100, 300, 100)
    planned = [lr_factor(s, cfg, 300) for s in range(300)]
    assert curve[100:] == planned[100:]  # the schedule of a run planned for 300 steps from the start
    assert curve[100] > curve[99] + 0.3  # ...which means a jump up at the resume step (said in the log and docs)


def test_continue_carries_on_without_a_jump_down_to_the_floor():
    cfg = _cfg("continue")
    curve = _curve(cfg, 100, 300, 60)
    assert abs(curve[60] - lr_factor(60, cfg, 100)) < 1e-12  # where the old plan was at the resume step
    assert all(b <= a + 1e-12 for a, b in zip(curve[60:], curve[61:], strict=False))  # only decays
    assert curve[-1] == pytest.approx(cfg.min_lr_ratio, abs=1e-3)  # the floor at the new end
    assert lr_factor(300, cfg, 300, (60, curve[60])) == pytest.approx(cfg.min_lr_ratio)
    # a second resume at the same length keeps the continued curve (the anchor travels in the checkpoint)
    anchor = resume_lr_anchor(60, cfg, 100, 300, None)
    assert resume_lr_anchor(200, cfg, 300, 300, anchor) == anchor
    # and extending a continued run again continues from the continued curve
    again = resume_lr_anchor(200, cfg, 300, 500, anchor)
    assert again[0] == 200 and math.isclose(again[1], lr_factor(200, cfg, 300, anchor))


def test_same_length_or_constant_schedule_is_unchanged_and_bad_mode_refused():
    cfg = _cfg("continue")
    assert resume_lr_anchor(50, cfg, 100, 100, None) is None
    const = OptimConfig(schedule="constant", warmup_steps=0, extend="continue")
    assert resume_lr_anchor(50, const, 100, 300, None) is None
    with pytest.raises(ValueError, match="optim.extend"):
        resume_lr_anchor(50, _cfg("restart"), 100, 300, None)


@pytest.mark.parametrize("extend", ["continue"])  # "replan" is the old default path; both take ~6 min on 2 cores
def test_resume_with_more_steps_follows_optim_extend(extend, tmp_path, tiny_hub_dir, monkeypatch):
    """The real trainer: 6 steps planned, resumed to 12; the logged LRs follow the chosen mode and the anchor
    travels in the checkpoint's state.json."""
    from test_train_resume import overrides

    from sdxs.train.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cache = _colour_cache(tmp_path, tiny_hub_dir)
    run = tmp_path / "run"
    common = {"run.checkpoint_every": 3, "optim.grad_accum": 1, "ema.enabled": "false", "optim.extend": extend}
    common["optim.min_lr_ratio"] = 0.1
    args = ["train", "unet", "--config", "configs/tiny/unet.toml"]
    assert main([*args, *overrides(run, tiny_hub_dir, cache, **{**common, "run.max_steps": 6})]) == 0
    assert (
        main([*args, *overrides(run, tiny_hub_dir, cache, **{**common, "run.max_steps": 12}), "--resume", "latest"])
        == 0
    )
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl")}
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1, extend=extend)
    anchor = resume_lr_anchor(6, cfg, 6, 12, None)
    state = json.loads((run / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert state["max_steps"] == 12 and (state["lr_anchor"] is None) == (anchor is None)
    for step in range(7, 13):  # metrics log the lr set for the next step (0-based `step`)
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step, cfg, 12, anchor), rel=1e-6), step
    jump = lrs[7] / lrs[6]
    # replan: back up to where a 12-step plan is; continue: the 6-step plan had reached its floor and stays there
    assert (jump > 2) if extend == "replan" else jump == pytest.approx(1.0)


_CACHES: dict = {}


def _colour_cache(tmp_path, hub):
    from test_train_unet import make_colour_cache

    if "cache" not in _CACHES:
        root = tmp_path.parent / "lr-extend-cache"
        root.mkdir(exist_ok=True)
        _CACHES["cache"] = make_colour_cache(root, hub)
    return _CACHES["cache"]


def test_a_constant_run_resumed_with_a_cool_down_anneals_from_where_it_is():
    """Warmup-stable-decay: a constant-LR run stopped at step 600 and resumed with run.max_steps 1,000 and
    optim.decay_steps 400 keeps its LR up to step 600, then falls linearly to the floor at step 1,000."""
    run = OptimConfig(schedule="constant", warmup_steps=10)
    cool = OptimConfig(schedule="constant", warmup_steps=10, decay_steps=400, min_lr_ratio=0.0)
    anchor = resume_lr_anchor(600, cool, 20_000, 1_000, None)  # a constant schedule carries no anchor
    curve = [lr_factor(s, run, 20_000) for s in range(600)] + [
        lr_factor(s, cool, 1_000, anchor) for s in range(600, 1_000)
    ]
    assert curve[599] == curve[600] == 1.0  # no jump at the resume step
    assert all(a > b for a, b in zip(curve[600:], curve[601:], strict=False))  # strictly falling after it
    assert curve[800] == pytest.approx(0.5) and curve[-1] == pytest.approx(1 / 400)  # the floor (0) at max_steps
    floor = OptimConfig(schedule="constant", warmup_steps=0, decay_steps=100, min_lr_ratio=0.1)
    assert lr_factor(99, floor, 100) == pytest.approx(0.1 + 0.9 / 100)  # min_lr_ratio is the floor
    assert lr_factor(0, floor, 1_000) == 1.0  # outside the last decay_steps: constant


def test_a_cool_down_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="optim.decay_steps"):
        lr_factor(50, OptimConfig(schedule="cosine", decay_steps=10), 100)
    with pytest.raises(ValueError, match="optim.decay_steps"):
        lr_factor(50, OptimConfig(schedule="constant", decay_steps=-1), 100)
