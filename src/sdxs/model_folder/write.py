"""Writing model folders: assemble one (`sdxs init`), export a run (`sdxs export`), verify, publish (`sdxs push`),
and copy the pipeline code. The rules are stated in `sdxs.model_folder`'s docstring."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sdxs.model_folder.read import (
    check_fit,
    find_checkpoint,
    find_tokenizer,
    load_base_pipeline,
    load_local_pipeline,
    load_trained,
    resolve_component,
    swap_component,
    trained_weights,
)
from sdxs.pipeline import HUB_CLASS_NAME, write_hub_files
from sdxs.runtime import torch_dtype

logger = logging.getLogger("sdxs.model_folder")

PIPELINE_SOURCE = Path(__file__).resolve().parents[1] / "pipeline.py"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/sdxs/model_folder/write.py -> the repository (the shipped model)
COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vision_processor")
EXPORT_DTYPES = ("fp32", "fp16", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Assemble (`sdxs init`)
# ----------------------------------------------------------------------------------------------------------------


def assemble(
    out: str | Path,
    preset: str = "emoji",
    base: str | Path | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    unet: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    shift: float | None = None,
    text_normalization: list[str] | None = None,
    default_steps: int | None = None,
    style_tags: dict[str, str] | None = None,
) -> Path:
    """Write a model folder to `out` from `base` (or fresh `preset` components) with the given components swapped in.

    A component source may be a training run (its latest checkpoint), a checkpoint, a model folder or the component
    folder itself (`resolve_component`; EMA weights when present). Returns `out`. The text encoder's hidden size
    must match the UNet's cross-attention width; when the UNet is not given and the base's does not fit, a fresh one
    is built to fit. `shift` sets the scheduler's noise shift (training reads it from the model folder, so it must
    be set before a UNet is trained for it). `text_normalization` sets how the tokenizer reads text
    (`sdxs.tokenizer.TEXT_NORMALIZATIONS`; our own byte-level tokenizers only): the text encoder and the UNet then
    need fine-tuning to the new token forms. `default_steps` is the step count `__call__`, the CLI, the server and
    the eval take when none is given (`default_num_inference_steps`; choose it from `bench/bench_steps.py`'s curve).
    `style_tags` (style name -> caption tag; {} clears them) are the styles the model was
    trained to draw, for `__call__(style=...)`, `sdxs generate --style` and the page's style select.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdxs.presets import PRESETS, build_pipeline, fresh_component, get_preset
    from sdxs.tokenizer import normalize_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"--preset {preset}: unknown preset; choose one of {', '.join(PRESETS)}.")
    if shift is not None and not shift > 0:
        raise ValueError(f"--shift must be > 0, got {shift}.")
    if default_steps is not None and not (isinstance(default_steps, int) and default_steps >= 1):
        raise ValueError(f"--default-steps must be a whole number >= 1, got {default_steps!r}.")
    p = get_preset(preset)
    given = {k: v for k, v in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet)) if v is not None}
    folders = {name: resolve_component(src, name) for name, src in given.items()}
    sources = {name: str(folder) for name, folder in folders.items()}
    if "text_encoder" in folders:
        sources["tokenizer"] = str(find_tokenizer(folders["text_encoder"]))

    def fresh(name: str) -> str:
        return f"preset {preset} (random, seed {seed})"

    if base is None:
        trained = {k: v for name, folder in folders.items() for k, v in load_trained(name, folder).items()}
        pipe = build_pipeline(preset, seed=seed, **trained)
        for name in ("text_encoder", "vae", "unet"):
            sources.setdefault(name, fresh(name))
        sources.setdefault("tokenizer", f"fresh BPE ({p.tokenizer_vocab}) on the built-in corpus")
        sources.setdefault("vision_processor", f"preset {preset}")
        sources["scheduler"] = f"preset {preset}"
    else:
        if not (Path(base) / "model_index.json").is_file():
            raise FileNotFoundError(f"--base {str(base)!r} is not a model folder (no model_index.json).")
        pipe = load_local_pipeline(base, dtype=torch.float32)
        sources = {**{k: f"{base}/{k}" for k, v in pipe.components.items() if v is not None}, **sources}
        for name, folder in folders.items():
            swap_component(pipe, name, folder, check=False)
        hidden = pipe.text_encoder.config.text_config.hidden_size
        if "unet" not in folders and pipe.unet.config.cross_attention_dim != hidden:
            logger.warning("the base UNet does not fit the text encoder (hidden %d): a fresh UNet is built", hidden)
            latent = pipe.vae.config.latent_channels
            pipe.register_modules(
                unet=fresh_component(p, "unet", seed, text_hidden_size=hidden, latent_channels=latent)
            )
            sources["unet"] = fresh("unet")
    check_fit(pipe)
    if shift is not None:
        pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift))
        sources["scheduler"] += f" (shift {shift:g})"
    if text_normalization is not None:
        normalize_tokenizer(pipe.tokenizer, text_normalization)
        sources["tokenizer"] += f" (normalization: {', '.join(text_normalization) or 'none'})"
    if default_steps is not None:
        pipe.register_to_config(default_num_inference_steps=default_steps)
    if style_tags is not None:
        from sdxs.pipeline import check_style_tags

        pipe.register_to_config(style_tags=check_style_tags(style_tags))
    extra = {"assembled_by": "sdxs init", "preset": preset, "base": str(base) if base else None, "sources": sources}
    out = save_hub_layout(pipe, out, dtype=dtype, extra_config=extra, verify=verify)
    for name in COMPONENT_FOLDERS:
        logger.info("%-16s <- %s", name, sources.get(name, "?"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Export (`sdxs export`), verify, publish (`sdxs push`)
# ----------------------------------------------------------------------------------------------------------------


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
    from sdxs.files import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Save into a temp folder beside the target, then swap component folders in: a crash never leaves a half model.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        src = _cast_copy(pipe, dtype) if dtype is not None else pipe
        # SDXSPipeline.save_pretrained writes the hub files itself (`write_hub_files`); write them again from this
        # package's source, so an export of a pipeline loaded from an older hub folder ships the current code.
        src.save_pretrained(tmp, safe_serialization=True, variant=variant)
        write_hub_files(tmp, source=PIPELINE_SOURCE)
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
        write_json(out / "sdxs_export.json", extra_config)
    if verify:
        verify_hub_folder(out, variant=variant)
    return out


def _cast_copy(pipe, dtype: torch.dtype):
    """A pipeline sharing `pipe`'s config whose models are deep copies cast to `dtype` (`pipe` is untouched)."""
    cast = {k: copy.deepcopy(m).to(dtype) for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    return type(pipe).from_pipe(pipe, **cast, dtype=dtype)


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


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str = "latest",
    weights: str = "auto",
    dtype: str | None = None,
    variant: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    verify: bool = True,
) -> Path:
    """Write checkpoint `checkpoint` of `run_dir` (with the rest of its base pipeline) to `out_dir` in the hub layout.

    Args:
        weights: "auto" (EMA when the run kept one and `ema.use_for_export`), "ema" or "raw" (`trained_weights`).
        dtype: "fp32" | "fp16" | "bf16" cast of the saved weights; variant: diffusers variant name (e.g. "fp16").
    """
    ckpt = find_checkpoint(run_dir, checkpoint)
    state = json.loads((ckpt / "state.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    trainer = state["trainer"]
    folder = trained_weights(ckpt, trainer, weights)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}.")
    pretrained = config["model"].get("pretrained", "")
    if trainer == "unet_lora":
        return export_lora(ckpt, folder, out_dir, pretrained, verify=verify)
    if not pretrained:
        raise ValueError(
            f"the run {str(run_dir)!r} has no `model.pretrained` pipeline to export into; the trained {trainer} is in "
            f"{str(folder)!r} (load it with from_pretrained, or name it in a UNet run's config)."
        )
    pipe = load_base_pipeline(pretrained)
    swap_component(pipe, trainer, folder)
    ema = folder.name.endswith("_ema")
    card = model_card(config, state, weights="EMA" if ema else "raw", license=license, datasets=datasets)
    extra = {"training_config": config, "checkpoint": str(ckpt), "step": state["step"], "weights": folder.name}
    out = save_hub_layout(
        pipe,
        out_dir,
        dtype=torch_dtype(dtype) if dtype else None,
        variant=variant,
        card=card,
        extra_config=extra,
        verify=verify,
    )
    logger.info("exported %s (%s weights, step %d) to %s", ckpt.name, folder.name, state["step"], out)
    return out


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file (`load_lora_weights` looks for it)


def export_lora(ckpt: Path, folder: Path, out_dir: str | Path, pretrained: str, verify: bool = True) -> Path:
    """A LoRA run exports its adapter file alone, every key in peft's format (`unet.<module>.lora_A.weight` /
    `.lora_B.weight`): a file that is already so is copied byte for byte, an older mixed one (attention adapters as
    diffusers' `lora.down/lora.up`, the rest as `lora_A/lora_B`, which `load_lora_weights` reads only half of) is
    rewritten with its metadata. `verify` loads it into the base pipeline and checks that every module with an
    adapter in the file has one after loading."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src, dst = folder / LORA_FILE, out / LORA_FILE
    state, metadata = read_lora_file(src)
    peft_state = lora_keys_to_peft(state, src)
    if list(peft_state) == list(state):
        shutil.copy2(src, dst)
    else:
        from safetensors.torch import save_file

        save_file(peft_state, str(dst), metadata=metadata)
        renamed = sum(a != b for a, b in zip(state, peft_state, strict=True))
        logger.info(
            "%s mixed LoRA key formats: wrote %d of %d keys in peft's lora_A/lora_B form", src, renamed, len(state)
        )
    if verify and pretrained:
        pipe = load_base_pipeline(pretrained)
        pipe.load_lora_weights(str(out))
        missing = sorted(lora_modules(peft_state) - adapted_modules(pipe.unet))
        if missing:
            raise ValueError(
                f"{str(dst)!r} loaded into {pretrained!r} only partly: {len(missing)} module(s) with weights in the "
                f"file have no adapter after `load_lora_weights`, e.g. {missing[:3]}."
            )
    logger.info("exported the LoRA of %s (%s weights) to %s", ckpt.name, folder.name, dst)
    return out


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA safetensors file's tensors (in file order) and its metadata (the adapter config)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {str(path)!r}.")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (not a dict)


def lora_keys_to_peft(state: dict[str, torch.Tensor], path: Path | str = "") -> dict[str, torch.Tensor]:
    """UNet LoRA keys all in peft's `.lora_A.` / `.lora_B.` form (diffusers' `.lora.down` / `.lora.up` and its older
    `to_q_lora.down`-style keys renamed; order and tensors kept). Any other key is a `ValueError`."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    converted = convert_unet_state_dict_to_peft(state)
    odd = [k for k in converted if ".lora_A." not in k and ".lora_B." not in k]
    if odd or not converted or len(converted) != len(state):
        raise ValueError(f"{str(path)!r} is not a UNet LoRA of lora_A/lora_B pairs: keys such as {odd[:3]}.")
    return converted


def lora_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of the UNet modules a LoRA state dict has weights for (`unet.` prefix and `.lora_A.weight`,
    `.lora.down.weight`, ... suffixes dropped)."""
    return {re.split(r"\.lora[._]", k.removeprefix("unet."), maxsplit=1)[0] for k in state}


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Names of the modules of `model` that carry a peft LoRA layer (with at least one adapter)."""
    from peft.tuners.lora import LoraLayer

    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A) > 0}


