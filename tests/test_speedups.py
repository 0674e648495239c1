"""Opt-in speed features: same images as without them, clear errors, and no recompiles for a new prompt or seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxs import cli


def _fresh(tiny_hub_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_hub_dir, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt="a red apple", seed=0):
    return pipe(prompt, negative_prompt="low quality", num_inference_steps=3, seed=seed, output_type="np").images


def test_channels_last_and_fused_qkv_keep_the_image(tiny_hub_dir):
    pipe = _fresh(tiny_hub_dir)
    reference = _image(pipe)
    pipe.enable_speedups("channels_last", "fused_qkv")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_image(pipe), reference, atol=2e-3)


@pytest.mark.slow
def test_regional_compile_keeps_the_image_and_does_not_recompile(tiny_hub_dir):
    import torch._dynamo

    torch._dynamo.reset()
    pipe = _fresh(tiny_hub_dir)
    reference = _image(pipe)
    pipe.enable_speedups("compile")
    np.testing.assert_allclose(_image(pipe), reference, atol=2e-3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _image(pipe, prompt="girl with blue hair, smiling", seed=7)  # another prompt length and seed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_does_not_recompile_for_every_new_size(tiny_hub_dir):
    """A new image size compiles at most once more (dynamo's automatic dynamic shapes), then never (issue 19)."""
    import torch._dynamo

    torch._dynamo.reset()
    pipe = _fresh(tiny_hub_dir)
    pipe.enable_speedups("compile")
    counts = []
    for w, h in [(64, 64), (96, 96), (128, 64), (64, 128), (128, 128)]:
        pipe("a red apple", num_inference_steps=2, seed=0, width=w, height=h, output_type="np")
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[-1] <= counts[0] + 1 and counts[2:] == [counts[1]] * 3, counts
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (("turbo",), "unknown speed feature"),
        (("compile", "cuda_graphs"), "pick one"),
        (("cuda_graphs",), "needs the UNet on CUDA"),
    ],
)
def test_bad_speedups_raise_clear_errors(pipe, features, match):
    with pytest.raises(ValueError, match=match):
        pipe.enable_speedups(*features)


def test_cli_speedup_flag(tiny_hub_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    argv = ["generate", "cat", "--model", str(tiny_hub_dir), "--steps", "2", "--output", str(out), "-q"]
    assert cli.main([*argv, "--speedup", "channels_last", "--speedup", "vae_slicing"]) == 0 and out.is_file()
    assert cli.main([*argv, "--speedup", "cpu_offload", "--device", "cpu"]) == cli.EXIT_USER_ERROR
    assert "needs a CUDA device" in capsys.readouterr().err


def test_cli_and_pipeline_list_the_same_features(pipe):
    assert cli.SPEEDUPS == type(pipe).SPEEDUPS
