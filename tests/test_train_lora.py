"""`sdxs train lora` (issue 17): UNet LoRA adapters trained on a latent cache with the shared loop; the file it
writes is diffusers' `pytorch_lora_weights.safetensors`, which `pipe.load_lora_weights` loads; resume is exact."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs peft (`pip install -e .[lora]`, also in the dev extra)")

from sdxs.model_folder import find_checkpoint  # noqa: E402
from sdxs.train.cli import main  # noqa: E402
from sdxs.train.metrics import read_metrics  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def colour_cache(tmp_path_factory, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    return make_colour_cache(tmp_path_factory.mktemp("cache"), tiny_hub_dir)


def train(run_dir, hub, cache, resume=False, **extra) -> int:
    values = {
        "run.output_dir": run_dir,
        "model.pretrained": hub,
        "data.path": cache,
        "run.max_steps": 30,
        "run.checkpoint_every": 0,
        "run.log_every": 1,
        "run.progress_bar": "false",
        "run.export_at_end": "true",
        "lora.rank": 4,
        "lora.alpha": 8,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "ema.enabled": "true",
        "ema.decay": 0.9,
        "data.batch_size": 4,
        "flow.caption_dropout": 0.0,
        "sample.prompts": "[]",
    }
    values.update(extra)
    args = ["train", "lora", *[f"{k}={v}" for k, v in values.items()]]
    return main(args + (["--resume", "latest"] if resume else []))


def images(pipe, **kw):
    return pipe(["red", "blue"], num_inference_steps=2, seed=0, output_type="np", **kw).images


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_hub_dir, colour_cache):
    run = tmp_path_factory.mktemp("lora-run")
    assert train(run, tiny_hub_dir, colour_cache) == 0
    return run


def fixed_noise_loss(unet, cache, shift) -> float:
    """The training loss on the whole (4-image) cache, averaged over 8 fixed draws of noise and noise level."""
    from sdxs.data.loader import LatentShardLoader
    from sdxs.train.config import FlowConfig
    from sdxs.train.unet import flow_matching_loss

    loader = LatentShardLoader(cache, 4, sample_posterior=False, pad_to_max_length=False)
    batch, empty = next(iter(loader)), loader.empty_prompt()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [
            flow_matching_loss(unet, batch, empty, FlowConfig(caption_dropout=0.0), shift, g)[0] for _ in range(8)
        ]
    return float(torch.stack(losses).mean())


def test_lora_training_writes_a_diffusers_lora_that_loads_and_moves_the_image(lora_run, tiny_hub_dir, colour_cache):
    from diffusers import DiffusionPipeline

    losses = [r["loss"] for r in read_metrics(lora_run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30 and all(np.isfinite(losses))

    # checkpoint: adapters only, raw and EMA, in diffusers' LoRA format with the peft config as metadata
    ckpt = find_checkpoint(lora_run)
    assert json.loads((ckpt / "state.json").read_text())["trainer"] == "unet_lora"
    raw, ema = load_file(ckpt / "unet_lora" / LORA_FILE), load_file(ckpt / "unet_lora_ema" / LORA_FILE)
    # one key format (peft's), the one `load_lora_weights` reads in full (tests/test_lora_export.py)
    assert raw and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in raw)
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    # B started at zero and moved, except in cross-attention's to_q / to_k where it may get no gradient at all: a
    # one-token caption makes the context the pooled vector and that same token's state (two equal keys), so the
    # softmax is uniform whatever q and k are (exactly, or up to rounding that Adam turns into full-size steps)
    still = [k for k, v in raw.items() if ".lora_B." in k and v.abs().max() == 0]
    assert all(".attn2.to_q." in k or ".attn2.to_k." in k for k in still), still
    assert len(still) < sum(".lora_B." in k for k in raw) // 4
    with safe_open(ckpt / "unet_lora" / LORA_FILE, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    # the export is the EMA file (ema.use_for_export)
    exported = load_file(lora_run / "export" / LORA_FILE)
    assert all(torch.equal(exported[k], ema[k]) for k in ema)

    # plain diffusers loads it; it changes the image; scale 0 gives the base image back
    pipe = DiffusionPipeline.from_pretrained(tiny_hub_dir, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    shift = pipe.scheduler.config.shift
    base_loss = fixed_noise_loss(pipe.unet, colour_cache, shift)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's partial-load RuntimeWarning included
        pipe.load_lora_weights(str(lora_run / "export"))
    assert pipe.unet.peft_config["default_0"].r == 4
    targets = ("to_q", "to_k", "to_v", "to_out.0")  # [lora] target_modules' default
    loaded = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert loaded == {n for n, _ in pipe.unet.named_modules() if n.endswith(targets)}
    # the adapters learnt the four colours: the same noise gives a clearly lower loss with them
    lora_loss = fixed_noise_loss(pipe.unet, colour_cache, shift)
    assert lora_loss < 0.9 * base_loss, (base_loss, lora_loss)
    with_lora = images(pipe)
    assert np.abs(with_lora - base).mean() > 1e-3
    np.testing.assert_allclose(images(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(images(pipe), base, atol=1e-6)


def test_export_of_a_lora_run_writes_the_chosen_weights(lora_run, tmp_path):
    from sdxs.model_folder import export_run

    out = export_run(lora_run, tmp_path / "raw", weights="raw")
    ckpt = find_checkpoint(lora_run)
    assert (out / LORA_FILE).read_bytes() == (ckpt / "unet_lora" / LORA_FILE).read_bytes()


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_hub_dir, colour_cache):
    common = {"run.export_at_end": "false", "lora.dropout": 0.1}  # dropout: the RNG must resume too
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, tiny_hub_dir, colour_cache, **{**common, "run.max_steps": 8}) == 0
    assert train(b, tiny_hub_dir, colour_cache, **{**common, "run.max_steps": 4}) == 0  # stops at step 4
    assert train(b, tiny_hub_dir, colour_cache, resume=True, **{**common, "run.max_steps": 8}) == 0
    fa, fb = find_checkpoint(a), find_checkpoint(b)
    assert fa.name == fb.name == "step-0000008"
    for folder in ("unet_lora", "unet_lora_ema"):
        wa, wb = load_file(fa / folder / LORA_FILE), load_file(fb / folder / LORA_FILE)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{folder}/{k}")
    la = [r["loss"] for r in read_metrics(a / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(b / "metrics.jsonl") if "loss" in r]
    np.testing.assert_allclose(lb, la, rtol=1e-5)


def test_resume_with_another_rank_is_refused(tmp_path, tiny_hub_dir, colour_cache, capsys):
    run = tmp_path / "r"
    assert train(run, tiny_hub_dir, colour_cache, **{"run.max_steps": 1, "run.export_at_end": "false"}) == 0
    args = {"run.max_steps": 2, "lora.rank": 2, "run.export_at_end": "false"}
    assert train(run, tiny_hub_dir, colour_cache, resume=True, **args) == 2
    assert "does not fit the UNet's adapters (were `lora.rank`" in capsys.readouterr().err


def test_unknown_target_module_is_a_clear_error(tiny_pipe):
    from sdxs.train.config import LoRAConfig
    from sdxs.train.lora import add_lora

    with pytest.raises(ValueError, match=r"`lora.target_modules` \['to_qq'\] match no module"):
        add_lora(tiny_pipe.unet, LoRAConfig(target_modules=["to_q", "to_qq"]), seed=0)
    with pytest.raises(ValueError, match="`lora.rank`"):
        add_lora(tiny_pipe.unet, LoRAConfig(rank=0), seed=0)


def test_the_emoji_lora_recipe_loads():
    from pathlib import Path

    from sdxs.train.config import LoRATrainConfig, load_config

    cfg = load_config(LoRATrainConfig, Path(__file__).resolve().parents[1] / "configs/emoji/lora-sepia.toml")
    assert cfg.model.pretrained == "." and cfg.lora.rank == 8 and "conv1" in cfg.lora.target_modules
    assert cfg.optim.lr == 2e-3 and cfg.optim.weight_decay == 0.01
