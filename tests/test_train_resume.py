"""Checkpoints: SIGKILL after the first checkpoint + --resume latest == an uninterrupted run; atomic checkpoints;
EMA != raw; two CPU ranks under accelerate launch keep identical weights; NaN stops without a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET_CONFIG

from sdxs.model_folder import checkpoint_dirs, find_checkpoint
from sdxs.train.common import read_weights
from sdxs.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def colour_cache(tmp_path_factory, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    return make_colour_cache(tmp_path_factory.mktemp("cache"), tiny_hub_dir)


def overrides(run_dir, hub, cache, **extra):
    values = {
        "run.output_dir": run_dir,
        "model.pretrained": hub,
        "data.path": cache,
        "run.max_steps": 40,
        "run.checkpoint_every": 5,
        "run.keep_last": 20,
        "run.log_every": 1,
        "run.progress_bar": "false",
        "run.export_at_end": "false",
        "optim.grad_accum": 2,
        "optim.warmup_steps": 3,
        "optim.schedule": "cosine",
        "optim.lr": 1e-3,
        "ema.enabled": "true",
        "ema.decay": 0.9,
        "data.batch_size": 2,
        "data.sample_posterior": "true",
        "sample.prompts": "[]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_cmd(args, resume=False):
    cmd = [sys.executable, "-m", "sdxs.train.cli", "train", "unet", "--config", TINY_UNET_CONFIG, *args]
    return cmd + (["--resume", "latest"] if resume else [])


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_hub_dir, colour_cache):
    # A: one uninterrupted run
    a = tmp_path / "a"
    subprocess.run(
        train_cmd(overrides(a, tiny_hub_dir, colour_cache)),
        cwd=REPO,
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    # B: killed with SIGKILL right after its first checkpoint, then resumed
    b = tmp_path / "b"
    proc = subprocess.Popen(
        train_cmd(overrides(b, tiny_hub_dir, colour_cache)),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not checkpoint_dirs(b) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads((find_checkpoint(b) / "state.json").read_text())["step"]
    assert killed_at < 40
    subprocess.run(
        train_cmd(overrides(b, tiny_hub_dir, colour_cache), resume=True),
        cwd=REPO,
        env=env(),
        check=True,
        capture_output=True,
        timeout=300,
    )

    fa, fb = find_checkpoint(a), find_checkpoint(b)
    assert fa.name == fb.name == "step-0000040"
    for folder in ("unet", "unet_ema"):
        wa, wb = read_weights(fa / folder), read_weights(fb / folder)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=f"{folder}/{name}")
    # the loss curve continues exactly (within float tolerance) where the checkpoint left it
    la = {r["step"]: r["loss"] for r in read_metrics(a / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(b / "metrics.jsonl") if "loss" in r}
    assert sorted(lb) == list(range(1, 41))
    assert all(abs(la[s] - lb[s]) <= 1e-5 * max(1.0, abs(la[s])) for s in la)
    # EMA is a different set of weights
    raw, ema = read_weights(fa / "unet"), read_weights(fa / "unet_ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # keep_last keeps every periodic checkpoint here; the final one is marked
    assert json.loads((fa / "state.json").read_text())["final"] is True
    assert (fa / "config.json").is_file() and (b / "loss.png").is_file()


def test_partial_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step-0000005"
    (good / "unet").mkdir(parents=True)
    (good / "state.json").write_text(json.dumps({"step": 5, "trainer": "unet"}))
    (root / ".tmp-step-0000010").mkdir()  # a save killed before its rename
    (root / ".tmp-step-0000010" / "state.json").write_text(json.dumps({"step": 10}))
    (root / "step-0000015").mkdir()  # no state.json: incomplete
    assert checkpoint_dirs(tmp_path) == [good]
    assert find_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path, str(root / ".tmp-step-0000010" / "missing"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "elsewhere")


def test_nan_loss_stops_without_a_checkpoint(tmp_path, tiny_hub_dir, colour_cache):
    from sdxs.train.cli import main

    run = tmp_path / "nan"
    args = overrides(
        run,
        tiny_hub_dir,
        colour_cache,
        **{
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "optim.grad_clip": 0,
            "run.max_steps": 30,
            "run.checkpoint_every": 1000,
            "ema.enabled": "false",
        },
    )
    assert main(["train", "unet", "--config", TINY_UNET_CONFIG, *args]) == 3
    assert checkpoint_dirs(run) == []


def test_checkpoint_every_minutes_checkpoints_by_wall_time(tmp_path, tiny_hub_dir, colour_cache):
    """A run whose steps are slower than the clock checkpoints after every step, with no step interval at all."""
    from sdxs.train.cli import main

    run = tmp_path / "timed"
    extra = {"run.max_steps": 4, "run.checkpoint_every": 0, "run.checkpoint_every_minutes": 1e-9, "optim.grad_accum": 1}
    assert (
        main(["train", "unet", "--config", TINY_UNET_CONFIG, *overrides(run, tiny_hub_dir, colour_cache, **extra)]) == 0
    )
    assert [int(p.name.split("-")[1]) for p in checkpoint_dirs(run)] == [1, 2, 3, 4]
    # off (0) and the step interval off: only the final checkpoint
    run = tmp_path / "untimed"
    extra["run.checkpoint_every_minutes"] = 0
    assert (
        main(["train", "unet", "--config", TINY_UNET_CONFIG, *overrides(run, tiny_hub_dir, colour_cache, **extra)]) == 0
    )
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000004"]


def test_replan_data_resumes_a_run_with_new_sample_weights(tmp_path, tiny_hub_dir, colour_cache, capsys):
    """A resume with another `data.sample_weights` is refused (the epoch plan would differ), unless
    `run.replan_data=true`: then the run goes on from the same weights and optimizer, at the next epoch."""
    from sdxs.train.checkpoint import load_rank_state
    from sdxs.train.cli import main

    run = tmp_path / "mix"
    extra = {"run.max_steps": 2, "run.checkpoint_every": 0, "optim.grad_accum": 1, "ema.enabled": "false"}
    cmd = ["train", "unet", "--config", TINY_UNET_CONFIG]
    assert main([*cmd, *overrides(run, tiny_hub_dir, colour_cache, **extra)]) == 0
    before = load_rank_state(find_checkpoint(run, "latest"), 0)["data"]
    table = tmp_path / "w.csv"
    table.write_text("file_name,weight\nred.png,5\n")
    extra.update({"run.max_steps": 3, "data.sample_weights": table})
    assert main([*cmd, *overrides(run, tiny_hub_dir, colour_cache, **extra), "--resume", "latest"]) == 2
    assert "run.replan_data=true" in capsys.readouterr().err
    extra["run.replan_data"] = "true"
    assert main([*cmd, *overrides(run, tiny_hub_dir, colour_cache, **extra), "--resume", "latest"]) == 0
    last = find_checkpoint(run, "latest")
    assert last.name == "step-0000003"
    after = load_rank_state(last, 0)["data"]
    assert (after["epoch"], after["step"]) == (before["epoch"] + 1, 1) and after["balance"] != before["balance"]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m] == [1, 2, 3]


def test_checkpoint_clock_rejects_negative_minutes():
    from sdxs.train.stop import CheckpointClock

    with pytest.raises(ValueError, match="checkpoint_every_minutes"):
        CheckpointClock(-1)


def test_two_cpu_ranks_stay_identical(tmp_path, tiny_hub_dir, colour_cache):
    """accelerate launch --num_processes 2 (gloo): after every step both ranks hold the same weights."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    run = tmp_path / "ddp"
    args = overrides(
        run, tiny_hub_dir, colour_cache, **{"run.max_steps": 3, "run.checkpoint_every": 1, "optim.grad_accum": 1}
    )
    # accelerate's `--cpu` means one process; `--multi_gpu` with no visible GPU launches torchrun ranks on gloo (MULTI_CPU)
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "sdxs.train.cli",
        "train",
        "unet",
        "--config",
        TINY_UNET_CONFIG,
        *args,
    ]
    out = subprocess.run(
        cmd, cwd=REPO, env={**env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300
    )
    rank1 = "\n".join(line for line in out.stderr.splitlines() if "[rank1]" in line)
    assert out.returncode == 0, (rank1 or out.stderr)[-4000:]
    ckpts = checkpoint_dirs(run)
    assert [c.name for c in ckpts] == ["step-0000001", "step-0000002", "step-0000003"]
    for ckpt in ckpts:
        r0 = torch.load(ckpt / "training_state" / "rank0.pt", weights_only=False)
        r1 = torch.load(ckpt / "training_state" / "rank1.pt", weights_only=False)
        assert torch.equal(r0["param_sums"], r1["param_sums"]), ckpt.name
        assert r0["data"]["world_size"] == 2
        assert not torch.equal(r0["noise_gen"], r1["noise_gen"])  # per-rank noise
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 3 * 2 * 2
