"""Shared fixtures: tiny models built in-process on CPU (never downloaded)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET_CONFIG = str(ROOT / "configs" / "tiny" / "unet.toml")  # absolute: tests run from any directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# remote-code modules (pipeline.py) are copied into a cache of their own: another checkout's test run, writing
# its own pipeline.py into the shared ~/.cache/huggingface/modules at the same time, cannot swap the code under us
# (and one per pytest-xdist worker: `make test` runs the suite in parallel, and the workers inherit the controller's)
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if "HF_MODULES_CACHE" not in os.environ or WORKER:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"sdxs-test-hf-modules-{WORKER}")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)
# the cores shared out among the xdist workers (2 cores, 2 workers: a thread each; oversubscribed OpenMP threads spin)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
if WORKERS > 1:  # the CLI runs in subprocesses take the same share (the tests that pin one thread still do)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random SDXSPipeline (8x/16x VAE, Qwen3.5 VLM text encoder). Treat as read-only."""
    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_hub_dir(tiny_pipe, tmp_path_factory):
    """The tiny pipeline exported in the hub layout (model_index.json + pipeline.py + component folders)."""
    from sdxs.model_folder import save_hub_layout

    out = tmp_path_factory.mktemp("tiny-hub")
    save_hub_layout(tiny_pipe, out, verify=False)
    return out


@pytest.fixture()
def pipe(tiny_pipe):
    """The tiny pipeline with default scheduler state; use when a test changes nothing else."""
    return tiny_pipe


@pytest.fixture(scope="session")
def root_model_dir():
    """The model shipped at the repo root (sdxs-emoji). Its absence is a failure, not a skip: the repo is the model."""
    if not (ROOT / "model_index.json").is_file():
        pytest.fail(f"no model at the repo root ({ROOT}/model_index.json is missing)")
    return ROOT


def copy_model_folder(src: Path, dst: Path) -> Path:
    """Copy only the model repository part of `src` (model_index.json, pipeline.py, component folders) to `dst`."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model_index.json").read_text())
    for name in ("model_index.json", "pipeline.py"):
        shutil.copy2(src / name, dst / name)
    for name, spec in index.items():
        if isinstance(spec, list) and (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
    return dst


def slow_prepare_script(seconds: float) -> str:
    """Python source of `sdxs <args>` with every prepare shard saved `seconds` later: a test that kills a prepare
    run mid-way must find it still running (a tiny image encodes in a few ms)."""
    return f"""
import sys, time
import sdxs.data.prepare as p
save = p.atomic_save
def slow_save(*args, **kwargs):
    time.sleep({seconds})
    return save(*args, **kwargs)
p.atomic_save = slow_save
from sdxs.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
