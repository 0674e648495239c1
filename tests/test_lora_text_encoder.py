"""Text-encoder LoRA with plain diffusers on the tiny SDXSPipeline (the Qwen3.5 text encoder), with the declared
versions (pyproject.toml: transformers < 5.24, peft >= 0.20).

transformers' adapter API (`add_adapter`, `load_adapter`, `set_adapter`, ...), which diffusers' `load_lora_weights`
calls for `text_encoder.` keys, checks `transformers.integrations.peft.MIN_PEFT_VERSION`: 0.20.0 up to
transformers 5.23, 0.22.0 from 5.24.0 on, and peft 0.22 is not released (0.21.2 is the newest). So transformers is
held below 5.24. An environment with a newer transformers and an older peft than that is outside the declared set:
the test is skipped there, naming the mismatch (`pip install -e .[dev]` installs a working pair).
"""

from __future__ import annotations

import importlib.metadata
import warnings

import numpy as np
import pytest
import torch
from packaging.version import Version

pytest.importorskip("peft", reason="LoRA needs peft (`pip install -e .[lora]`, also in the dev extra)")

from sdxs.model_folder.write import adapted_modules  # noqa: E402

# attention (only in the full-attention layers) and the MLP of every decoder layer: the MLP of the layers before
# the last one is what changes the embeddings (the recipe reads hidden_states[-2], so the last layer never counts)
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapter_api_min_peft() -> Version:
    from transformers.integrations.peft import MIN_PEFT_VERSION

    return Version(MIN_PEFT_VERSION)


def test_declared_transformers_and_peft_fit_together():
    """pyproject's pins: every allowed transformers is below 5.24 (whose adapter API wants peft >= 0.22), and every
    peft requirement (core `lora` and `dev` extras) starts at 0.20 (transformers 5.23's minimum; diffusers: 0.17)."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    reqs = [Requirement(r) for r in re.findall(r'"((?:transformers|peft)[<>=!~ ][^"]*)"', text)]
    transformers = [r.specifier for r in reqs if r.name == "transformers"]
    peft = [r.specifier for r in reqs if r.name == "peft"]
    assert len(transformers) == 1 and len(peft) == 2, reqs
    assert "5.23.0" in transformers[0] and not transformers[0].contains("5.24.0"), transformers
    assert all(not s.contains("0.19.1") and s.contains("0.20.0") and s.contains("0.21.2") for s in peft), peft


needs_declared_pair = pytest.mark.skipif(
    Version(importlib.metadata.version("peft")) < adapter_api_min_peft(),
    reason=(
        f"installed transformers {importlib.metadata.version('transformers')} needs peft >= {adapter_api_min_peft()} "
        f"for adapters, peft {importlib.metadata.version('peft')} is installed: outside pyproject's declared set "
        "(transformers < 5.24); `pip install -e .[dev]` installs a working pair"
    ),
)


def run(pipe, **kw):
    return pipe("a red apple", num_inference_steps=2, seed=0, output_type="np", **kw).images


def tiny():
    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_declared_pair
def test_text_encoder_lora_round_trips_through_load_lora_weights(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # a random (non-zero) adapter through transformers' own API, saved the way diffusers' training examples do
    src = tiny()
    base = run(src)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TE_TARGETS, init_lora_weights=False)
    src.text_encoder.add_adapter(config, adapter_name="te")
    expected = adapted_modules(src.text_encoder)
    assert any(".mlp." in n for n in expected) and any(".self_attn." in n for n in expected)
    with_te = run(src)
    assert np.abs(with_te - base).max() > 1e-3  # the adapter changes the embeddings, hence the image
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(src.text_encoder, adapter_name="te"))
    type(src).save_lora_weights(
        tmp_path, text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=config.to_dict()
    )

    # plain diffusers loads it into a fresh pipeline's text encoder: every adapted module, the same image
    pipe = tiny()
    np.testing.assert_array_equal(run(pipe), base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(str(tmp_path))
    assert adapted_modules(pipe.text_encoder) == expected
    assert not adapted_modules(pipe.unet)
    assert pipe.get_list_adapters() == {"text_encoder": ["default_0"]}
    np.testing.assert_allclose(run(pipe), with_te, atol=1e-5)

    # scale: per call (the pipeline scales the text encoder's layers for the call) and through set_adapters
    np.testing.assert_allclose(run(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-5)
    np.testing.assert_allclose(run(pipe), with_te, atol=1e-5)  # the per-call scale does not stick
    pipe.set_adapters(["default_0"], adapter_weights=[0.0])
    np.testing.assert_allclose(run(pipe), base, atol=1e-5)
    pipe.set_adapters(["default_0"], adapter_weights=[1.0])
    np.testing.assert_allclose(run(pipe), with_te, atol=1e-5)

    # fuse / unfuse / unload
    pipe.fuse_lora()
    np.testing.assert_allclose(run(pipe), with_te, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert not adapted_modules(pipe.text_encoder)
    np.testing.assert_allclose(run(pipe), base, atol=1e-5)
