"""The model shipped at the repo root (sdxs-emoji): a small fp16 hub folder that plain diffusers loads offline and
that makes a real emoji-style image (an object on a white background) in seconds on a CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def root_pipe(root_model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(root_model_dir, trust_remote_code=True)  # fp16 files -> fp32 on CPU
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_root_is_a_small_fp16_safetensors_model(root_model_dir):
    from safetensors import safe_open

    index = json.loads((root_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SDXSPipeline"]
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert isinstance(index[name], list) and (root_model_dir / name).is_dir(), name
    weights = sorted(root_model_dir.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    total = sum(w.stat().st_size for w in weights)
    assert total <= 60e6, f"{total / 1e6:.1f} MB of weights at the root; the budget is 60 MB"
    for w in weights:
        with safe_open(str(w), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert dtypes == {"F16"}, (w, dtypes)
    pickles = [p for ext in ("bin", "pt", "pth", "ckpt", "pkl") for p in root_model_dir.glob(f"*/*.{ext}")]
    assert not pickles, pickles


def test_root_model_makes_an_emoji_on_white(root_pipe):
    """A trained model, not noise: "grinning face" is a warm-coloured object in the middle of a white field, every seed."""
    size = int(root_pipe.config.default_width)
    out = root_pipe(["grinning face, 3d render"] * 3, num_inference_steps=20, seed=0).images
    again = root_pipe("grinning face, 3d render", num_inference_steps=20, seed=0).images[0]
    # seed -> the same image, alone or in a batch (batched float kernels differ by rounding only)
    diff = np.abs(np.asarray(out[0], dtype=np.int16) - np.asarray(again, dtype=np.int16))
    assert diff.mean() < 0.5, diff.mean()
    c = size // 10
    for image in out:
        assert image.size == (size, size)
        a = np.asarray(image, dtype=np.float32) / 255.0
        corners = np.stack([a[:c, :c], a[:c, -c:], a[-c:, :c], a[-c:, -c:]]).reshape(-1, 3)
        centre = a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4].reshape(-1, 3)
        assert corners.mean() > 0.85, corners.mean()  # the renders are composited on white
        assert centre.mean() < corners.mean() - 0.15, (centre.mean(), corners.mean())
        r, _, b = centre.mean(0)
        assert r > b + 0.2, centre.mean(0)  # a warm (yellow to orange) face, not a grey or blue one


def test_root_model_upscale_refine_and_image_prompt(root_pipe, tmp_path):
    size = int(root_pipe.config.default_width)
    image = root_pipe("red apple, 3d render", num_inference_steps=8, seed=1).images[0]
    up = root_pipe.image_upscale(image)[0]
    assert up.size == (2 * size, 2 * size)
    refined = root_pipe.refine_prompts("apple", max_new_tokens=24, do_sample=False)[0]
    assert isinstance(refined, str) and refined.strip()
    emb, mask = root_pipe.encode_image(image)
    assert emb.shape[0] == 1 and emb.shape[-1] == root_pipe.text_encoder.config.text_config.hidden_size
    with torch.no_grad():
        variation = root_pipe(prompt_embeds=emb, prompt_attention_mask=mask, num_inference_steps=8, seed=2)
    assert variation.images[0].size == (size, size)
