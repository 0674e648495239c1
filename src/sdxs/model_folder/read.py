"""Reading model folders, training runs and checkpoints: pipelines and components out of them, and swapping a
component into a pipeline. The rules are stated in `sdxs.model_folder`'s docstring."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

PIPELINE_CONFIG_KEYS = (
    "text_recipe",
    "default_width",
    "default_height",
    "default_num_inference_steps",
    "refine_instruction",
    "style_tags",
)
CHECKPOINT_PREFIX = "step-"  # RUN/checkpoints/step-0000200/: one complete checkpoint (state.json written last)


# ----------------------------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------------------------


def read_model_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no model_index.json: pass an exported SDXS model folder.")
    return json.loads(path.read_text())


def load_component(folder: str | os.PathLike, name: str, index: dict | None = None, **kwargs):
    """Load one component of a model folder with the stock class its model_index.json names (no custom code runs)."""
    folder = Path(folder)
    if index is None:
        index = read_model_index(folder)
    if name not in index or not (folder / name).is_dir():
        raise FileNotFoundError(f"{folder} lacks the `{name}` component (model_index.json entry and {name}/ folder).")
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name).from_pretrained(folder / name, **kwargs)


def _dtype_kwargs(entry: list, dtype: torch.dtype | None) -> dict:
    """`torch_dtype=` for a diffusers model class: loading in the dtype is what diffusers asks for, and a later
    `.to(dtype)` logs a warning about fp32 modules on every load (diffusers 0.42 warns even when there are none)."""
    if dtype is None or entry[0] != "diffusers":
        return {}
    from diffusers import ModelMixin

    cls = getattr(importlib.import_module(entry[0]), entry[1], None)
    return {"torch_dtype": dtype} if isinstance(cls, type) and issubclass(cls, ModelMixin) else {}


def load_local_pipeline(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load a model folder as this package's `SDXSPipeline`, component by component.

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
        component = load_component(folder, name, index, **_dtype_kwargs(index[name], dtype))
        if isinstance(component, torch.nn.Module):
            if dtype is not None and component.dtype != dtype:
                component = component.to(dtype)
            component.eval()
        components[name] = component
    return SDXSPipeline(**components, **{k: index[k] for k in PIPELINE_CONFIG_KEYS if k in index})


def load_base_pipeline(path: str):
    """The model folder a training run builds on (`model.pretrained`), in float32 with its progress bar off."""
    if not path:
        raise ValueError(
            "`model.pretrained` is required: the hub folder whose VAE and text encoder made the latent cache."
        )
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"`model.pretrained` {path!r} is not a model folder (no model_index.json).")
    pipe = load_local_pipeline(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Parameters per component folder, read from safetensors headers (nothing is loaded into memory)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for sub in sorted(Path(folder).iterdir()):
        files = sorted(sub.glob("*.safetensors")) if sub.is_dir() else []
        if not files:
            continue
        total = 0
        for file in files:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
        counts[sub.name] = total
    return counts


def describe(folder: str | os.PathLike) -> dict[str, Any]:
    """What `sdxs info` shows of a model folder: pipeline class, component classes, parameters, settings."""
    index = read_model_index(folder)
    return {
        "folder": str(folder),
        "pipeline": index.get("_class_name"),
        "components": {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[1]},
        "parameters": parameter_counts(folder),
        "settings": {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
    }


# ----------------------------------------------------------------------------------------------------------------
# Training runs and checkpoints; components from them, and swapping them in
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of interrupted saves are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """`which` = "latest" or a checkpoint folder path."""
    if which != "latest":
        path = Path(which)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"{which!r} is not a complete checkpoint (no state.json).")
        return path
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"no complete checkpoint under {str(Path(run_dir) / 'checkpoints')!r} to resume from.")
    return dirs[-1]


def trained_weights(ckpt: Path, name: str, weights: str = "auto") -> Path:
    """The folder of component `name` in checkpoint `ckpt`: "auto" (EMA when the run kept it and its config's
    `ema.use_for_export` is on, the default), "ema" (an error without EMA weights) or "raw"."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"`weights` must be 'auto', 'ema' or 'raw', got {weights!r}.")
    ema = ckpt / f"{name}_ema"
    if weights == "ema" and not ema.is_dir():
        raise ValueError(f"{str(ckpt)!r} has no EMA weights (the run had ema.enabled = false); use weights='raw'.")
    config = json.loads((ckpt / "config.json").read_text()) if (ckpt / "config.json").is_file() else {}
    use_ema = ema.is_dir() and (weights == "ema" or config.get("ema", {}).get("use_for_export", True))
    return ema if use_ema and weights != "raw" else ckpt / name


