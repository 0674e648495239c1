"""What an experienced diffusers user does with the pipeline (issue 17): save and reload with its code, from_pipe,
the input contracts of diffusers pipelines, callbacks, dtype on a plain load, scheduler swaps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

STEPS = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_pipe():
    """A private tiny pipeline for tests that change components or scheduler (the session one stays untouched)."""
    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    kw.setdefault("seed", 0)
    return pipe(**kw).images


# ---- 1. save_pretrained writes a reloadable repository -------------------------------------------------------------


def test_save_pretrained_reloads_with_plain_diffusers_to_identical_images(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from sdxs.pipeline import HUB_CLASS_NAME

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == HUB_CLASS_NAME == ["pipeline", "SDXSPipeline"]
    import sdxs.pipeline

    assert (tmp_path / "pipeline.py").read_bytes() == Path(sdxs.pipeline.__file__).read_bytes()
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "SDXSPipeline"
    np.testing.assert_array_equal(run(pipe, prompt="girl"), run(loaded, prompt="girl"))

    # a pipeline that came from the hub folder saves again (its dynamic module's own source) and reloads
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert (again / "pipeline.py").read_bytes() == (tmp_path / "pipeline.py").read_bytes()
    reloaded = DiffusionPipeline.from_pretrained(again, trust_remote_code=True)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(pipe, prompt="girl"), run(reloaded, prompt="girl"))


# ---- 2. from_pipe ----------------------------------------------------------------------------------------------------


def test_from_pipe_shares_components_and_takes_config_overrides(pipe):
    """`PipelineClass.from_pipe(pipe, **overrides)` (diffusers' way; for custom code `type(pipe).from_pipe`)."""
    from sdxs.pipeline import SDXSPipeline

    other = SDXSPipeline.from_pipe(pipe, default_width=32, default_height=48)
    assert type(other) is SDXSPipeline
    assert other.unet is pipe.unet and other.vae is pipe.vae and other.text_encoder is pipe.text_encoder
    assert other.vision_processor is pipe.vision_processor and other.scheduler.config == pipe.scheduler.config
    assert (other.config.default_width, other.config.default_height) == (32, 48)
    assert other.config.text_recipe == pipe.config.text_recipe
    other.set_progress_bar_config(disable=True)
    assert run(other, prompt="cat").shape == (1, 48, 32, 3)
    assert (pipe.config.default_width, pipe.config.default_height) == (64, 64)  # the source is unchanged


def test_from_pipe_without_the_optional_vision_processor(pipe):
    from sdxs.pipeline import SDXSPipeline

    other = SDXSPipeline.from_pipe(pipe, vision_processor=None)
    assert other.vision_processor is None
    other.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(other, prompt="cat"), run(pipe, prompt="cat"))


# ---- 3. input contracts --------------------------------------------------------------------------------------------


def test_tensor_image_is_0_1_like_diffusers_and_minus1_1_warns(pipe):
    pt = pipe("cat", num_inference_steps=STEPS, seed=1, output_type="pt").images  # (1, 3, H, W) in [0, 1]
    assert pt.min() >= 0 and pt.max() <= 1
    pil = pipe.image_processor.postprocess(pt * 2 - 1, output_type="pil")
    kw = dict(prompt="cat", strength=0.3, num_inference_steps=4, seed=0)
    from_pil = run(pipe, image=pil[0], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_pt = run(pipe, image=pt, **kw)
    assert not [w for w in caught if "[-1, 1]" in str(w.message)]  # [0, 1] is the contract: no deprecation
    np.testing.assert_allclose(from_pt, from_pil, atol=0.02)  # only the PIL 8-bit rounding differs
    with pytest.warns(FutureWarning, match=r"\[-1, 1\] is deprecated"):
        from_old = run(pipe, image=pt * 2 - 1, **kw)
    np.testing.assert_allclose(from_old, from_pt, atol=1e-5)
    assert run(pipe, prompt="cat", image=pt[0], strength=0.5).shape == (1, 64, 64, 3)  # (3, H, W) too


def test_prompt_embeds_without_mask_is_an_error_naming_the_fix(pipe):
    emb, mask, neg, neg_mask = pipe.encode_prompt("cat", negative_prompt="bad")
    with pytest.raises(ValueError, match="Must provide `prompt_attention_mask`"):
        pipe(prompt_embeds=emb, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="Must provide `negative_prompt_attention_mask`"):
        pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg, num_inference_steps=STEPS)
    with_mask = run(pipe, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt="bad")
    np.testing.assert_allclose(with_mask, run(pipe, prompt="cat", negative_prompt="bad"), atol=1e-5)


