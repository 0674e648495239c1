"""The one text-conditioning function: layout, padding side, batch composition, truncation, mask use."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdxs.pipeline import encode_text


def enc(pipe, prompts, **recipe):
    with torch.no_grad():
        return encode_text(pipe.text_encoder, pipe.tokenizer, prompts, {**pipe.config.text_recipe, **recipe})


def test_layout_pooled_first_and_mask_covers_pooled_slot(pipe):
    emb, mask = enc(pipe, ["a red apple", "girl"])
    L = pipe.config.text_recipe["max_length"]
    assert emb.shape == (2, 1 + L, pipe.text_encoder.config.text_config.hidden_size)
    assert mask.shape == (2, 1 + L) and mask.dtype == torch.long
    assert (mask[:, 0] == 1).all()
    n_tokens = len(pipe.tokenizer("a red apple")["input_ids"])
    assert mask[0].sum() == 1 + n_tokens
    # pooled vector = hidden state of the last real token (layer -2), which also sits at position n_tokens
    torch.testing.assert_close(emb[0, 0], emb[0, n_tokens])
    assert torch.count_nonzero(emb[0, 1 + n_tokens :]) == 0  # padding positions are zeroed


def test_same_prompt_same_embedding_whatever_the_batch(pipe):
    alone, m_alone = enc(pipe, ["girl, smiling"])
    mixed, m_mixed = enc(pipe, ["a much longer prompt about mountains and lakes at dusk", "girl, smiling", ""])
    torch.testing.assert_close(alone[0], mixed[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(m_alone[0], m_mixed[1])


def test_padding_side_left_gives_the_same_real_token_states(pipe):
    right, m_r = enc(pipe, ["girl, smiling", "a red apple on a table"], padding_side="right")
    left, m_l = enc(pipe, ["girl, smiling", "a red apple on a table"], padding_side="left")
    torch.testing.assert_close(right[:, 0], left[:, 0], atol=1e-5, rtol=1e-5)  # pooled vectors agree
    for i in range(2):  # the real tokens sit at the start (right padding) or the end (left padding)
        n = int(m_r[i].sum()) - 1
        torch.testing.assert_close(right[i, 1 : 1 + n], left[i, -n:], atol=1e-5, rtol=1e-5)


def test_empty_prompt_is_a_fixed_single_token(pipe):
    emb, mask = enc(pipe, ["", ""])
    assert mask[0].sum() == 2  # pooled slot + one pad token standing in
    torch.testing.assert_close(emb[0], emb[1])


def test_overlong_prompt_truncated_with_warning_naming_dropped_tokens(pipe, caplog):
    long = " ".join(["mountain"] * 400)
    n = len(pipe.tokenizer(long)["input_ids"])
    with caplog.at_level(logging.WARNING):
        emb, mask = enc(pipe, [long, "girl"])
    L = pipe.config.text_recipe["max_length"]
    assert f"{n - L} token(s) dropped" in caplog.text
    assert mask[0].sum() == 1 + L


def test_chat_template_recipe_changes_the_encoding(pipe):
    plain, _ = enc(pipe, ["girl"])
    chat, m = enc(pipe, ["girl"], chat_template=True)
    assert m[0].sum() > 2 and not torch.allclose(plain[0, 0], chat[0, 0])


def test_unet_ignores_masked_positions(pipe):
    """Padding never leaks: garbage in masked embedding slots must not change the image."""
    emb, mask = enc(pipe, ["girl, smiling"])
    noisy = emb.clone()
    noisy[mask == 0] = torch.randn_like(noisy[mask == 0]) * 10
    kw = dict(prompt_attention_mask=mask, guidance_scale=1.0, num_inference_steps=2, seed=0, output_type="np")
    a = pipe(prompt_embeds=emb, **kw).images
    b = pipe(prompt_embeds=noisy, **kw).images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_recipe_is_stored_in_the_model_config(pipe):
    assert pipe.config.text_recipe == {
        "max_length": 250,
        "padding_side": "right",
        "chat_template": False,
        "hidden_layer": -2,
    }


@pytest.mark.parametrize("layer", [-1, -2])
def test_hidden_layer_choice(pipe, layer):
    emb, mask = enc(pipe, ["girl"], hidden_layer=layer)
    ids = pipe.tokenizer(["girl"], return_tensors="pt")
    with torch.no_grad():
        hs = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states[layer]
    torch.testing.assert_close(emb[0, 1 : 1 + hs.shape[1]], hs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_encoding_at_the_longest_prompt_equals_full_length(pipe, side):
    """encode_text runs the encoder only as long as the longest prompt; the result equals a full-length pass."""
    prompts = ["girl, smiling", "a red apple on a wooden table", ""]
    emb, mask = enc(pipe, prompts, padding_side=side)
    L = pipe.config.text_recipe["max_length"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=L, padding_side=side, return_tensors="pt")
    full_mask = ids["attention_mask"].clone()
    full_mask[2, L - 1 if side == "left" else 0] = 1  # the empty prompt's stand-in token
    with torch.no_grad():
        hs = pipe.text_encoder(input_ids=ids["input_ids"], attention_mask=full_mask, output_hidden_states=True)
    ref = hs.hidden_states[-2] * full_mask[..., None]
    torch.testing.assert_close(emb[:, 1:], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask[:, 1:], full_mask)
