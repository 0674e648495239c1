"""fp16 safety (issue 19): a half-precision VAE decode that overflows is repeated in float32, never returned as NaN."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch


def test_overflowing_half_decode_is_redone_in_float32(tiny_pipe, caplog):
    vae = tiny_pipe.vae
    latents = torch.randn(1, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    reference = tiny_pipe._vae_decode_whole(latents)  # float32
    decode = vae.decode
    calls = []

    def overflowing_in_half(z, *args, **kwargs):  # what an fp16 overflow looks like: inf/NaN pixels
        calls.append(z.dtype)
        if z.dtype == torch.float16:
            return SimpleNamespace(sample=torch.full_like(reference, float("nan"), dtype=torch.float16))
        return decode(z, *args, **kwargs)

    state = {k: v.clone() for k, v in vae.state_dict().items()}  # tiny_pipe is shared: hand it back bit-exact
    vae.decode = overflowing_in_half
    vae.to(torch.float16)
    try:
        with caplog.at_level(logging.WARNING):
            image = tiny_pipe._vae_decode_whole(latents)
        assert vae.dtype == torch.float16  # the VAE is handed back in the dtype it had
    finally:
        del vae.decode
        vae.to(torch.float32)
        vae.load_state_dict(state)
    assert calls == [torch.float16, torch.float32]  # tried in half, redone in float32
    assert torch.isfinite(image).all()
    torch.testing.assert_close(image, reference, atol=2e-2, rtol=0)  # weights went through fp16 and back
    assert "decoding again in float32" in caplog.text