def test_strength_without_image_is_an_error(pipe):
    with pytest.raises(ValueError, match="`strength`=0.5 was given without `image`"):
        pipe("cat", strength=0.5, num_inference_steps=STEPS)


def test_sd_cfg_cutoff_callback_uses_the_returned_prompt_embeds(pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    steps = 4
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))
    try:
        cut = run(
            pipe,
            prompt="cat",
            guidance_scale=5.0,
            num_inference_steps=steps,
            callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1),
        )
    finally:
        hook.remove()
    assert batch_sizes == [2, 2, 1, 1]  # CFG for steps 0-1, then the conditional rows alone
    full = run(pipe, prompt="cat", guidance_scale=5.0, num_inference_steps=steps)
    assert np.abs(cut - full).max() > 1e-4


def test_callback_gets_and_replaces_every_tensor_input(pipe):
    names = list(pipe._callback_tensor_inputs)
    assert set(names) >= {"latents", "prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask"}
    emb, mask, neg, neg_mask = pipe.encode_prompt("dog", negative_prompt="")
    seen = {}

    def swap_to(embeds, m):
        def callback(p, i, t, kw):
            seen.update({k: tuple(v.shape) for k, v in kw.items()})
            return {"prompt_embeds": embeds, "prompt_attention_mask": m} if i == 0 else {}

        return callback

    kw = dict(prompt="cat", num_inference_steps=3, callback_on_step_end_tensor_inputs=names)
    cat = run(pipe, prompt="cat", num_inference_steps=3)
    cat_emb, cat_mask, cat_neg, cat_neg_mask = pipe.encode_prompt("cat", negative_prompt="")
    same = run(pipe, callback_on_step_end=swap_to(torch.cat([cat_neg, cat_emb]), None), **kw)  # mask kept
    assert set(seen) == set(names) and seen["prompt_embeds"][0] == 2 and seen["prompt_attention_mask"][0] == 2
    np.testing.assert_allclose(same, cat, atol=1e-6)
    dog = run(pipe, callback_on_step_end=swap_to(torch.cat([neg, emb]), torch.cat([neg_mask, mask])), **kw)
    assert np.abs(dog - cat).max() > 1e-4  # the returned conditioning is used for the later steps
    with pytest.raises(ValueError, match="return `prompt_attention_mask` too"):
        run(pipe, callback_on_step_end=swap_to(torch.zeros(2, 3, emb.shape[-1]), None), **kw)


