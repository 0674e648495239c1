"""Sharded engines (FSDP, DeepSpeed) are refused with a clear message, also where accelerate would silently fall back.

With no GPU, accelerate turns an FSDP launch into plain multi-process CPU data parallelism (it selects FSDP for GPU
launches only), so FSDP training cannot be tested on our CPU machines; the DDP path is tested in
test_train_resume.py (`test_two_cpu_ranks_stay_identical`). docs/scale.md says what each engine would cost."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_UNET_CONFIG

from sdxs.train.common import make_accelerator
from sdxs.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("var, engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")])
def test_sharded_engine_request_is_refused_before_training(monkeypatch, var, engine):
    monkeypatch.setenv(var, "true")
    with pytest.raises(ValueError, match=f"with {engine} is not supported.*ddp.yaml"):
        make_accelerator(RunConfig(output_dir="unused"))


def test_fsdp_config_launch_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` on a CPU machine: refused on every rank."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(REPO / "configs/accelerate/fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "sdxs.train.cli",
        "train",
        "unet",
        "--config",
        TINY_UNET_CONFIG,
        f"run.output_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "with FSDP is not supported by sdxs train" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
