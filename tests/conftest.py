"""Shared fixtures: tiny models built in-process on CPU (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
    from sdxs.export import save_hub_layout

    out = tmp_path_factory.mktemp("tiny-hub")
    save_hub_layout(tiny_pipe, out, verify=False)
    return out


@pytest.fixture()
def pipe(tiny_pipe):
    """The tiny pipeline with default scheduler state; use when a test changes nothing else."""
    return tiny_pipe