def resolve_component(src: str | Path, name: str, weights: str = "auto") -> Path:
    """The folder holding component `name` (config + safetensors) inside a run, checkpoint, model or itself."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--{name.replace('_', '-')} {str(src)!r}: no such folder.")
    if (path / "checkpoints").is_dir():  # a training run: its latest complete checkpoint
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise FileNotFoundError(f"{str(path)!r} is a run folder without a complete checkpoint.")
        path = dirs[-1]
    if (path / "state.json").is_file():  # a checkpoint
        path = trained_weights(path, name, weights)
    elif (path / "model_index.json").is_file():
        path = path / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(src)!r} holds no {name} (looked for {str(path / 'config.json')!r}).")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise FileNotFoundError(
            f"{str(src)!r} has a config.json but no *.safetensors weights for {name} in {str(path)!r}: pass a model "
            "folder, a component folder, a checkpoint (checkpoints/step-N) or a run folder that holds checkpoints/ "
            "(a run's own config.json is its settings, not a component)."
        )
    return path


def find_tokenizer(text_encoder_dir: Path) -> Path:
    """The tokenizer saved beside a text encoder (checkpoint or model folder), or inside its folder."""
    text_encoder_dir = Path(text_encoder_dir)
    for candidate in (text_encoder_dir.parent / "tokenizer", text_encoder_dir):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer beside {str(text_encoder_dir)!r} (expected ../tokenizer/).")


def load_trained(name: str, folder: Path) -> dict[str, Any]:
    """Component `name` from `folder` in float32, with what travels with it: a text encoder brings its tokenizer
    and, when saved beside it, its vision processor. Returns {component name: object} for `register_modules`."""
    folder = Path(folder)
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return {"unet": UNet2DConditionModel.from_pretrained(folder).float().eval()}
    if name == "vae":
        from diffusers import AsymmetricAutoencoderKL

        return {"vae": AsymmetricAutoencoderKL.from_pretrained(folder).float().eval()}
    if name == "text_encoder":
        from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        parts = {
            "text_encoder": Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(find_tokenizer(folder)),
        }
        if (folder.parent / "vision_processor").is_dir():
            parts["vision_processor"] = Qwen2VLImageProcessorPil.from_pretrained(folder.parent / "vision_processor")
        return parts
    raise ValueError(f"unknown component {name!r} in {str(folder)!r}: expected unet, vae or text_encoder.")


def check_fit(pipe) -> None:
    """The UNet's cross-attention width must be the text encoder's hidden size (else they cannot work together)."""
    hidden = pipe.text_encoder.config.text_config.hidden_size
    width = pipe.unet.config.cross_attention_dim
    if width != hidden:
        raise ValueError(
            f"the UNet's cross_attention_dim is {width} but the text encoder's hidden size is {hidden}: they cannot "
            "be assembled (train a UNet for this text encoder first)."
        )


def swap_component(pipe, name: str, folder: Path, check: bool = True) -> None:
    """Replace component `name` of `pipe` (in place, `register_modules`) with the one saved in `folder`."""
    pipe.register_modules(**load_trained(name, folder))
    if check:
        check_fit(pipe)


def summary(model: str | None, presets: list[str] | None = None) -> dict[str, Any]:
    """`sdxs info`'s facts without loading weights: the version, `describe` of the model folder that
    `resolve_model(model)` names (or its hub id, or the error saying why there is none) and `describe_preset` of
    `presets` (default: all)."""
    import sdxs
    from sdxs.presets import PRESETS, describe_preset
    from sdxs.runtime import UserError, resolve_model

    info: dict[str, Any] = {"version": sdxs.__version__}
    try:
        folder = resolve_model(model)
    except UserError as e:
        folder = None
        info["model"] = {"error": str(e)}
    if folder is not None and Path(folder).is_dir():
        info["model"] = describe(folder)
    elif folder is not None:
        info["model"] = {"hub_id": folder, "note": "not downloaded by `info`"}
    for name in presets or []:
        if name not in PRESETS:
            raise UserError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    info["presets"] = {name: describe_preset(name) for name in presets or PRESETS}
    return info


def _format_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def print_info(info: dict[str, Any]) -> None:
    """Print `sdxs info`'s summary (`describe` of the model folder + `describe_preset` of each preset)."""
    print(f"sdxs {info['version']}")
    model = info["model"]
    if "error" in model:
        print(f"model: none ({model['error']})")
    elif "hub_id" in model:
        print(f"model: {model['hub_id']} (hub id; {model['note']})")
    else:
        print(f"model: {model['folder']}")
        for name, cls in model["components"].items():
            n = model["parameters"].get(name)
            print(f"  {name:<17} {cls:<36} {_format_count(n) if n else '-':>10}")
        total = sum(model["parameters"].values())
        print(f"  {'total':<17} {'':<36} {_format_count(total):>10}")
        for key, value in model["settings"].items():
            if not isinstance(value, dict):
                print(f"  {key} = {value}")
    print("presets (random-weight shapes, counted on the meta device):")
    for name, p in info["presets"].items():
        total = sum(p["parameters"].values())
        parts = ", ".join(f"{k} {_format_count(v)}" for k, v in p["parameters"].items())
        w, h = p["default_size"]
        print(f"  {name:<8} {_format_count(total):>10}  {w}x{h}  {p['note']}")
        print(f"           {parts}")
