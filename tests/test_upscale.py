"""image_upscale: exactly 2x for any size and mode, tiled for large inputs, never NaN in fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def rand_image(w, h, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(arr, "RGBA").convert(mode)


@pytest.mark.parametrize("size", [(37, 23), (64, 64), (9, 50)])
def test_exactly_2x_for_odd_sizes(pipe, size):
    out = pipe.image_upscale(rand_image(*size))
    assert isinstance(out, list) and out[0].size == (2 * size[0], 2 * size[1]) and out[0].mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_modes(pipe, mode):
    if mode == "I;16":
        img = Image.fromarray(np.linspace(0, 65535, 40 * 24).astype(np.uint16).reshape(24, 40))
        assert img.mode.startswith("I;16")
    else:
        img = rand_image(40, 24, mode)
    assert pipe.image_upscale(img)[0].size == (80, 48)


def test_paths_lists_and_exif_rotation(pipe, tmp_path):
    img = rand_image(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    rand_image(16, 16).save(tmp_path / "a.png")
    out = pipe.image_upscale([str(tmp_path / "rot.jpg"), tmp_path / "a.png"])
    assert [o.size for o in out] == [(48, 80), (32, 32)]  # rotated before upscaling


def test_transparent_pixels_composited_on_white(pipe):
    from sdxs.pipeline import load_rgb_image

    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert load_rgb_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_tiling_blends_to_exactly_the_untiled_result_for_a_local_operator(pipe, monkeypatch):
    """With a VAE stand-in that is a local 2x operator, overlapping tiles must reassemble the image exactly:
    the blend weights form a partition of unity and every output pixel is covered."""
    import torch.nn.functional as F

    monkeypatch.setattr(pipe, "_vae_encode", lambda px: px)
    monkeypatch.setattr(pipe, "_vae_decode_whole", lambda z: F.interpolate(z, scale_factor=2, mode="nearest"))
    img = rand_image(200, 136, seed=1)
    whole = np.asarray(pipe.image_upscale(img, tile_size=256)[0], dtype=np.int16)
    tiled = np.asarray(pipe.image_upscale(img, tile_size=64, tile_overlap=16)[0], dtype=np.int16)
    assert whole.shape == tiled.shape == (272, 400, 3)
    assert np.abs(whole - tiled).max() <= 1  # rounding only


@pytest.mark.slow
def test_2048_input_is_tiled_on_cpu(pipe):
    img = Image.new("RGB", (2048, 2048), (30, 120, 200))
    out = pipe.image_upscale(img)[0]
    assert out.size == (4096, 4096)


def test_fp16_decode_never_nan(pipe):
    """A VAE whose fp16 decode overflows falls back to fp32 instead of returning NaN/black images."""
    import copy

    from sdxs.pipeline import SDXSPipeline

    vae = copy.deepcopy(pipe.vae).to(torch.float16)
    with torch.no_grad():  # make the decoder overflow fp16 (max 65504) but stay finite in fp32
        vae.decoder.conv_in.weight.mul_(1e3)
        vae.decoder.conv_in.bias.fill_(6e4)
    p = SDXSPipeline(**{**pipe.components, "vae": vae})
    p.set_progress_bar_config(disable=True)
    out = np.asarray(p.image_upscale(rand_image(16, 16))[0])
    assert np.isfinite(out).all() and out.shape == (32, 32, 3)


def test_bad_tile_arguments(pipe):
    with pytest.raises(ValueError, match="tile_size"):
        pipe.image_upscale(rand_image(8, 8), tile_size=30)
    with pytest.raises(ValueError, match="tile_overlap"):
        pipe.image_upscale(rand_image(8, 8), tile_size=64, tile_overlap=40)
    with pytest.raises(ValueError, match="empty"):
        pipe.image_upscale([])
    with pytest.raises(TypeError, match="image"):
        pipe.image_upscale(123)


def test_vae_tiling_and_slicing_in_generation(monkeypatch):
    """Tiled latent decoding reassembles exactly for a local decoder, and the real tiny VAE decodes tiled sizes."""
    import torch.nn.functional as F

    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["cat", "dog"], width=160, height=96, num_inference_steps=2, seed=0, output_type="np")
    reference = pipe(**kw).images
    pipe.enable_vae_slicing()
    np.testing.assert_allclose(pipe(**kw).images, reference, atol=1e-4)  # batch-size-dependent conv kernels
    pipe.enable_vae_tiling(tile_latents=4, overlap_latents=2)
    tiled = pipe(**kw).images
    assert tiled.shape == reference.shape and np.isfinite(tiled).all()
    monkeypatch.setattr(pipe, "_vae_decode_whole", lambda z: F.interpolate(z[:, :3], scale_factor=16, mode="nearest"))
    latents = torch.randn(1, 4, 7, 11)
    tiled = pipe._vae_decode(latents)
    pipe.disable_vae_tiling()
    torch.testing.assert_close(tiled, pipe._vae_decode(latents))
    with pytest.raises(ValueError, match="tile_latents"):
        pipe.enable_vae_tiling(tile_latents=2)


def test_pixel_limit_refused_before_any_work(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(type(pipe), "_vae_encode", lambda self, x: calls.append(x.shape))
    small, big = rand_image(8, 8), rand_image(40, 30)
    with pytest.raises(ValueError, match=r"image 1 is 40x30 = 1200 pixels, more than `max_pixels`=1000"):
        pipe.image_upscale([small, big], max_pixels=1000)
    assert calls == []  # not even the small first image was started


def test_progress_bar_counts_tiles(pipe, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

    monkeypatch.setattr(type(pipe), "progress_bar", lambda self, iterable=None, total=None: Bar(total))
    out = pipe.image_upscale(rand_image(48, 40), tile_size=32, tile_overlap=8)[0]
    assert out.size == (96, 80)
    assert [(b.total, b.n) for b in bars] == [(4, 4)]  # 2 x 2 tiles, each reported once
