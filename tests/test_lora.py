"""LoRA at the pipeline level with diffusers' StableDiffusionLoraLoaderMixin (issue 17), on the tiny model with peft."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft", reason="LoRA needs peft (`pip install -e .[lora]`, also in the dev extra)")

STEPS = 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def run(pipe, **kw):
    kw.setdefault("prompt", "a red apple")
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    kw.setdefault("seed", 0)
    return pipe(**kw).images


@pytest.fixture(scope="module")
def lora_pipe():
    """A private tiny pipeline (LoRA tests load and fuse into it; each test leaves it without adapters)."""
    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(lora_pipe, tmp_path_factory):
    """A random (non-zero) UNet LoRA for the tiny model, saved with the pipeline's own `save_lora_weights`."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    lora_pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="tmp"
    )
    layers = get_peft_model_state_dict(lora_pipe.unet, adapter_name="tmp")
    layers = {k: v * 0.5 for k, v in layers.items()}  # a visible but moderate change
    out = tmp_path_factory.mktemp("lora")
    type(lora_pipe).save_lora_weights(out, unet_lora_layers=layers)
    lora_pipe.unload_lora_weights()
    return out


# the second adapter ("b") is loaded on purpose; peft warns whenever a model gets more than one
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_lora_scale_adapters_fuse_unload(lora_pipe, lora_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = lora_pipe
    base = run(pipe)
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe.load_lora_weights(str(lora_dir), adapter_name="a")
    try:
        full = run(pipe)
        assert np.abs(full - base).max() > 1e-3  # the LoRA changes the image
        np.testing.assert_allclose(run(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6)
        half = run(pipe, cross_attention_kwargs={"scale": 0.5})
        assert np.abs(half - base).max() > 1e-4 and np.abs(half - full).max() > 1e-4
        np.testing.assert_allclose(run(pipe), full, atol=1e-6)  # the per-call scale does not stick

        pipe.set_adapters(["a"], adapter_weights=[0.0])
        np.testing.assert_allclose(run(pipe), base, atol=1e-6)
        pipe.set_adapters(["a"], adapter_weights=[0.5])
        np.testing.assert_allclose(run(pipe), half, atol=1e-5)
        pipe.load_lora_weights(str(lora_dir), adapter_name="b")  # the same LoRA twice at 0.5 each = once at 1
        pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
        np.testing.assert_allclose(run(pipe), full, atol=1e-5)
        pipe.delete_adapters("b")
        pipe.set_adapters(["a"], adapter_weights=[1.0])

        with pytest.raises(ValueError, match="not fused"):
            pipe.save_pretrained(tmp_path / "unfused")
        pipe.fuse_lora()
        fused = run(pipe)
        np.testing.assert_allclose(fused, full, atol=1e-5)
        pipe.save_pretrained(tmp_path / "fused")  # the LoRA baked into plain weights
        assert not [k for k in load_file(next((tmp_path / "fused" / "unet").glob("*.safetensors"))) if "lora" in k]
        reloaded = DiffusionPipeline.from_pretrained(tmp_path / "fused", trust_remote_code=True)
        reloaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(run(reloaded), fused, atol=1e-6)
        assert pipe.unet.peft_config  # saving did not touch the caller's pipeline
        pipe.unfuse_lora()
        np.testing.assert_allclose(run(pipe), full, atol=1e-5)
    finally:
        pipe.unload_lora_weights()
    # fuse then unfuse adds and subtracts the LoRA delta in float32: the base weights come back to rounding error
    np.testing.assert_allclose(run(pipe), base, atol=1e-4)


def test_lora_save_load_round_trip_is_exact(lora_pipe, lora_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe = lora_pipe
    saved = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(str(lora_dir), adapter_name="x")
    try:
        first = run(pipe)
        layers = get_peft_model_state_dict(pipe.unet, adapter_name="x")
        type(pipe).save_lora_weights(tmp_path, unet_lora_layers=layers)
        again = load_file(tmp_path / "pytorch_lora_weights.safetensors")
        assert saved.keys() == again.keys() and all(k.startswith("unet.") for k in saved)
        for k in saved:
            torch.testing.assert_close(again[k], saved[k], rtol=0, atol=0)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(tmp_path), adapter_name="y")
        np.testing.assert_array_equal(run(pipe), first)
    finally:
        pipe.unload_lora_weights()
