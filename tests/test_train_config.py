"""Training config: recipes + typed key=value overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxs.train.config import (
    LoRATrainConfig,
    OptimConfig,
    TextAlignTrainConfig,
    TextEncoderTrainConfig,
    UNetTrainConfig,
    VAETrainConfig,
    load_config,
    to_dict,
)
from sdxs.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]  # the recipes are found from any working directory
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.toml"))


def test_recipe_and_typed_overrides(tmp_path):
    cfg = load_config(
        UNetTrainConfig,
        ROOT / "configs/tiny/unet.toml",
        ["optim.lr=3e-4", "run.max_steps=7", "ema.enabled=true", 'sample.prompts=["a", "b"]', "run.output_dir=x"],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 7 and isinstance(cfg.run.max_steps, int)
    assert cfg.ema.enabled is True
    assert cfg.sample.prompts == ["a", "b"]
    assert cfg.run.output_dir == "x"
    assert cfg.model.unet_preset == "tiny"  # from the recipe
    assert cfg.flow.caption_dropout == 0.1  # untouched default
    # an int where a float is expected is accepted (and made a float); JSON recipes share the schema
    (tmp_path / "r.json").write_text(json.dumps({"optim": {"lr": 1}, "data": {"resolution": 64}}))
    vcfg = load_config(VAETrainConfig, tmp_path / "r.json")
    assert vcfg.optim.lr == 1.0 and isinstance(vcfg.optim.lr, float) and vcfg.data.resolution == 64
    assert json.loads(json.dumps(to_dict(cfg)))["optim"]["lr"] == 3e-4  # serialisable as saved in checkpoints


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("optim.lrr=1", ValueError, "unknown config key `optim.lrr`"),
        ("nope.lr=1", ValueError, "unknown config key"),
        ("optim=1", ValueError, "whole section"),
        ("run.max_steps=1.5", TypeError, "run.max_steps"),
        ("run.max_steps=ten", TypeError, "run.max_steps"),
        ("ema.enabled=maybe", TypeError, "boolean"),
        ("optim.lr", ValueError, "section.key=value"),
    ],
)
def test_bad_overrides(override, error, match):
    with pytest.raises(error, match=match):
        load_config(UNetTrainConfig, None, [override])


def test_unknown_key_in_recipe(tmp_path):
    (tmp_path / "r.toml").write_text("[optim]\nlr = 1e-3\nmomentum = 0.9\n")
    with pytest.raises(ValueError, match="optim.momentum"):
        load_config(UNetTrainConfig, tmp_path / "r.toml")
    (tmp_path / "s.toml").write_text("[optimiser]\nlr = 1e-3\n")
    with pytest.raises(ValueError, match="optimiser"):
        load_config(UNetTrainConfig, tmp_path / "s.toml")
    (tmp_path / "t.toml").write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(TypeError, match="optim.lr"):
        load_config(UNetTrainConfig, tmp_path / "t.toml")
    with pytest.raises(FileNotFoundError):
        load_config(UNetTrainConfig, tmp_path / "missing.toml")


def test_a_section_in_a_recipe_keeps_the_trainers_own_defaults(tmp_path):
    """Keys a recipe's section omits keep the trainer's default for them, not the bare dataclass default."""
    (tmp_path / "r.toml").write_text("[optim]\nwarmup_steps = 5\n")
    assert load_config(LoRATrainConfig, tmp_path / "r.toml").optim.weight_decay == 0.0  # OptimConfig(): 0.01
    te = load_config(TextEncoderTrainConfig, tmp_path / "r.toml").optim
    assert te.lr == 3e-4 and te.warmup_steps == 5  # OptimConfig(): lr 1e-4
    assert load_config(LoRATrainConfig, None, ["optim.warmup_steps=5"]).optim.weight_decay == 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(55, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(50, OptimConfig(warmup_steps=10), 100) == 1.0


def test_recipes_are_found():
    assert len(RECIPES) >= 8 and "configs/emoji/unet-v2.toml" in RECIPES


@pytest.mark.parametrize("path", RECIPES)
def test_shipped_recipes_load(path):
    kind = path.rsplit("/", 1)[-1].removesuffix(".toml").split("-")[0]  # vae-decoder.toml: a VAE recipe
    classes = {"unet": UNetTrainConfig, "vae": VAETrainConfig, "text_encoder": TextEncoderTrainConfig}
    cls = {**classes, "lora": LoRATrainConfig, "text": TextAlignTrainConfig}[kind]  # text-align.toml
    load_config(cls, ROOT / path)
