"""Export a pipeline to the hub layout and prove it loads with plain diffusers.

The hub layout is what `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` needs for a custom
pipeline: `model_index.json` whose `_class_name` is `["pipeline", "SDXSPipeline"]`, `pipeline.py` beside it (an
exact copy of `sdxs/pipeline.py`, the single source of truth), and one folder per component in safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

PIPELINE_SOURCE = Path(__file__).with_name("pipeline.py")
HUB_CLASS_NAME = ["pipeline", "SDXSPipeline"]
COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vision_processor")


def write_pipeline_file(folder: str | os.PathLike) -> Path:
    """Copy the pipeline source to `folder/pipeline.py` byte for byte (atomically)."""
    dst = Path(folder) / "pipeline.py"
    tmp = dst.with_suffix(".py.tmp")
    shutil.copyfile(PIPELINE_SOURCE, tmp)
    os.replace(tmp, dst)
    return dst


def set_hub_class_name(folder: str | os.PathLike) -> None:
    """diffusers' save_pretrained writes `"_class_name": "SDXSPipeline"`; the hub needs the custom-code form."""
    path = Path(folder) / "model_index.json"
    index = json.loads(path.read_text())
    index["_class_name"] = HUB_CLASS_NAME
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# Config keys a model class does not take but the pipeline reads from `component.config` (diffusers keeps unknown keys
# there on load): the VAE's per-channel latent statistics (`AsymmetricAutoencoderKL` has no such arguments).
KEPT_CONFIG_KEYS = ("latents_mean", "latents_std")


def drop_ignored_config_keys(folder: str | os.PathLike) -> list[str]:
    """Remove from each component's config.json the keys its diffusers model class would ignore on load.

    diffusers' `AsymmetricAutoencoderKL.__init__` registers `block_out_channels` and `force_upcast`, which it does not
    accept back, so every load of a saved VAE warns that they "are not expected and will be ignored". The class
    registers both again when it is built, so nothing is lost. Which keys are ignored is decided by diffusers' own
    `extract_init_dict`, the check that warns on load. `KEPT_CONFIG_KEYS` stay: the pipeline reads them (issue 19).
    Returns the removed keys as "folder.key".
    """
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    removed = []
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # extract_init_dict would print the very warning this removes
    try:
        for path in sorted(Path(folder).glob("*/config.json")):
            config = json.loads(path.read_text())
            cls = getattr(diffusers, str(config.get("_class_name")), None)
            if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
                continue
            _, unused, _ = cls.extract_init_dict(config)
            ignored = [k for k in unused if k in config and not k.startswith("_") and k not in KEPT_CONFIG_KEYS]
            if ignored:
                for key in ignored:
                    del config[key]
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                removed += [f"{path.parent.name}.{key}" for key in ignored]
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return removed


def save_hub_layout(
    pipe,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    card: str | None = None,
    extra_config: dict[str, Any] | None = None,
    verify: bool = True,
) -> Path:
    """Write `pipe` to `out_dir` in the hub layout; with `verify`, reload it with plain diffusers.

    Args:
        pipe: an `SDXSPipeline` (from `sdxs.pipeline` or loaded from a hub folder).
        out_dir: target folder. Existing component folders are replaced; other files (README, media) are kept.
        dtype: cast weights before saving (e.g. `torch.float16` for the shipped model); the pipeline is not changed.
        variant: save weights as `*.{variant}.safetensors` (diffusers variants, e.g. "fp16").
        card: model card text written to `README.md`.
        extra_config: JSON-serialisable facts (training config, steps) written to `sdxs_export.json`.
        verify: reload with `DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)` and check the class.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Save into a temp folder beside the target, then swap component folders in: a crash never leaves a half model.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        src = pipe
        if dtype is not None:
            src = _cast_copy(pipe, dtype)
        src.save_pretrained(tmp, safe_serialization=True, variant=variant)
        set_hub_class_name(tmp)
        drop_ignored_config_keys(tmp)
        write_pipeline_file(tmp)
        for name in COMPONENT_FOLDERS:
            if (out / name).exists():
                shutil.rmtree(out / name)
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, out / name)
        for name in ("model_index.json", "pipeline.py"):
            os.replace(Path(tmp) / name, out / name)
    if card is not None:
        (out / "README.md").write_text(card)
    if extra_config is not None:
        (out / "sdxs_export.json").write_text(json.dumps(extra_config, indent=2, sort_keys=True, default=str) + "\n")
    if verify:
        verify_hub_folder(out, variant=variant)
    return out


def verify_hub_folder(folder: str | os.PathLike, variant: str | None = None):
    """Load `folder` exactly as a user would (plain diffusers, custom code) and return the pipeline."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != HUB_CLASS_NAME:
        raise ValueError(f"{folder}/model_index.json must name {HUB_CLASS_NAME}, has {index.get('_class_name')!r}.")
    if not (folder / "pipeline.py").is_file():
        raise FileNotFoundError(f"{folder}/pipeline.py is missing: the hub loads the pipeline class from it.")
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, variant=variant)
    if type(pipe).__name__ != "SDXSPipeline":
        raise ValueError(f"{folder} loaded as {type(pipe).__name__}, expected SDXSPipeline.")
    return pipe


def load_component(folder: str | os.PathLike, name: str, index: dict | None = None, **kwargs):
    """Load one component of a hub folder with the stock class its model_index.json names (no custom code runs)."""
    import importlib

    folder = Path(folder)
    if index is None:
        index = read_model_index(folder)
    if name not in index or not (folder / name).is_dir():
        raise FileNotFoundError(f"{folder} lacks the `{name}` component (model_index.json entry and {name}/ folder).")
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name).from_pretrained(folder / name, **kwargs)


def read_model_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no model_index.json: pass an exported SDXS model folder.")
    return json.loads(path.read_text())


def load_local_pipeline(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load a hub folder as this package's `SDXSPipeline`, component by component.

    Unlike `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` this does not execute the folder's
    pipeline.py: training and evaluation run the current source, and several processes can load at once without
    racing on diffusers' dynamic-module cache.
    """
    from sdxs.pipeline import SDXSPipeline

    index = read_model_index(folder)
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    components = {}
    for name in names:
        if index[name][0] is None or not (Path(folder) / name).is_dir():
            components[name] = None  # an optional component saved as [null, null]
            continue
        component = load_component(folder, name, index)
        if isinstance(component, torch.nn.Module):
            component = component.to(dtype) if dtype is not None else component
            component.eval()
        components[name] = component
    config_keys = ("text_recipe", "default_width", "default_height", "refine_instruction")
    return SDXSPipeline(**components, **{k: index[k] for k in config_keys if k in index})


def _cast_copy(pipe, dtype: torch.dtype):
    """A shallow copy of `pipe` whose models are deep copies cast to `dtype` (the caller's pipeline is untouched)."""
    import copy

    components = dict(pipe.components)
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            components[name] = copy.deepcopy(module).to(dtype)
    config = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in components}
    return type(pipe)(**components, **config)


def sync_root_pipeline() -> Path:
    """Refresh `pipeline.py` at the repository root (the shipped model's entry point) from the source."""
    return write_pipeline_file(Path(__file__).resolve().parents[2])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance helpers for the hub layout.")
    parser.add_argument("--sync-root", action="store_true", help="copy src/sdxs/pipeline.py to the repo root")
    if parser.parse_args().sync_root:
        print(sync_root_pipeline())
