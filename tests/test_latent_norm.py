"""VAE latent normalisation with the config's per-channel `latents_mean` / `latents_std` (issue 19, item 1).

diffusers' SDXL/Flux convention: encode `(z - mean) * scaling_factor / std`, decode `z * std / scaling_factor + mean`.
Without the statistics, today's `z * scaling_factor` (the shipped emoji model has none: its outputs must not change).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

from sdxs.pipeline import SDXSPipeline, denormalize_latents, latent_statistics, normalize_latents

ROOT = Path(__file__).resolve().parents[1]
MEAN = [0.9, -0.7, 0.6, -1.1]  # tiny preset: 4 latent channels
STD = [0.5, 2.0, 1.5, 0.7]


def _with_stats(pipe, mean=MEAN, std=STD, scaling_factor=0.8) -> SDXSPipeline:
    vae = copy.deepcopy(pipe.vae)
    vae.register_to_config(latents_mean=list(mean), latents_std=list(std), scaling_factor=scaling_factor)
    out = SDXSPipeline(**{**pipe.components, "vae": vae}, text_recipe=dict(pipe.config.text_recipe))
    out.set_progress_bar_config(disable=True)
    return out


def _image(w: int = 64, h: int = 64) -> PIL.Image.Image:
    """A smooth, strongly coloured image (red-orange gradient with a blue disc)."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([0.9 - 0.2 * y, 0.3 + 0.4 * x, 0.1 + 0.1 * x * y], -1)
    rgb[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] = (0.1, 0.2, 0.9)
    return PIL.Image.fromarray((rgb * 255).astype(np.uint8))


def test_helpers_follow_the_sdxl_formula_and_invert_exactly(tiny_pipe):
    pipe = _with_stats(tiny_pipe)
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    torch.testing.assert_close(normalize_latents(z, pipe.vae), (z - m) * 0.8 / s)
    torch.testing.assert_close(denormalize_latents(z, pipe.vae), z * s / 0.8 + m)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, pipe.vae), pipe.vae), z)
    assert latent_statistics(tiny_pipe.vae) is None
    with pytest.raises(ValueError, match="latent channels"):
        latent_statistics(_with_stats(tiny_pipe, mean=[0.0] * 3, std=[1.0] * 3).vae)


