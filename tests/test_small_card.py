"""docs/pipeline.md "Run sdxs-1b on a smaller card": embeddings computed once, the text encoder dropped (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxs.pipeline import SDXSPipeline


def test_embeddings_once_then_drop_the_text_encoder(tiny_pipe):
    """The documented recipe, step by step: encode, set `pipe.text_encoder = None`, generate from the embeddings."""
    pipe = SDXSPipeline(**tiny_pipe.components, text_recipe=dict(tiny_pipe.config.text_recipe))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red apple", "a cat sleeping on a sofa"]
    kwargs = dict(num_inference_steps=2, guidance_scale=4.0, output_type="np")
    reference = tiny_pipe(prompts, negative_prompt="low quality", generator=torch.Generator().manual_seed(0), **kwargs)

    with torch.no_grad():
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), negative_prompt="low quality"
        )
    pipe.text_encoder = None  # frees its memory once nothing else holds it
    pipe.tokenizer = None
    assert pipe.text_encoder is None and pipe.config.text_encoder == (None, None)
    images = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images
    np.testing.assert_allclose(images, reference.images, atol=1e-5)
    assert "text_encoder" not in {k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    with pytest.raises(ValueError, match="prompt_embeds"):  # a text prompt now needs the encoder: a clear error
        pipe("a red apple", **kwargs)
