"""Presets: parameter counts of each size, and the scale factors the pipeline derives."""

from __future__ import annotations

import pytest

from sdxs.presets import PRESETS, count_parameters, get_preset


def test_sdxs_1b_preset_has_the_cards_shape():
    counts = count_parameters("sdxs-1b")
    assert 1.5e9 < counts["unet"] < 1.8e9  # "Unet: 1.6b parameters"
    preset = get_preset("sdxs-1b")
    assert len(preset.unet["down_block_types"]) == 4
    assert all("CrossAttn" in b for b in preset.unet["down_block_types"])  # attention evenly spread
    assert preset.unet["cross_attention_dim"] == preset.text_encoder["text_config"]["hidden_size"] == 2048
    assert preset.vae["latent_channels"] == 32
    assert len(preset.vae["up_block_out_channels"]) == len(preset.vae["down_block_out_channels"]) + 1  # 8x / 16x


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