def test_pipeline_encode_decode_use_the_statistics_and_round_trip_exactly(tiny_pipe):
    pipe = _with_stats(tiny_pipe)
    vae = pipe.vae
    pixels = pipe._image_to_tensor(_image())
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
        latents = pipe._vae_encode(pixels)
        torch.testing.assert_close(latents, (raw - m) * 0.8 / s)
        # decode inverts encode exactly: the round trip through the normalised space is the raw VAE's round trip
        torch.testing.assert_close(pipe._vae_decode(latents), vae.decode(raw).sample.clamp(-1, 1))
        # image_upscale (encode at 8x -> decode at 16x) is the raw VAE's too
        up = pipe.image_upscale(_image())[0]
        ref = pipe.image_processor.postprocess(vae.decode(raw).sample.clamp(-1, 1), output_type="pil")[0]
    assert np.abs(np.asarray(up, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1


def test_ignoring_the_statistics_visibly_shifts_colour(tiny_pipe, root_model_dir):
    """The 'faded images' symptom, on a trained decoder (the shipped 2.4M-parameter VAE, 16 channels): latents in
    the normalised space, decoded as if there were no statistics, come out in other colours."""
    from diffusers import AsymmetricAutoencoderKL

    vae = AsymmetricAutoencoderKL.from_pretrained(root_model_dir / "vae").eval()
    pixels = tiny_pipe._image_to_tensor(_image())
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    # statistics measured as `sdxs train vae` measures them (per-channel mean/std of the posterior means)
    pipe = SDXSPipeline(**{**tiny_pipe.components, "vae": vae}, text_recipe=dict(tiny_pipe.config.text_recipe))
    vae.register_to_config(latents_mean=raw.mean((0, 2, 3)).tolist(), latents_std=raw.std((0, 2, 3)).tolist())
    with torch.no_grad():
        latents = pipe._vae_encode(pixels)  # what the UNet learns and produces: zero mean, unit std per channel
        right = pipe._vae_decode(latents)
        wrong = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)  # statistics ignored
        torch.testing.assert_close(right, vae.decode(raw).sample.clamp(-1, 1))
    assert latents.mean((0, 2, 3)).abs().max() < 1e-4
    colour_shift = (right.mean((0, 2, 3)) - wrong.mean((0, 2, 3))).abs()  # per RGB channel, on the [-1, 1] scale
    assert colour_shift.max().item() > 0.2, colour_shift  # measured: 0.01 / 0.43 / 0.68 (green and blue washed in)
    assert (right - wrong).abs().mean().item() > 0.1


def test_without_statistics_nothing_changes(tiny_pipe, root_model_dir):
    """No latents_mean/std: exactly `z * scaling_factor` / `z / scaling_factor` as before (the emoji model)."""
    assert "latents_mean" not in json.loads((root_model_dir / "vae" / "config.json").read_text())
    vae = tiny_pipe.vae
    pixels = tiny_pipe._image_to_tensor(_image())
    with torch.no_grad():
        latents = tiny_pipe._vae_encode(pixels)
        assert torch.equal(latents, vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor)
        assert torch.equal(
            tiny_pipe._vae_decode(latents), vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        )


def test_prepare_writes_normalised_latents_and_fingerprints_the_statistics(tiny_pipe, tmp_path):
    from sdxs.data.buckets import resize_and_crop
    from sdxs.data.fingerprint import fingerprint_vae
    from sdxs.data.prepare import prepare
    from sdxs.pipeline import load_rgb_image

    pipe = _with_stats(tiny_pipe)
    src = tmp_path / "src"
    src.mkdir()
    _image().save(src / "a.png")
    (src / "a.txt").write_text("a red apple")
    manifest = prepare(src, tmp_path / "out", pipe=pipe, batch_size=1, progress=False, min_side=32, max_side=64)
    assert manifest["vae"]["latents_mean"] == MEAN and manifest["vae"]["latents_std"] == STD
    with safe_open(str(tmp_path / "out" / manifest["shards"][0]["file"]), framework="pt") as f:
        mean, logvar = f.get_tensor("latents_mean").float(), f.get_tensor("latents_logvar").float()
    with torch.no_grad():
        half = resize_and_crop(load_rgb_image(src / "a.png"), (32, 32))  # the encoder sees the bucket at half size
        pixels = pipe._image_to_tensor(half)
        posterior = pipe.vae.encode(pixels).latent_dist
        ref = pipe._vae_encode(pixels)
    # stored in float16: two float32 computations of one value may round to neighbouring halves (one step is a
    # relative 2**-10), so the comparison allows one step and no more
    half_step = dict(rtol=2**-10, atol=1e-5)
    torch.testing.assert_close(mean, ref.half().float(), **half_step)  # the pipeline's (so the UNet's) latent space
    log_scale = 2 * torch.log(0.8 / torch.tensor(STD)).view(1, -1, 1, 1)  # z = a (x - m): logvar + 2 log a
    torch.testing.assert_close(logvar, (posterior.logvar + log_scale).half().float(), **half_step)
    assert math.isfinite(float(logvar.sum()))
    # a cache made with the statistics is not the cache of the same VAE without them
    assert fingerprint_vae(pipe.vae) != fingerprint_vae(tiny_pipe.vae)


def test_train_vae_writes_per_channel_statistics_and_export_keeps_them(tmp_path, tiny_hub_dir):
    from diffusers import AsymmetricAutoencoderKL, DiffusionPipeline

    from sdxs.train.config import VAETrainConfig, load_config
    from sdxs.train.vae import train_vae

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        _image().rotate(90 * i).save(images / f"{i}.png")
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        f"model.pretrained={tiny_hub_dir}",
        f"data.path={images}",
        "data.resolution=64",
        "data.batch_size=4",
        "run.max_steps=2",
        "run.checkpoint_every=0",
        "run.progress_bar=false",
        "run.export_at_end=true",
        "loss.stats_batches=1",
        "loss.latent_normalization=per_channel",
    ]
    final = train_vae(load_config(VAETrainConfig, None, overrides))
    vae = AsymmetricAutoencoderKL.from_pretrained(final / "vae")
    mean, std = latent_statistics(vae)
    assert len(mean) == len(std) == vae.config.latent_channels == 4 and vae.config.scaling_factor == 1.0
    assert all(s > 0 for s in std) and len(set(mean)) > 1
    # the exported model keeps them (export drops only config keys nothing reads) and its pipeline applies them
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "export", trust_remote_code=True)
    assert latent_statistics(pipe.vae) == (mean, std)
    with torch.no_grad():
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        z = pipe._vae_encode(pixels)
        torch.testing.assert_close(z, normalize_latents(pipe.vae.encode(pixels).latent_dist.mode(), pipe.vae))
    with pytest.raises(ValueError, match="latent_normalization"):
        train_vae(load_config(VAETrainConfig, None, [*overrides[:-1], "loss.latent_normalization=channel"]))
