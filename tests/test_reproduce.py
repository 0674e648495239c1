"""One command reproduces the shipped model (issue 37): scripts/train-emoji.sh runs every stage that made the model
at the root, in order, in its smoke mode (2 steps a stage) on emoji data made from fake npm tarballs; the chain
ends in a hub folder that plain diffusers loads, with v3's lower-casing tokenizer and the model's default step
count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stages_run(stdout: str) -> list[str]:
    """The stages a run of the script logged as started (`== HH:MM:SS  NAME: what`)."""
    return [s for s in re.findall(r"^== \S+  (\S+):", stdout, re.M) if s != "done"]


@pytest.mark.slow
def test_train_emoji_script_runs_every_stage_in_smoke_mode(tmp_path):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from test_data_emoji import _styled_cache
    from test_readme_training import EMOJI, fake_npm_cache

    from sdxs.data.emoji import make_emoji_dataset

    fake_npm_cache(tmp_path / "npm")
    data = tmp_path / "data"
    make_emoji_dataset(data, cache_dir=tmp_path / "npm", min_images=len(EMOJI))
    _styled_cache(tmp_path / "npm3")  # Fluent 3D, Twemoji and Noto, for the decoder-styles stage
    data3 = tmp_path / "data3"
    make_emoji_dataset(data3, cache_dir=tmp_path / "npm3", min_images=5, styles="3d,twemoji,noto")
    run = tmp_path / "run"
    env = {**os.environ, "SMOKE": "1", "RUN": str(run), "DATA": str(data), "DATA3": str(data3)}  # threads: conftest
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "train-emoji.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = ["data", "te", "vae", "decoder", "prepare", "unet-v1", "unet-e", "unet-f", "unet-g", "unet-h"]
    stages += ["unet-i", "refine", "align-1", "align-2", "align-3", "align-4", "align", "decoder-styles", "refine-2"]
    stages += ["unet-styles-1", "unet-styles-2", "unet-styles-3", "unet-styles-4", "unet-styles-5", "unet-styles"]
    stages += ["export"]
    assert all((run / f".done-{s}").is_file() for s in stages), sorted(p.name for p in run.glob(".done-*"))
    # the resumed stages went on from their checkpoints: G's run holds H's and I's steps too
    steps = [json.loads(line)["step"] for line in (run / "unet-g" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2 + 2 + 2
    shipped = run / "export"
    assert json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0
    index = json.loads((shipped / "model_index.json").read_text())
    assert index["default_num_inference_steps"] > 0
    tok = json.loads((shipped / "tokenizer" / "tokenizer.json").read_text())
    assert {"NFKC", "Lowercase"} <= set(re.findall(r'"type": "(\w+)"', json.dumps(tok["normalizer"])))  # v3's
    # the align run's five legs went on from each other (2 smoke steps each), the last two with filler words
    align_steps = [json.loads(line)["step"] for line in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    assert max(align_steps) == 10
    assert json.loads((run / "align" / "config.json").read_text())["captions"]["filler"] == 0.3
    # the refine head was trained again over the align stage's text encoder, in two legs (v2.9)
    refine_steps = [json.loads(line)["step"] for line in (run / "refine-2" / "metrics.jsonl").read_text().splitlines()]
    assert max(refine_steps) == 4
    # the decoder's last stage drew from three styles, the 3d renders weighted 2 (v2.8)
    vae_config = json.loads((run / "vae-styles" / "config.json").read_text())
    assert vae_config["data"]["path"] == str(data3 / "train") and not vae_config["model"]["train_encoder"]
    weights = (run / "vae-style-weights.csv").read_text().splitlines()
    assert {line.split(",")[1] for line in weights[1:]} == {"2.0", "1.0"}
    # the UNet's last stage: two runs on the three styles' cache, the fork's last legs with the 3d renders weighed 3
    # and its data replanned; the model declares the styles (v3.0)
    styles_steps = [json.loads(ln)["step"] for ln in (run / "unet-styles" / "metrics.jsonl").read_text().splitlines()]
    fork_steps = [json.loads(ln)["step"] for ln in (run / "unet-styles-3d" / "metrics.jsonl").read_text().splitlines()]
    assert max(styles_steps) == 4 and max(fork_steps) == 8
    fork_config = json.loads((run / "unet-styles-3d" / "config.json").read_text())
    assert fork_config["data"]["path"] == str(run / "cache3") and fork_config["run"]["replan_data"]
    assert fork_config["data"]["sample_weights"] == str(run / "style-weights-3.csv")
    assert index["style_tags"] == {"3d": "3d render", "twemoji": "flat", "noto": "cartoon"}
    pipe = DiffusionPipeline.from_pretrained(shipped, trust_remote_code=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("Red Apples!", num_inference_steps=2, seed=0).images[0]
    assert np.asarray(image).std() > 0
    flat = pipe("red apple", style="twemoji", num_inference_steps=2, seed=0).images[0]
    assert np.asarray(flat).std() > 0
    # a rerun finds every stage done and does nothing
    again = subprocess.run(["bash", str(REPO / "scripts" / "train-emoji.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and stages_run(again.stdout) == []
    print(f"smoke chain: {time.perf_counter() - start:.0f} s")
