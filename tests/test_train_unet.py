"""UNet training: the flow-matching convention against the pipeline, and an end-to-end overfit on four colours."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_UNET_CONFIG

from sdxs.pipeline import flow_sigmas, shift_sigmas, sigma_to_timestep
from sdxs.train.config import FlowConfig, UNetTrainConfig, load_config
from sdxs.train.unet import drop_captions, flow_matching_pair, sample_sigmas

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def test_one_euler_step_with_true_velocity_recovers_x0(tiny_pipe):
    """Training's (x_s, target) is exactly what the pipeline's scheduler undoes: x0 = x_s + (0 - s) * v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    sched.set_timesteps(sigmas=flow_sigmas(1))  # one step: sigma 1 (shifted stays 1) -> 0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    s = sched.sigmas[0].expand(2)
    noisy, target = flow_matching_pair(x0, noise, s)
    out = sched.step(target, sched.timesteps[0], noisy, return_dict=False)[0]
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)

    # any level: the scheduler's sigmas for N steps are shift_sigmas(flow_sigmas(N)), timesteps sigma * 1000
    sched.set_timesteps(sigmas=flow_sigmas(8))
    shift = tiny_pipe.scheduler.config.shift
    expect = shift_sigmas(torch.from_numpy(flow_sigmas(8)), shift)
    torch.testing.assert_close(sched.sigmas[:-1], expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.timesteps, sigma_to_timestep(expect), rtol=0, atol=1e-3)
    # an Euler step from any of those levels with the true velocity lands exactly on the next level's x
    i = 3
    noisy, v = flow_matching_pair(x0, noise, sched.sigmas[i].expand(2))
    sched._step_index = i
    nxt = sched.step(v, sched.timesteps[i], noisy, return_dict=False)[0]
    torch.testing.assert_close(nxt, flow_matching_pair(x0, noise, sched.sigmas[i + 1].expand(2))[0], atol=1e-5, rtol=0)


