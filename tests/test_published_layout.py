"""The published sdxs-1b repository layout (issue 19, item 2), as a random-weight toy folder.

What public evidence shows of it: no `vision_processor/` folder (the image processor lives in `tokenizer/`, as
`processor.save_pretrained("tokenizer")` writes it), no default size and no text recipe in model_index.json, an
SD1.5-like UNet whose last level is widened and plain, 32 latent channels, per-channel latent statistics in the VAE
config, a flow-matching scheduler. Plain `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` must load
it and generate, and our own layout must keep loading, both without warnings about components.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published_dir(tiny_pipe, tmp_path_factory) -> Path:
    from diffusers import AsymmetricAutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    hidden = tiny_pipe.text_encoder.config.text_config.hidden_size
    unet = UNet2DConditionModel(  # the published shape at toy width: plain, widened last level, 32 channels
        sample_size=4,
        in_channels=32,
        out_channels=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32, 48),
        layers_per_block=(2, 1, 1, 1),
        transformer_layers_per_block=(1, 1, 1, 2),
        attention_head_dim=(2, 2, 2, 3),
        cross_attention_dim=hidden,
        norm_num_groups=8,
    )
    vae = AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        down_block_out_channels=(8, 8, 16, 16),
        up_block_types=("UpDecoderBlock2D",) * 5,
        up_block_out_channels=(8, 8, 16, 16, 16),
        latent_channels=32,
        norm_num_groups=4,
        scaling_factor=1.0,
    )
    gen = torch.Generator().manual_seed(1)
    vae.register_to_config(
        latents_mean=(torch.randn(32, generator=gen) * 0.3).tolist(),
        latents_std=(torch.rand(32, generator=gen) + 0.5).tolist(),
    )
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    tiny_pipe.text_encoder.save_pretrained(out / "text_encoder")
    tiny_pipe.tokenizer.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out / "scheduler")
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2).save_pretrained(out / "tokenizer")
    pre = out / "tokenizer" / "preprocessor_config.json"
    config = json.loads(pre.read_text())  # as Qwen's processor writes it (the fast class, a processor class name)
    config.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
    pre.write_text(json.dumps(config, indent=2))
    index = {
        "_class_name": ["pipeline", "SDXSPipeline"],
        "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", type(tiny_pipe.text_encoder).__name__],
        "tokenizer": ["transformers", type(tiny_pipe.tokenizer).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AsymmetricAutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.copy2(ROOT / "src" / "sdxs" / "pipeline.py", out / "pipeline.py")
    assert not (out / "vision_processor").exists()
    return out


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(folder, **kwargs):
    """Plain diffusers loading, returning the pipeline and the warnings about components it logged."""
    from diffusers import DiffusionPipeline

    handler = _Warnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **kwargs)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    pipe.set_progress_bar_config(disable=True)
    component_words = ("vision_processor", "component", "expected", "missing", "tokenizer", "text_encoder")
    # diffusers' own AsymmetricAutoencoderKL warns about the config keys it registers itself (block_out_channels,
    # force_upcast) and about latents_mean/std, which it keeps in `vae.config` where the pipeline reads them
    about_components = [
        m for m in handler.messages if "config attributes" not in m and any(w in m for w in component_words)
    ]
    return pipe, about_components


def test_published_layout_loads_and_generates(published_dir):
    pipe, warnings = _load(published_dir)
    assert warnings == []
    assert type(pipe).__name__ == "SDXSPipeline"
    assert pipe.vision_processor is not None and type(pipe.vision_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert pipe.vae.config.latents_mean is not None and len(pipe.vae.config.latents_std) == 32
    assert pipe.size_step == 64 and (pipe.config.default_width, pipe.config.default_height) == (64, 64)
    out = pipe(
        "a red apple", num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    ).images
    assert out[0].size == (64, 64)
    arr = np.asarray(out[0], dtype=np.float32)
    assert np.isfinite(arr).all() and arr.std() > 0
    # the vision path works from the image processor found in tokenizer/
    embeds, mask = pipe.encode_image(PIL.Image.new("RGB", (64, 64), (200, 30, 30)))
    assert embeds.shape[0] == 1 and embeds.shape[-1] == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.image_upscale(PIL.Image.new("RGB", (32, 32), (10, 200, 10)))[0].size == (64, 64)


def test_our_layout_still_loads_without_component_warnings(tiny_hub_dir):
    pipe, warnings = _load(tiny_hub_dir)
    assert warnings == []
    assert type(pipe.vision_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_published_layout_without_text_encoder_generates_from_embeddings(published_dir):
    """Optional text encoder/tokenizer: `text_encoder=None, tokenizer=None` loads and runs on `prompt_embeds`."""
    full, _ = _load(published_dir)
    with torch.no_grad():
        embeds, mask, neg, neg_mask = full.encode_prompt("a red apple", device=torch.device("cpu"))
    pipe, warnings = _load(published_dir, text_encoder=None, tokenizer=None)
    assert warnings == [] and pipe.text_encoder is None and pipe.tokenizer is None
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    a = full("a red apple", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    np.testing.assert_allclose(a, b, atol=1e-5)