def test_generator_accepted_by_image_upscale_and_refine_prompts(pipe):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mode = np.asarray(pipe.image_upscale(img)[0])
    a = pipe.image_upscale(img, generator=torch.Generator().manual_seed(0), output_type="np")[0]
    b = pipe.image_upscale(img, generator=torch.Generator().manual_seed(0), output_type="np")[0]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and mode.shape == (32, 32, 3)
    assert pipe.image_upscale(img, output_type="pt")[0].shape == (3, 32, 32)
    r1 = pipe.refine_prompts("cat", max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    r2 = pipe.refine_prompts("cat", max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert r1 == r2 and isinstance(r1[0], str)
    with pytest.raises(ValueError, match="either `seed` or `generator`"):
        pipe.refine_prompts("cat", seed=1, generator=torch.Generator())


# ---- 5. dtype on a plain load, scheduler swaps -----------------------------------------------------------------------


def test_plain_load_has_one_dtype_float32_and_dtype_sets_all(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    from sdxs.model_folder import save_hub_layout

    save_hub_layout(pipe, tmp_path, dtype=torch.float16, verify=False)  # stored fp16, like the shipped model
    plain = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    half = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}


FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
SUPPORTED = [
    ("FlowMatchEulerDiscreteScheduler", {}),
    ("FlowMatchHeunDiscreteScheduler", {}),
    ("FlowMatchLCMScheduler", {}),
    ("DPMSolverMultistepScheduler", FLOW),
    ("DPMSolverSinglestepScheduler", FLOW),
    ("UniPCMultistepScheduler", FLOW),
]
REFUSED = [
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}),
    ("DPMSolverMultistepScheduler", {}),  # not configured for flow matching
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", FLOW),  # does not land on x0 with the true velocity
    ("SASolverScheduler", FLOW),
    ("FlowMapEulerDiscreteScheduler", {}),
    ("LTXEulerAncestralRFScheduler", {}),
    ("PiflowScheduler", {}),
    ("SCMScheduler", {}),
    ("EulerDiscreteScheduler", {}),
]


def swapped(pipe, name, kw):
    import diffusers

    from sdxs.pipeline import SDXSPipeline

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **kw)
    other = SDXSPipeline.from_pipe(pipe, scheduler=scheduler)
    other.set_progress_bar_config(disable=True)
    return other


@pytest.mark.parametrize("name,kw", SUPPORTED, ids=[n for n, _ in SUPPORTED])
def test_supported_scheduler_lands_on_x0_and_runs(pipe, name, kw):
    other = swapped(pipe, name, kw)
    other.check_scheduler()
    other._set_timesteps(8, "cpu")
    sched = other.scheduler
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in sched.timesteps:  # the true flow velocity at timestep 1000 * sigma: v = (x - x0) / sigma
        x = sched.step((x - x0) / (t / 1000), t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, atol=0.02, rtol=0)
    images = run(other, prompt="cat", num_inference_steps=3)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert run(other, prompt="cat", num_inference_steps=3, image=images[0], strength=0.5).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("name,kw", REFUSED, ids=[f"{n}-{'-'.join(kw) or 'default'}" for n, kw in REFUSED])
def test_other_schedulers_are_refused_naming_the_supported_ones(pipe, name, kw):
    other = swapped(pipe, name, kw)
    with pytest.raises(ValueError) as err:
        other("cat", num_inference_steps=STEPS)
    message = str(err.value)
    assert "use_dynamic_shifting" in message or (
        "FlowMatchEulerDiscreteScheduler" in message and "flow_prediction" in message
    )


# ---- 6. docs: Examples docstrings, model card ------------------------------------------------------------------------


def test_public_methods_have_examples_and_the_card_has_install_line_and_widget():
    from sdxs.pipeline import SDXSPipeline

    for name in ("__call__", "image_upscale", "refine_prompts", "encode_image", "save_pretrained"):
        doc = getattr(SDXSPipeline, name).__doc__ or ""
        assert "Examples:" in doc and ">>> " in doc, name
    card = (ROOT / "README.md").read_text()
    front = card.split("---")[1]
    assert "widget:" in front and "text: grinning face, 3d render" in front
    install = next(line for line in card.splitlines() if line.startswith("pip install"))
    for package in ("diffusers>=0.42.1", "transformers>=5.23,<5.24", "torch>=2.4", "peft>=0.20"):
        assert package in install, package
    first_code = card.split("```python")[1]
    assert "trust_remote_code=True" in first_code and "dtype=" in first_code and "torch_dtype" not in card


