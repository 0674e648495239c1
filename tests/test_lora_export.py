"""A LoRA trained by `sdxs train lora` loads fully with plain diffusers (issue: the export mixed key formats).

The checkpoint and export files hold every adapter in one key format (peft's `lora_A` / `lora_B`); diffusers'
`load_lora_weights` reads the format from the first key, so the older mixed files (attention adapters renamed to
`lora.down` / `lora.up` by `convert_state_dict_to_diffusers`, the rest left as `lora_A` / `lora_B`) lost one group,
with only a peft RuntimeWarning. Here: every module that had an adapter in training has one after loading (warnings
are errors), and the loaded pipeline gives the trained model's outputs; `sdxs export` rewrites an old mixed file.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs peft (`pip install -e .[lora]`, also in the dev extra)")

from sdxs.model_folder import LORA_FILE, find_checkpoint  # noqa: E402
from sdxs.model_folder.write import adapted_modules, export_lora  # noqa: E402
from sdxs.train.cli import main  # noqa: E402

# the sepia recipe's targets (configs/emoji/lora-sepia.toml): attention and, beside it, projections and convolutions
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def colour_cache(tmp_path_factory, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    return make_colour_cache(tmp_path_factory.mktemp("cache"), tiny_hub_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_hub_dir, colour_cache):
    """A 3-step LoRA run with the sepia targets, and the trained UNets (raw and EMA) as the trainer last saved them."""
    import sdxs.train.lora as lora_mod

    saved = {}
    save_lora = lora_mod.save_lora

    def recording_save_lora(unet, folder):
        saved[folder.name] = copy.deepcopy(unet).eval()  # the final checkpoint's call is the last one per folder
        save_lora(unet, folder)

    run = tmp_path_factory.mktemp("lora-run")
    values = {
        "run.output_dir": run,
        "model.pretrained": tiny_hub_dir,
        "data.path": colour_cache,
        "run.max_steps": 3,
        "run.checkpoint_every": 0,
        "run.progress_bar": "false",
        "run.export_at_end": "true",
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.target_modules": json.dumps(TARGETS),
        "optim.lr": 2e-2,
        "optim.warmup_steps": 0,
        "ema.enabled": "true",
        "ema.decay": 0.5,
        "data.batch_size": 4,
        "flow.caption_dropout": 0.0,
        "sample.prompts": "[]",
    }
    mp = pytest.MonkeyPatch()
    mp.setattr(lora_mod, "save_lora", recording_save_lora)
    try:
        assert main(["train", "lora", *[f"{k}={v}" for k, v in values.items()]]) == 0
    finally:
        mp.undo()
    assert set(saved) == {"unet_lora", "unet_lora_ema"}
    return run, saved


def load_pipe(hub):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(hub, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_lora_strictly(pipe, folder):
    """`pipe.load_lora_weights(folder)` with every warning (peft's partial-load RuntimeWarning included) an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(str(folder))


def unet_out(unet, seed=0):
    """The UNet's prediction on fixed random inputs shaped like the tiny model's (latents, text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300.0, 700.0]), encoder_hidden_states=ctx).sample


def images(pipe):
    return pipe(["red", "blue"], num_inference_steps=2, seed=0, output_type="np").images


def test_the_files_hold_one_key_format(trained):
    run, _ = trained
    ckpt = find_checkpoint(run)
    for path in (ckpt / "unet_lora" / LORA_FILE, ckpt / "unet_lora_ema" / LORA_FILE, run / "export" / LORA_FILE):
        keys = list(load_file(path))
        assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys), path
        assert any(k.split(".lora_")[0].endswith(ATTENTION) for k in keys)  # attention is among them
        assert any(".conv1." in k for k in keys)


def test_exported_lora_loads_every_trained_adapter_and_gives_the_trained_outputs(trained, tiny_hub_dir):
    run, saved = trained
    model = saved["unet_lora_ema"]  # the export is the EMA file (ema.use_for_export)
    expected = adapted_modules(model)
    assert len(expected) > 50 and any(n.endswith("attn1.to_k") for n in expected)

    pipe = load_pipe(tiny_hub_dir)
    base_out, base_images = unet_out(pipe.unet), images(pipe)
    load_lora_strictly(pipe, run / "export")
    assert adapted_modules(pipe.unet) == expected  # every trained adapter, attention and the rest, nothing else
    with_lora = unet_out(pipe.unet)
    assert (with_lora - base_out).abs().max() > 1e-4  # the adapters are not still at their zero start
    torch.testing.assert_close(with_lora, unet_out(model), rtol=1e-5, atol=1e-6)

    # the whole pipeline: the loaded LoRA gives the image the trained UNet gives
    reference = type(pipe).from_pipe(pipe, unet=model)
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(images(pipe), images(reference), atol=1e-5)
    assert np.abs(images(pipe) - base_images).max() > 0

    # the raw file too (`sdxs export --weights raw` copies it)
    raw = load_pipe(tiny_hub_dir)
    load_lora_strictly(raw, find_checkpoint(run) / "unet_lora")
    assert adapted_modules(raw.unet) == adapted_modules(saved["unet_lora"]) == expected
    torch.testing.assert_close(unet_out(raw.unet), unet_out(saved["unet_lora"]), rtol=1e-5, atol=1e-6)


def mixed_checkpoint(run, tmp_path):
    """A copy of the run's final checkpoint whose EMA file is written the old way (convert_state_dict_to_diffusers:
    attention adapters as `lora.down/lora.up`, the others as `lora_A/lora_B`)."""
    import shutil

    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    ckpt = shutil.copytree(find_checkpoint(run), tmp_path / "ckpt")
    path = ckpt / "unet_lora_ema" / LORA_FILE
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
    old = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(state).items()}
    assert sum(".lora.down." in k for k in old) and sum(".lora_A." in k for k in old)  # mixed
    save_file(old, str(path), metadata=metadata)
    return ckpt


def test_export_rewrites_an_old_mixed_file_in_one_format(trained, tiny_hub_dir, tmp_path):
    run, saved = trained
    ckpt = mixed_checkpoint(run, tmp_path)
    folder = ckpt / "unet_lora_ema"

    # the old file itself loads only partly: peft warns, and the attention modules get no adapter
    pipe = load_pipe(tiny_hub_dir)
    with pytest.warns(RuntimeWarning, match="inconsistency"):
        pipe.load_lora_weights(str(folder))
    partial = adapted_modules(pipe.unet)
    assert partial and not any(n.endswith(ATTENTION) for n in partial)

    out = export_lora(ckpt, folder, tmp_path / "export", str(tiny_hub_dir), verify=True)
    exported = load_file(out / LORA_FILE)
    assert all(".lora_A." in k or ".lora_B." in k for k in exported)
    ema = load_file(run / "export" / LORA_FILE)
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    with safe_open(str(out / LORA_FILE), "pt") as f, safe_open(str(folder / LORA_FILE), "pt") as g:
        assert f.metadata() == g.metadata()  # the adapter config (rank, alpha, targets) kept
    pipe = load_pipe(tiny_hub_dir)
    load_lora_strictly(pipe, out)
    assert adapted_modules(pipe.unet) == adapted_modules(saved["unet_lora_ema"])


def test_export_verify_refuses_a_partial_load(trained, tiny_hub_dir, tmp_path, monkeypatch):
    import sdxs.model_folder.write as write

    run, saved = trained
    ckpt = mixed_checkpoint(run, tmp_path)
    attention = sum(n.endswith(ATTENTION) for n in adapted_modules(saved["unet_lora_ema"]))
    monkeypatch.setattr(write, "lora_keys_to_peft", lambda state, path="": state)  # the old export: a plain copy
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=f"only partly: {attention} module"):
        export_lora(ckpt, ckpt / "unet_lora_ema", tmp_path / "export", str(tiny_hub_dir), verify=True)
