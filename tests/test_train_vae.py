"""VAE training: the 16x decoder outputs exactly 2x the encoder's input, and a short run lowers the reconstruction loss."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from sdxs.train.config import VAETrainConfig, load_config


def make_images(folder, n=6, size=64):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth colour gradients with a bar: learnable in a few dozen steps, not trivially constant
        y, x = np.mgrid[0:size, 0:size] / size
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = c0 * (1 - x[..., None]) + c1 * y[..., None]
        img[:, (i * 7) % size : (i * 7) % size + 6] = 255 - c0
        PIL.Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@torch.no_grad()
def recon_l1(vae, pixels):
    small = F.interpolate(pixels, scale_factor=0.5, mode="area")
    z = vae.encode(small).latent_dist.mode()
    out = vae.decode(z).sample
    assert out.shape[-2:] == (2 * small.shape[-2], 2 * small.shape[-1])  # 16x decoder: exactly 2x the input
    return float((out - pixels).abs().mean())


def test_vae_training_lowers_reconstruction_loss(tmp_path, tiny_hub_dir):
    from diffusers import AsymmetricAutoencoderKL

    from sdxs.train.vae import ImageBatches, list_images, train_vae

    images = make_images(tmp_path / "images")
    cfg = load_config(
        VAETrainConfig,
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"model.pretrained={tiny_hub_dir}",
            f"data.path={images}",
            "data.resolution=64",
            "data.batch_size=4",
            "optim.lr=2e-3",
            "optim.warmup_steps=5",
            "optim.weight_decay=0",
            "run.max_steps=60",
            "run.checkpoint_every=0",
            "run.progress_bar=false",
            "loss.stats_batches=1",
            "run.export_at_end=true",
        ],
    )
    pixels = next(ImageBatches(list_images(str(images)), 64, 6, seed=123))["pixels"]  # (6, 3, 64, 64)
    before = recon_l1(AsymmetricAutoencoderKL.from_pretrained(tiny_hub_dir / "vae").eval(), pixels)
    final = train_vae(cfg)
    trained = AsymmetricAutoencoderKL.from_pretrained(final / "vae").eval()
    after = recon_l1(trained, pixels)
    assert after < 0.75 * before, (before, after)  # stated margin: >= 25% lower L1 after 60 steps (measured 39%)

    # latent statistics were measured and the scaling factor written into the VAE config
    stats = [
        r
        for r in (json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "scaling_factor" in r
    ]
    assert stats and len(stats[0]["latent_channel_std"]) == trained.config.latent_channels
    assert trained.config.scaling_factor == stats[0]["scaling_factor"] != 1.0
    # the export is the base pipeline with this VAE, loadable with plain diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "export", trust_remote_code=True)
    assert pipe.vae.config.scaling_factor == trained.config.scaling_factor
    assert pipe.image_upscale(PIL.Image.new("RGB", (32, 32), (200, 10, 10)))[0].size == (64, 64)


def test_decoder_only_finetune_keeps_the_latent_space(tmp_path, tiny_hub_dir):
    from diffusers import AsymmetricAutoencoderKL

    from sdxs.train.vae import train_vae

    images = make_images(tmp_path / "images", n=4)
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        f"model.pretrained={tiny_hub_dir}",
        "model.train_encoder=false",
        f"data.path={images}",
        "data.resolution=64",
        "data.batch_size=4",
        "optim.lr=2e-3",
        "run.max_steps=3",
        "run.checkpoint_every=0",
        "run.progress_bar=false",
        "loss.stats_batches=1",
    ]
    base = AsymmetricAutoencoderKL.from_pretrained(tiny_hub_dir / "vae")
    trained = AsymmetricAutoencoderKL.from_pretrained(train_vae(load_config(VAETrainConfig, None, overrides)) / "vae")
    before, after = base.state_dict(), trained.state_dict()
    for name in before:  # encoder frozen: latents, the UNet and a latent cache stay valid
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("decoder."))
    assert trained.config.scaling_factor == base.config.scaling_factor

    fresh = [*overrides[1:], "model.pretrained=", "model.vae_preset=tiny", f"run.output_dir={tmp_path / 'r2'}"]
    with pytest.raises(ValueError, match="train_encoder"):
        train_vae(load_config(VAETrainConfig, None, fresh))


def test_box_resample_matches_the_eval_reference(tmp_path):
    from sdxs.eval import load_image01
    from sdxs.train.vae import ImageBatches, list_images

    images = make_images(tmp_path / "images", n=2, size=64)
    files = list_images(str(images))
    box = next(ImageBatches(files, 32, 2, seed=0, resample="box"))["pixels"]  # (2, 3, 32, 32) in [-1, 1]
    for pixels in box:  # the batch order is shuffled: each crop is one file's box average, as the eval loads it
        refs = [torch.from_numpy(load_image01(f, 32)).permute(2, 0, 1) * 2 - 1 for f in files]
        assert min(float((pixels - ref).abs().max()) for ref in refs) < 1e-6
    lanczos = next(ImageBatches(files, 32, 2, seed=0))["pixels"]
    assert not torch.allclose(box, lanczos)  # same seed, same files; the default filter stays LANCZOS
    with pytest.raises(ValueError, match="data.resample"):
        ImageBatches(files, 32, 2, seed=0, resample="nearest-ish")


def test_vae_sample_weights_draw_images_in_proportion(tmp_path):
    """`data.sample_weights`: a style weighted 3x is drawn ~3x as often; a table naming no image is refused."""
    from collections import Counter

    from sdxs.train.vae import ImageBatches, image_weights, list_images

    images = make_images(tmp_path / "images", n=4, size=32)
    (tmp_path / "w.csv").write_text("file_name,weight\n0.png,3\n1.png,0\n")
    files = list_images(str(images))
    weights = image_weights(files, str(images), str(tmp_path / "w.csv"))
    assert weights == [3.0, 0.0, 1.0, 1.0]
    batches = ImageBatches(files, 32, 4, seed=0, weights=weights)
    drawn = Counter(i for _ in range(300) for i in next(batches.index))
    assert drawn[1] == 0  # weight 0: never drawn
    assert 2.4 < drawn[0] / drawn[2] < 3.7, drawn  # 3:1 within sampling noise over 1,200 draws
    state = batches.state_dict()  # resumable: the same draws after a restart at the same position
    again = ImageBatches(files, 32, 4, seed=0, weights=weights)
    again.load_state_dict(state)
    assert next(again.index) == next(batches.index)
    with pytest.raises(ValueError, match="sample_weights"):  # a resume with another table would draw otherwise
        ImageBatches(files, 32, 4, seed=0).load_state_dict(state)
    plain = ImageBatches(files, 32, 4, seed=0)  # ...unless replanned: the next epoch, drawn the new way
    plain.load_state_dict(state, replan=True)
    assert (plain.index.epoch, plain.index.position) == (state["epoch"] + 1, 0)
    with pytest.raises(ValueError, match="batch_size=4"):  # another batch size: the positions would differ
        ImageBatches(files, 32, 2, seed=0, weights=weights).load_state_dict(state)

    (tmp_path / "bad.csv").write_text("file_name,weight\nimages/0.png,2\n")
    with pytest.raises(ValueError, match="relative to `data.path`"):
        image_weights(files, str(images), str(tmp_path / "bad.csv"))