def test_sigma_sampling_is_shifted_like_the_scheduler():
    g = torch.Generator().manual_seed(0)
    flow = FlowConfig(timestep_sampling="uniform")
    s = sample_sigmas(20000, flow, 3.0, g, "cpu")
    assert s.min() > 0 and s.max() < 1
    # P(shift(u) <= shift(0.5)) = 0.5 for uniform u: the median moves to shift_sigmas(0.5) = 0.75
    assert abs(float(s.median()) - shift_sigmas(0.5, 3.0)) < 0.01
    ln = sample_sigmas(20000, FlowConfig(timestep_sampling="logit_normal"), 1.0, g, "cpu")
    assert abs(float(ln.median()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas(2, FlowConfig(timestep_sampling="beta"), 1.0, g, "cpu")


def test_caption_dropout_uses_the_empty_embedding():
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.ones(1000, 5, 3), torch.ones(1000, 5, dtype=torch.long)
    empty, empty_mask = torch.zeros(1, 9, 3), torch.zeros(1, 9, dtype=torch.long)
    empty[0, :2], empty_mask[0, :2] = -1, 1  # two real slots, the rest padding
    e, m = drop_captions(embeds, mask, empty, empty_mask, 0.1, g)
    dropped = (e[:, 0, 0] == -1).float().mean()
    assert 0.07 < float(dropped) < 0.13
    assert e.shape == (1000, 5, 3) and m.shape == (1000, 5)
    assert torch.equal(m[e[:, 0, 0] == -1][0], torch.tensor([1, 1, 0, 0, 0]))


def make_colour_cache(tmp_path, hub_dir, size: int = 64):
    """Four solid-colour images captioned with their colour names, prepared with `hub_dir`'s VAE and text encoder."""
    from sdxs.data.prepare import prepare

    images = tmp_path / "colours"
    images.mkdir()
    for name, rgb in COLOURS.items():
        PIL.Image.new("RGB", (size, size), rgb).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(name)
    prepare(images, tmp_path / "cache", model=hub_dir, progress=False, num_workers=0)
    return tmp_path / "cache"


@pytest.mark.slow
def test_overfit_four_colours(tmp_path, root_model_dir):
    """prepare -> train a fresh UNet -> generating "red", "green", "blue", "yellow" gives images of those colours.

    The frozen parts are the shipped model's trained VAE and text encoder (a random VAE decodes every flat colour
    to the same grey, so only a trained one can show the colour); the UNet is the tiny preset, from scratch.
    """
    from conftest import copy_model_folder

    from sdxs.data.loader import LatentShardLoader
    from sdxs.train.unet import train_unet

    hub = copy_model_folder(root_model_dir, tmp_path / "hub")
    pipe = _pipeline_with(hub, None)
    size = int(pipe.config.default_width)
    cache = make_colour_cache(tmp_path, hub, size=size)
    cfg = load_config(
        UNetTrainConfig,
        TINY_UNET_CONFIG,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"model.pretrained={hub}",
            f"data.path={cache}",
            "run.progress_bar=false",
            "run.export_at_end=false",
            "run.checkpoint_every=0",
            "sample.prompts=[]",
        ],
    )
    final = train_unet(cfg)
    pipe = _pipeline_with(hub, final / "unet")
    batch = next(iter(LatentShardLoader(cache, 4, shuffle=False, sample_posterior=False)))
    names = batch["captions"]
    out = pipe(names, num_inference_steps=20, guidance_scale=1.0, seed=0, output_type="latent").images
    latent_dist = torch.cdist(out.flatten(1), batch["latents"].flatten(1))  # (generated, data)
    assert latent_dist.argmin(1).tolist() == [0, 1, 2, 3], latent_dist
    with torch.no_grad():
        images = pipe.image_processor.postprocess(pipe._vae_decode(out), output_type="np")  # (4, H, W, 3) in [0, 1]
    assert images.shape == (4, size, size, 3)
    palette = {n: np.array(rgb) / 255.0 for n, rgb in COLOURS.items()}
    for name, image in zip(names, images, strict=True):
        mean = image.reshape(-1, 3).mean(0)
        dist = {n: float(np.linalg.norm(mean - rgb)) for n, rgb in palette.items()}
        assert min(dist, key=dist.get) == name, (name, mean.round(3), dist)


def _pipeline_with(hub_dir, unet_folder):
    """The hub folder's pipeline with the UNet from `unet_folder` (None: no UNet, e.g. to read the config)."""
    from diffusers import UNet2DConditionModel

    from sdxs.train.unet import load_base_pipeline

    pipe = load_base_pipeline(str(hub_dir))
    if unet_folder is not None:
        pipe.register_modules(unet=UNet2DConditionModel.from_pretrained(unet_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_rewritten_captions_are_encoded_on_the_fly(tmp_path, tiny_hub_dir):
    """With `[captions]` on, each batch's prompts (the caption or its rewrite) go through the frozen text encoder in
    the loop: the UNet sees exactly encode_text of those prompts, and the run trains and resumes as usual."""
    from sdxs.data.loader import pad_text
    from sdxs.pipeline import encode_text
    from sdxs.train.unet import load_base_pipeline, text_encoder_fn, unet_task

    cache = make_colour_cache(tmp_path, tiny_hub_dir)
    cfg = load_config(
        UNetTrainConfig,
        TINY_UNET_CONFIG,
        [
            f"model.pretrained={tiny_hub_dir}",
            f"data.path={cache}",
            "captions.probability=1.0",
            "captions.template=1.0",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    base = load_base_pipeline(str(tiny_hub_dir))
    from accelerate import Accelerator

    task = unet_task(cfg, base, base.unet, Accelerator(cpu=True))
    batch = next(task.data)
    assert batch["prompts"] != batch["captions"]  # every caption rewritten (a template each time)
    embeds, mask = text_encoder_fn(base, "cpu")(batch["prompts"])
    ref, ref_mask = encode_text(base.text_encoder, base.tokenizer, batch["prompts"], base.config.text_recipe)
    ref, ref_mask = pad_text(ref, ref_mask, embeds.shape[1])
    torch.testing.assert_close(embeds, ref)
    assert torch.equal(mask, ref_mask)
    assert not any(p.requires_grad for p in base.text_encoder.parameters())  # frozen
    loss, _ = task.loss_fn(base.unet, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
