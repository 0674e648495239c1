"""Image prompts in UNet training: `prepare --image-embeds` stores encode_image embeddings, the loader yields them,
and `flow.image_prompt_fraction` conditions that share of samples on them instead of the caption."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from sdxs.train.unet import use_image_prompts


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory, tiny_hub_dir):
    from sdxs.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("image-prompts")
    images = tmp / "images"
    images.mkdir()
    for name, rgb in {"red": (255, 0, 0), "blue": (0, 0, 255)}.items():
        PIL.Image.new("RGB", (64, 64), rgb).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(name)
    manifest = prepare(images, tmp / "cache", model=tiny_hub_dir, progress=False, num_workers=0, image_embeds=True)
    assert manifest["options"]["image_embeds"] is True
    return images, tmp / "cache"


def test_loader_yields_the_pipelines_encode_image(image_cache, tiny_pipe):
    from sdxs.data.loader import LatentShardLoader

    images, cache = image_cache
    loader = LatentShardLoader(cache, batch_size=2, seed=0, sample_posterior=False)
    assert loader.has_image_embeds
    batch = next(iter(loader))
    assert batch["image_embeds"].shape == batch["embeds"].shape[:1] + batch["image_embeds"].shape[1:]
    for i, key in enumerate(batch["keys"]):
        expect, mask = tiny_pipe.encode_image(str(images / key))  # (1, 1+L, D): what a user's image prompt gives
        n = int(mask.sum())
        assert int(batch["image_mask"][i].sum()) == n
        torch.testing.assert_close(batch["image_embeds"][i, :n], expect[0, :n], atol=2e-3, rtol=2e-3)  # fp16 storage
    # trimmed to the longest real length, like the caption embeddings
    trimmed = next(iter(LatentShardLoader(cache, batch_size=2, seed=0, pad_to_max_length=False)))
    assert trimmed["image_mask"][:, -1].any() and trimmed["image_embeds"].shape[1] < loader.text_length


def test_use_image_prompts_swaps_that_share_of_samples():
    g = torch.Generator().manual_seed(0)
    embeds, mask = torch.ones(1000, 3, 2), torch.ones(1000, 3, dtype=torch.long)
    img, img_mask = torch.full((1000, 5, 2), 7.0), torch.tensor([[1, 1, 1, 1, 0]]).repeat(1000, 1)
    e, m = use_image_prompts(embeds, mask, img, img_mask, 0.2, g)
    used = e[:, 0, 0] == 7
    assert 0.16 < float(used.float().mean()) < 0.24
    assert e.shape == (1000, 5, 2) and torch.equal(m[~used][0], torch.tensor([1, 1, 1, 0, 0]))
    assert torch.equal(m[used][0], torch.tensor([1, 1, 1, 1, 0]))


def test_image_prompt_min_sigma_puts_image_prompts_at_high_noise():
    """`flow.image_prompt_min_sigma`: image-prompt samples get noise levels in [min, 1]; captions keep [0, 1]."""
    from types import SimpleNamespace

    from sdxs.train.config import FlowConfig
    from sdxs.train.unet import flow_matching_loss

    seen = {}

    def unet(x, t, encoder_hidden_states, encoder_attention_mask):
        seen["sigma"], seen["image"] = t / 1000, encoder_hidden_states[:, 0, 0] == 7
        return SimpleNamespace(sample=torch.zeros_like(x))

    b = 2000
    batch = {
        "latents": torch.zeros(b, 4, 2, 2),
        "embeds": torch.ones(b, 3, 2),
        "mask": torch.ones(b, 3, dtype=torch.long),
        "image_embeds": torch.full((b, 3, 2), 7.0),
        "image_mask": torch.ones(b, 3, dtype=torch.long),
    }
    empty = (torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.long))

    def run(min_sigma):
        flow = FlowConfig(
            timestep_sampling="uniform",
            caption_dropout=0.0,
            image_prompt_fraction=0.5,
            image_prompt_min_sigma=min_sigma,
        )
        flow_matching_loss(unet, batch, empty, flow, 1.0, torch.Generator().manual_seed(0))
        return seen["sigma"], seen["image"]

    plain, image = run(0.0)
    high, image_again = run(0.7)
    assert torch.equal(image, image_again) and 0.4 < float(image.float().mean()) < 0.6  # the same draws
    assert float(high[image].min()) >= 0.7 - 1e-6 and float(plain[image].min()) < 0.1
    torch.testing.assert_close(high[~image], plain[~image])  # captions keep their levels
    torch.testing.assert_close(high[image], 0.7 + 0.3 * plain[image])


def test_unet_trains_with_image_prompts_and_refuses_a_cache_without(image_cache, tiny_hub_dir, tmp_path):
    from sdxs.train.config import UNetTrainConfig, load_config
    from sdxs.train.unet import train_unet

    _, cache = image_cache
    common = [
        f"model.pretrained={tiny_hub_dir}",
        "model.unet_preset=tiny",
        "data.batch_size=2",
        "run.max_steps=2",
        "run.progress_bar=false",
        "run.export_at_end=false",
        "flow.image_prompt_fraction=0.5",
    ]
    cfg = load_config(UNetTrainConfig, None, [*common, f"data.path={cache}", f"run.output_dir={tmp_path / 'run'}"])
    assert (train_unet(cfg) / "unet" / "config.json").is_file()
    bad = [*common, f"data.path={cache}", f"run.output_dir={tmp_path / 'run3'}", "flow.image_prompt_min_sigma=1.0"]
    with pytest.raises(ValueError, match="image_prompt_min_sigma"):
        train_unet(load_config(UNetTrainConfig, None, bad))

    from test_train_unet import make_colour_cache

    plain = make_colour_cache(tmp_path, tiny_hub_dir)  # made without --image-embeds
    cfg = load_config(UNetTrainConfig, None, [*common, f"data.path={plain}", f"run.output_dir={tmp_path / 'run2'}"])
    with pytest.raises(ValueError, match="--image-embeds"):
        train_unet(cfg)
