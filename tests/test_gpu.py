"""CUDA paths (fp16/bf16): run where a GPU exists, skipped elsewhere (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU on this machine"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generation_upscale_and_vlm_paths(tiny_hub_dir, dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_hub_dir, dtype=dtype, trust_remote_code=True).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red apple", negative_prompt="low quality", num_inference_steps=4, seed=0, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    cpu = DiffusionPipeline.from_pretrained(tiny_hub_dir, trust_remote_code=True)
    cpu.set_progress_bar_config(disable=True)
    reference = cpu("a red apple", negative_prompt="low quality", num_inference_steps=4, seed=0, output_type="np")
    assert np.abs(images - reference.images).mean() < 0.05  # same seed: the noise is drawn on the CPU
    from PIL import Image

    assert pipe.image_upscale(Image.new("RGB", (40, 24), (200, 30, 30)))[0].size == (80, 48)
    emb, mask = pipe.encode_image(Image.new("RGB", (64, 64), (30, 200, 30)))
    assert emb.device.type == "cuda" and torch.isfinite(emb).all()
    assert isinstance(pipe.refine_prompts("girl", max_new_tokens=4, seed=0)[0], str)


def test_model_cpu_offload_on_cuda(tiny_hub_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_hub_dir, dtype=torch.float16, trust_remote_code=True)
    pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    assert pipe("cat", num_inference_steps=2, seed=0).images[0].size == (64, 64)
    assert pipe.unet.device.type == "cpu"  # offloaded again after the call


@pytest.mark.parametrize("features", [("channels_last", "fused_qkv"), ("compile",), ("cuda_graphs",)])
def test_speedups_on_cuda_keep_the_image(tiny_hub_dir, features):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_hub_dir, dtype=torch.float16, trust_remote_code=True)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt="low quality", num_inference_steps=4, output_type="np")
    reference = pipe("a red apple", seed=0, **kw).images
    pipe.enable_speedups(*features)
    pipe("girl, blue hair", seed=3, **kw)  # warm-up: compiles / records graphs
    assert np.abs(pipe("a red apple", seed=0, **kw).images - reference).mean() < 0.02
