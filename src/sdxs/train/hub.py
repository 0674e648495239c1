"""From a training run to the hub: `sdxs export RUN OUT` and `sdxs push OUT REPO_ID`.

Export takes the run's base pipeline (`model.pretrained` of its config), swaps in the trained component from a
checkpoint (EMA weights when there are any, unless asked for the raw ones), writes the hub layout with
`sdxs.export.save_hub_layout` (which reloads it with plain diffusers) and a model card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sdxs.train.common import find_checkpoint

logger = logging.getLogger("sdxs.train")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        weights: "auto" (EMA when the run kept one and `ema.use_for_export`), "ema" or "raw".
        dtype: "fp32" | "fp16" | "bf16" cast of the saved weights; variant: diffusers variant name (e.g. "fp16").
    """
    from sdxs.export import save_hub_layout
    from sdxs.train.unet import load_base_pipeline

    ckpt = find_checkpoint(run_dir, checkpoint)
    state = json.loads((ckpt / "state.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    trainer = state["trainer"]
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"`weights` must be 'auto', 'ema' or 'raw', got {weights!r}.")
    has_ema = (ckpt / f"{trainer}_ema").is_dir()
    if weights == "ema" and not has_ema:
        raise ValueError(f"{str(ckpt)!r} has no EMA weights (the run had ema.enabled = false); use weights='raw'.")
    use_ema = has_ema and (weights == "ema" or (weights == "auto" and config["ema"]["use_for_export"]))
    folder = ckpt / (f"{trainer}_ema" if use_ema else trainer)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}.")

    pretrained = config["model"].get("pretrained", "")
    if trainer == "unet_lora":
        return export_lora(ckpt, folder, out_dir, pretrained, verify=verify)
    if not pretrained:
        raise ValueError(
            f"the run {str(run_dir)!r} has no `model.pretrained` pipeline to export into; the trained {trainer} is in "
            f"{str(folder)!r} (load it with from_pretrained, or name it in a UNet run's config)."
        )
    pipe = load_base_pipeline(pretrained)
    swap_component(pipe, trainer, folder, ckpt)
    card = model_card(config, state, weights="EMA" if use_ema else "raw", license=license, datasets=datasets)
    extra = {"training_config": config, "checkpoint": str(ckpt), "step": state["step"], "weights": folder.name}
    out = save_hub_layout(
        pipe, out_dir, dtype=DTYPES.get(dtype), variant=variant, card=card, extra_config=extra, verify=verify
    )
    logger.info("exported %s (%s weights, step %d) to %s", ckpt.name, folder.name, state["step"], out)
    return out


def export_lora(ckpt: Path, folder: Path, out_dir: str | Path, pretrained: str, verify: bool = True) -> Path:
    """A LoRA run exports its adapter file (diffusers format) alone; `verify` loads it into the base pipeline."""
    import shutil

    from sdxs.train.lora import LORA_FILE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder / LORA_FILE, out / LORA_FILE)
    if verify and pretrained:
        from sdxs.train.unet import load_base_pipeline

        pipe = load_base_pipeline(pretrained)
        pipe.load_lora_weights(str(out))
        if not getattr(pipe.unet, "peft_config", None):
            raise ValueError(f"{str(out / LORA_FILE)!r} loaded no adapters into {pretrained!r}.")
    logger.info("exported the LoRA of %s (%s weights) to %s", ckpt.name, folder.name, out / LORA_FILE)
    return out


def swap_component(pipe, trainer: str, folder: Path, ckpt: Path) -> None:
    """Replace the trained component of `pipe` with the checkpoint's (and check the pieces still fit)."""
    # register_modules sets the attribute and keeps model_index.json in step with the swapped component
    if trainer == "unet":
        from diffusers import UNet2DConditionModel

        pipe.register_modules(unet=UNet2DConditionModel.from_pretrained(folder))
    elif trainer == "vae":
        from diffusers import AsymmetricAutoencoderKL

        pipe.register_modules(vae=AsymmetricAutoencoderKL.from_pretrained(folder))
    elif trainer == "text_encoder":
        from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

        te = Qwen3_5ForConditionalGeneration.from_pretrained(folder)
        hidden = te.config.text_config.hidden_size
        if hidden != pipe.unet.config.cross_attention_dim:
            raise ValueError(
                f"the trained text encoder has hidden size {hidden} but the base UNet's cross_attention_dim is "
                f"{pipe.unet.config.cross_attention_dim}: train a UNet for it first."
            )
        pipe.register_modules(text_encoder=te, tokenizer=AutoTokenizer.from_pretrained(ckpt / "tokenizer"))
    else:
        raise ValueError(f"unknown trainer {trainer!r} in {str(ckpt)!r}.")


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
