"""`sdxs init`: a model folder from a preset, with trained components swapped in from runs, checkpoints, folders."""

from __future__ import annotations

import json

import pytest
import torch

from sdxs.cli import main
from sdxs.model_folder import assemble, resolve_component
from sdxs.train.common import read_weights


def _fake_checkpoint(run, name: str, model, tokenizer=None, ema=None) -> None:
    """A checkpoint folder as `fit` writes it (only what `sdxs init` reads)."""
    ckpt = run / "checkpoints" / "step-0000002"
    model.save_pretrained(ckpt / name, safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(ckpt / f"{name}_ema", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(ckpt / "tokenizer")
    (ckpt / "config.json").write_text(json.dumps({"ema": {"use_for_export": True}}))
    (ckpt / "state.json").write_text(json.dumps({"trainer": name, "step": 2, "final": True}))


def test_fresh_preset_folder_loads_with_plain_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    out = assemble(tmp_path / "model", preset="tiny", seed=3)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SDXSPipeline"] and (out / "pipeline.py").is_file()
    assert index["default_width"] == 64 and index["vision_processor"][0] is not None
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    sources = json.loads((out / "sdxs_export.json").read_text())["sources"]
    assert "random" in sources["unet"] and "random" in sources["vae"]


def test_swap_trained_text_encoder_vae_and_unet(tmp_path, tiny_pipe):
    from diffusers import AsymmetricAutoencoderKL

    from sdxs.presets import build_text_encoder, get_preset
    from sdxs.tokenizer import train_tokenizer

    # stage 1: a text encoder run with its own tokenizer (and EMA weights, which win)
    tokenizer = train_tokenizer(["a red apple", "a green frog", "a blue sky"], 300)
    torch.manual_seed(1)
    raw, ema = build_text_encoder(get_preset("tiny"), tokenizer), build_text_encoder(get_preset("tiny"), tokenizer)
    _fake_checkpoint(tmp_path / "te_run", "text_encoder", raw, tokenizer, ema=ema)
    assert resolve_component(tmp_path / "te_run", "text_encoder").name == "text_encoder_ema"
    # a run that has written its settings but no checkpoint yet: refused at once, not deep inside transformers
    (tmp_path / "early_run").mkdir()
    (tmp_path / "early_run" / "config.json").write_text(json.dumps({"run": {"output_dir": "early_run"}}))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights for text_encoder"):
        resolve_component(tmp_path / "early_run", "text_encoder")
    model = assemble(tmp_path / "model", preset="tiny", text_encoder=tmp_path / "te_run", verify=False)
    te = read_weights(model / "text_encoder")
    for name, value in ema.state_dict().items():
        if name in te:
            torch.testing.assert_close(te[name], value)
    assert (
        json.loads((model / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        == json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    )
    unet_before = read_weights(model / "unet")

    # stage 3: a trained VAE (its measured scaling factor travels with it) swapped into the same folder
    vae = AsymmetricAutoencoderKL(**get_preset("tiny").vae)
    vae.register_to_config(scaling_factor=0.37)
    vae.save_pretrained(tmp_path / "vae_folder")
    assemble(model, base=model, vae=tmp_path / "vae_folder", preset="tiny")
    assert json.loads((model / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.37)
    for name, value in read_weights(model / "unet").items():  # the rest is kept as it was
        torch.testing.assert_close(value, unet_before[name])
    for name, value in read_weights(model / "text_encoder").items():
        torch.testing.assert_close(value, te[name])

    # a UNet from a model folder must fit the text encoder's width
    assemble(tmp_path / "ok", base=model, unet=model, preset="tiny", verify=False)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        assemble(tmp_path / "bad", preset="tiny", base=model, unet=_other_width_unet(tmp_path), verify=False)


def _other_width_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    from sdxs.presets import get_preset

    config = dict(get_preset("tiny").unet, cross_attention_dim=48)
    UNet2DConditionModel(**config).save_pretrained(tmp_path / "unet48")
    return tmp_path / "unet48"


def test_cli_init_and_errors(tmp_path, capsys):
    assert main(["init", str(tmp_path / "m"), "--preset", "tiny", "--no-verify", "--dtype", "fp16"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert next(iter(read_weights(tmp_path / "m" / "unet").values())).dtype == torch.float16
    assert main(["init", str(tmp_path / "x"), "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "x"), "--preset", "tiny", "--vae", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert main(["init", str(tmp_path / "x"), "--preset", "tiny", "--unet", str(tmp_path / "empty_run")]) == 2
    assert "without a complete checkpoint" in capsys.readouterr().err


def test_shift_sets_the_scheduler_of_a_based_folder(tmp_path, tiny_hub_dir):
    out = assemble(tmp_path / "model", base=tiny_hub_dir, shift=1.0, verify=False)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0
    base_unet = read_weights(tiny_hub_dir / "unet")
    assert all(torch.equal(base_unet[k], v) for k, v in read_weights(out / "unet").items())  # only the shift changed
    with pytest.raises(ValueError, match="--shift"):
        assemble(tmp_path / "bad", base=tiny_hub_dir, shift=0.0, verify=False)


def test_default_steps_is_the_models_own_and_is_kept_by_later_inits(tmp_path, tiny_hub_dir):
    """`sdxs init --default-steps N` writes the step count `__call__` takes when none is given; a folder built on it
    keeps it."""
    from sdxs.model_folder import load_local_pipeline

    assert main(["init", str(tmp_path / "m"), "--base", str(tiny_hub_dir), "--default-steps", "3", "--no-verify"]) == 0
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["default_num_inference_steps"] == 3
    pipe = load_local_pipeline(tmp_path / "m", dtype=torch.float32)
    seen = []
    pipe("a cat", seed=0, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert len(seen) == 3
    again = assemble(tmp_path / "again", base=tmp_path / "m", verify=False)
    assert json.loads((again / "model_index.json").read_text())["default_num_inference_steps"] == 3
    assert main(["init", str(tmp_path / "x"), "--base", str(tiny_hub_dir), "--default-steps", "0"]) == 2