def model_card(
    config: dict, state: dict, weights: str, license: str = "apache-2.0", datasets: list[str] | None = None
) -> str:
    """README.md with hub YAML metadata (library, pipeline tag, licence, datasets, training steps) and usage."""
    datasets = datasets or [Path(config.get("data", {}).get("path", "") or "unknown").name]
    meta = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        f"license: {license}",
        "datasets:",
        *[f"- {d}" for d in datasets],
        "tags:",
        "- sdxs",
        "- flow-matching",
        f"training_steps: {state['step']}",
        "---",
    ]
    opt = config.get("optim", {})
    body = f"""
# SDXS (trained with `sdxs train {state["trainer"].replace("_", "-")}`)

Trained component: **{state["trainer"]}** ({weights} weights), {state["step"]} optimiser steps,
{state.get("samples_seen", 0)} samples seen, optimizer {state.get("optimizer", "?")}, peak lr {opt.get("lr")},
mixed precision {config.get("run", {}).get("mixed_precision")}. The full training config is in `sdxs_export.json`.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("THIS_REPO", trust_remote_code=True)
image = pipe("a red apple on a wooden table, 3d render", seed=0).images[0]
```
"""
    return "\n".join(meta) + "\n" + body


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload SDXS model",
) -> str:
    """Publish an exported folder: create the model repo if needed, upload every file; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not an exported model folder (no model_index.json); run sdxs export."
        )
    if repo_id.count("/") != 1:
        raise ValueError(f"`repo_id` must look like 'user/name', got {repo_id!r}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=[".export-*", "*.tmp"],
    )
    return str(getattr(info, "commit_url", info))


# ----------------------------------------------------------------------------------------------------------------
# The pipeline code
# ----------------------------------------------------------------------------------------------------------------


def write_pipeline_file(folder: str | os.PathLike) -> Path:
    """Copy the pipeline source to `folder/pipeline.py` byte for byte (atomically)."""
    dst = Path(folder) / "pipeline.py"
    tmp = dst.with_suffix(".py.tmp")
    shutil.copyfile(PIPELINE_SOURCE, tmp)
    os.replace(tmp, dst)
    return dst


def sync_root_pipeline() -> Path:
    """Refresh `pipeline.py` at the repository root (the shipped model's entry point) from the source."""
    return write_pipeline_file(REPO_ROOT)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance helpers for the hub layout.")
    parser.add_argument("--sync-root", action="store_true", help="copy src/sdxs/pipeline.py to the repo root")
    if parser.parse_args(argv).sync_root:
        print(sync_root_pipeline())


if __name__ == "__main__":
    main()
