"""SDXSPipeline invariants, as diffusers' pipeline tests check them (tiny model, CPU, 2 steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

STEPS = 2


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    return pipe(**kw).images


def test_output_size_exactly_as_asked(pipe):
    for w, h in [(64, 64), (32, 80), (96, 48)]:
        img = pipe("a red apple", width=w, height=h, num_inference_steps=STEPS, seed=0).images[0]
        assert img.size == (w, h)


def test_default_size_from_model_config(pipe):
    img = pipe("a red apple", num_inference_steps=STEPS, seed=0).images[0]
    assert img.size == (pipe.config.default_width, pipe.config.default_height)


def test_same_seed_same_image_other_seed_differs(pipe):
    a = run(pipe, prompt="girl, blue hair", seed=3)
    b = run(pipe, prompt="girl, blue hair", seed=3)
    c = run(pipe, prompt="girl, blue hair", seed=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_generator_equals_seed(pipe):
    a = run(pipe, prompt="cat", seed=7)
    b = run(pipe, prompt="cat", generator=[torch.Generator().manual_seed(7)])
    np.testing.assert_array_equal(a, b)


def test_dict_and_tuple_outputs_equal(pipe):
    d = pipe("cat", num_inference_steps=STEPS, seed=1, output_type="np")
    t = pipe("cat", num_inference_steps=STEPS, seed=1, output_type="np", return_dict=False)
    assert isinstance(t, tuple)
    np.testing.assert_array_equal(d.images, t[0])


def test_batch_of_two_equals_two_single_calls(pipe):
    batch = run(pipe, prompt=["a red apple", "girl, smiling"], negative_prompt=["low quality", ""], seed=10)
    one = run(pipe, prompt="a red apple", negative_prompt="low quality", seed=10)
    two = run(pipe, prompt="girl, smiling", negative_prompt="", seed=11)  # image i uses seed + i
    np.testing.assert_allclose(batch[0], one[0], atol=1e-4)
    np.testing.assert_allclose(batch[1], two[0], atol=1e-4)


def test_num_images_per_prompt(pipe):
    assert run(pipe, prompt=["a", "b"], num_images_per_prompt=2, seed=0).shape[0] == 4
    imgs = run(pipe, prompt="a", num_images_per_prompt=2, seed=5)
    assert np.abs(imgs[0] - imgs[1]).max() > 1e-3  # different seeds per image


def test_deprecated_batch_size_warns_and_equals_num_images_per_prompt(pipe):
    """`batch_size` duplicated `num_images_per_prompt`: it still works, with a FutureWarning naming the fix."""
    with pytest.warns(FutureWarning, match="num_images_per_prompt"):
        old = run(pipe, prompt="a", batch_size=3, seed=5)
    np.testing.assert_array_equal(old, run(pipe, prompt="a", num_images_per_prompt=3, seed=5))
    with pytest.warns(FutureWarning):  # as many prompts as `batch_size`: nothing to repeat
        assert run(pipe, prompt=["a", "b"], batch_size=2, seed=0).shape[0] == 2
    with pytest.raises(ValueError, match="batch_size"):  # checked before any work
        run(pipe, prompt=["a", "b"], batch_size=3, seed=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['num_images'\\]"):
        run(pipe, prompt="a", num_images=2)


def test_guidance_one_makes_one_unet_call_per_step(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        run(pipe, prompt="cat", guidance_scale=1.0, seed=0, num_inference_steps=3)
        assert calls == [1, 1, 1]
        calls.clear()
        run(pipe, prompt="cat", guidance_scale=5.0, seed=0, num_inference_steps=3)
        assert calls == [2, 2, 2]  # CFG as one batched forward
    finally:
        hook.remove()


def test_prompt_embeds_path_equals_prompt_path(pipe):
    emb, mask, neg, neg_mask = pipe.encode_prompt("a red apple", negative_prompt="low quality")
    a = run(pipe, prompt="a red apple", negative_prompt="low quality", seed=2)
    b = run(
        pipe,
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        seed=2,
    )
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_callback_can_change_latents(pipe):
    seen = []

    def zero_latents(p, i, t, kw):
        seen.append((i, sorted(kw)))
        return {"latents": torch.zeros_like(kw["latents"])}

    a = run(pipe, prompt="cat", seed=0, callback_on_step_end=zero_latents, num_inference_steps=3)
    b = run(pipe, prompt="cat", seed=0, num_inference_steps=3)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == ["latents"]
    assert np.abs(a - b).max() > 1e-3
    # the latents the callback returned really were used: the final latents are zeros -> decode of zeros
    zeros = pipe(prompt="cat", seed=0, callback_on_step_end=zero_latents, num_inference_steps=3, output_type="latent")
    assert torch.count_nonzero(zeros.images) == 0


def test_interrupt_skips_remaining_steps(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: calls.append(1))

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    try:
        run(pipe, prompt="cat", seed=0, num_inference_steps=4, callback_on_step_end=stop)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_output_types(pipe):
    pil = pipe("cat", num_inference_steps=STEPS, seed=0).images
    assert isinstance(pil[0], Image.Image)
    pt = pipe("cat", num_inference_steps=STEPS, seed=0, output_type="pt").images
    assert pt.shape == (1, 3, 64, 64) and pt.min() >= 0 and pt.max() <= 1
    lat = pipe("cat", num_inference_steps=STEPS, seed=0, output_type="latent").images
    assert lat.shape == (1, pipe.unet.config.in_channels, 64 // 16, 64 // 16)


def test_img2img_strength_zero_returns_input_and_one_ignores_it(pipe):
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    recon = run(pipe, prompt="cat", image=src, strength=0.0, seed=0, num_inference_steps=4)
    with torch.no_grad():
        half_size = torch.nn.functional.interpolate(pipe._image_to_tensor(src), scale_factor=0.5, mode="area")
        expected = pipe.image_processor.postprocess(pipe._vae_decode(pipe._vae_encode(half_size)), output_type="np")
    np.testing.assert_allclose(recon, expected, atol=1e-5)  # strength 0: the input through the VAE, no denoising
    other = Image.new("RGB", (64, 64), (10, 200, 30))
    full_a = run(pipe, prompt="cat", image=src, strength=1.0, seed=0, num_inference_steps=4)
    full_b = run(pipe, prompt="cat", image=other, strength=1.0, seed=0, num_inference_steps=4)
    txt2img = run(pipe, prompt="cat", seed=0, num_inference_steps=4)
    np.testing.assert_allclose(full_a, full_b, atol=1e-6)  # strength 1: the input is ignored
    np.testing.assert_allclose(full_a, txt2img, atol=1e-6)
    half = run(pipe, prompt="cat", image=src, strength=0.5, seed=0, num_inference_steps=4)
    assert np.abs(half - full_a).max() > 1e-3


def test_img2img_defaults_to_the_image_size(pipe):
    src = Image.new("RGB", (96, 48), (200, 30, 30))
    assert pipe("cat", image=src, strength=0.5, num_inference_steps=STEPS, seed=0).images[0].size == (96, 48)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"prompt": "a", "width": 70}, ValueError, r"`width` must be a positive multiple of 16.*\[64, 80\]"),
        ({"prompt": "a", "height": 0}, ValueError, r"`height`.*\[16\]"),
        ({"prompt": "a", "width": 64.0}, TypeError, "`width` must be an int"),
        ({"prompt": "a", "num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"prompt": "a", "guidance_scale": math.nan}, ValueError, "guidance_scale"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, ValueError, "negative_prompt"),
        ({"prompt": "a", "prompt_embeds": torch.zeros(1, 4, 32)}, ValueError, "either `prompt` or `prompt_embeds`"),
        ({}, ValueError, "Provide a `prompt`"),
        ({"prompt": "a", "output_type": "jpeg"}, ValueError, "output_type"),
        ({"prompt": 3}, TypeError, "prompt"),
        ({"prompt": []}, ValueError, "non-empty"),
        ({"prompt": "a", "strength": 1.5}, ValueError, "strength"),
        ({"prompt": "a", "seed": 1, "generator": torch.Generator()}, ValueError, "seed"),
        ({"prompt": "a", "prompt_embeds": None, "latents": torch.zeros(1, 4, 3, 3)}, ValueError, "latents"),
        ({"prompt_embeds": torch.zeros(1, 4, 7)}, ValueError, "prompt_embeds"),
        ({"prompt": "a", "callback_on_step_end_tensor_inputs": ["foo"]}, ValueError, "callback"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pipe(**{"num_inference_steps": 1, **kwargs})


def test_missing_or_non_image_files(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe("a", image=str(tmp_path / "nope.png"), num_inference_steps=1)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.image_upscale(str(bad))


def test_save_pretrained_roundtrip_gives_identical_images(pipe, tmp_path):
    from sdxs.pipeline import SDXSPipeline

    pipe.save_pretrained(tmp_path)  # a custom-code repository (pipeline.py + ["pipeline", "SDXSPipeline"]), like
    # every hub folder: diffusers loads the folder's pipeline.py, which needs trust_remote_code whatever class is called
    loaded = SDXSPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(pipe, prompt="cat", seed=9), run(loaded, prompt="cat", seed=9))
    assert loaded.config.text_recipe == pipe.config.text_recipe