def test_text_encoder_only_load_computes_the_same_prompt_embeds(pipe, tmp_path):
    """diffusers allows loading without the UNet and VAE (prompt embeddings on one device, denoising on another)."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "model")
    text_only = DiffusionPipeline.from_pretrained(tmp_path / "model", unet=None, vae=None, trust_remote_code=True)
    assert text_only.unet is None and text_only.vae is None
    emb, mask, neg, neg_mask = text_only.encode_prompt("a cat", negative_prompt="dark")
    want = pipe.encode_prompt("a cat", negative_prompt="dark")
    for got, ref in zip((emb, mask, neg, neg_mask), want, strict=True):
        torch.testing.assert_close(got, ref)
    # ... and a UNet-only pipeline denoises them into the image a full pipeline makes
    denoise = DiffusionPipeline.from_pretrained(
        tmp_path / "model", text_encoder=None, tokenizer=None, trust_remote_code=True
    )
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np")
    out = denoise(
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        **kwargs,
    ).images
    np.testing.assert_allclose(out, pipe("a cat", negative_prompt="dark", **kwargs).images, atol=1e-5)


def test_encode_prompt_outputs_feed_back_by_name(pipe):
    """diffusers' `test_encode_prompt_works_in_isolation` reads encode_prompt's return statement and passes each
    output to `__call__` under that name: the names must be `__call__`'s argument names, in order."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(type(pipe).encode_prompt)))
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return)]
    assert len(returns) == 1 and isinstance(returns[0].value, ast.Tuple)
    names = [ast.unparse(e) for e in returns[0].value.elts]
    assert names == [
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    ]
    params = inspect.signature(type(pipe).__call__).parameters
    assert all(n in params for n in names)
    outputs = dict(zip(names, pipe.encode_prompt("a cat", negative_prompt="dark"), strict=True))
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np")
    np.testing.assert_allclose(
        pipe(**outputs, **kwargs).images, pipe("a cat", negative_prompt="dark", **kwargs).images, atol=1e-5
    )


def test_img2img_takes_numpy_batches_and_one_image_per_prompt(pipe):
    """As diffusers' img2img pipelines: a float numpy batch (N, H, W, 3) in [0, 1] is the tensor path (no 8-bit
    rounding), and one image per prompt serves all of that prompt's images."""
    rng = np.random.default_rng(0)
    arr = rng.random((2, 32, 32, 3)).astype(np.float32)
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np", strength=0.5)
    from_np = pipe(["a", "b"], image=arr, **kwargs).images
    from_pt = pipe(["a", "b"], image=torch.from_numpy(arr).permute(0, 3, 1, 2), **kwargs).images
    np.testing.assert_allclose(from_np, from_pt, atol=1e-5)  # 8-bit rounding would move pixels by ~4e-3
    out = pipe(["a", "b"], image=torch.from_numpy(arr).permute(0, 3, 1, 2), num_images_per_prompt=2, **kwargs).images
    assert out.shape[0] == 4
    # image i of the batch uses seed + i and starts from its prompt's image: image 2 is prompt "b"'s first
    np.testing.assert_allclose(out[0], from_pt[0], atol=1e-5)
    kwargs_b = {**kwargs, "seed": 2}
    np.testing.assert_allclose(
        out[2], pipe("b", image=torch.from_numpy(arr[1:]).permute(0, 3, 1, 2), **kwargs_b).images[0], atol=1e-5
    )
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a", "b"], image=[arr[0]] * 3, **kwargs)


def test_explicit_class_loads_its_own_saved_folder_without_remote_code(pipe, tmp_path):
    """`SDXSPipeline.from_pretrained(folder)` uses this class (no trust_remote_code needed); DiffusionPipeline with
    trust_remote_code=True still loads the folder's own pipeline.py, as on the hub."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "m")
    mine = type(pipe).from_pretrained(tmp_path / "m")
    assert type(mine) is type(pipe)
    hub = DiffusionPipeline.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert type(hub).__name__ == "SDXSPipeline" and type(hub) is not type(pipe)
    kwargs = dict(num_inference_steps=2, seed=0, output_type="np")
    np.testing.assert_allclose(mine("a cat", **kwargs).images, hub("a cat", **kwargs).images, atol=1e-6)
