"""Presets: parameter counts of each size, and the scale factors the pipeline derives."""

from __future__ import annotations

import pytest

from sdxs.presets import PRESETS, get_preset


def _meta_unet(config):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_sdxs_1b_preset_has_the_published_shape():
    preset = get_preset("sdxs-1b")
    u = preset.unet
    assert tuple(u["block_out_channels"]) == (320, 640, 1280, 1536)  # SD1.5-like, the last level widened
    assert tuple(u["layers_per_block"]) == (4, 3, 2, 2)
    assert tuple(u["transformer_layers_per_block"]) == (2, 2, 3, 4)
    assert tuple(u["down_block_types"]) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # plain fourth level
    assert tuple(u["up_block_types"]) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert u["in_channels"] == u["out_channels"] == preset.vae["latent_channels"] == 32
    assert u["cross_attention_dim"] == preset.text_encoder["text_config"]["hidden_size"] == 2048
    assert len(preset.vae["up_block_out_channels"]) == len(preset.vae["down_block_out_channels"]) + 1  # 8x / 16x
    assert preset.scheduler["shift"] == 3.0  # a recipe value, stated in the preset

    unet = _meta_unet(u)  # the built model has that shape: attention blocks per level, 64-channel heads
    assert [len(b.resnets) for b in unet.down_blocks] == [4, 3, 2, 2]
    assert [len(b.attentions) if hasattr(b, "attentions") else 0 for b in unet.down_blocks] == [4, 3, 2, 0]
    first = unet.down_blocks[0].attentions[0]
    assert len(first.transformer_blocks) == 2 and first.transformer_blocks[0].attn2.to_k.in_features == 2048
    assert len(unet.down_blocks[2].attentions[0].transformer_blocks) == 3
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 4
    assert all(
        blk.attn1.heads * 64 == blk.attn1.inner_dim
        for a in unet.down_blocks[:3]
        for t in a.attentions
        for blk in t.transformer_blocks
    )


def test_sdxs_1b_unet_parameter_count_matches_the_reported_count_with_a_clip_width():
    from sdxs.presets import unet_config

    def n(cross):
        return sum(p.numel() for p in _meta_unet(unet_config("sdxs-1b", cross_attention_dim=cross)).parameters())

    assert n(768) == 1_585_405_344  # the count reported for this shape with a 768-wide CLIP text encoder
    assert n(None) == 1_687_969_184  # ours: cross-attention on Qwen3.5-2B's 2048-wide hidden states


def test_step_flops_counts_a_cfg_step_on_the_meta_device():
    from sdxs.presets import step_flops

    one = step_flops("tiny", 64, 64, batch=1, tokens=9)
    two = step_flops("tiny", 64, 64, batch=2, tokens=9)
    assert one["unet_step"] > 0 and two["unet_step"] == 2 * one["unet_step"]  # CFG = two latents per step
    assert two["vae_decode"] == one["vae_decode"] > 0  # decoded once per image
    with pytest.raises(ValueError, match="multiple"):
        step_flops("tiny", 72, 64)


def test_tiny_pipeline_scale_factors(tiny_pipe):
    assert (tiny_pipe.vae_encoder_scale_factor, tiny_pipe.vae_scale_factor) == (8, 16)
    assert tiny_pipe.size_step == 16  # decoder 16x, a two-level UNet needs no extra multiple


def test_size_step_for_the_1b_shape_allows_the_cards_sizes():
    from types import SimpleNamespace

    from sdxs.pipeline import unet_size_multiple

    unet = SimpleNamespace(config=SimpleNamespace(down_block_types=get_preset("sdxs-1b").unet["down_block_types"]))
    step = 16 * unet_size_multiple(unet)
    assert step == 64 and 1088 % step == 0 and 1344 % step == 0 and 1408 % step == 0


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown preset"):
        get_preset("huge")
    assert {"tiny", "sdxs-1b"} <= set(PRESETS)
