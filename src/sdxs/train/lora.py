"""UNet LoRA fine-tuning with flow matching on a latent cache (`sdxs train lora`).

The UNet trainer's loss, data, samples and `fit` loop (checkpoints, exact resume, EMA, metrics) unchanged; the
differences are the model and what is saved:

- the pretrained UNet of `model.pretrained` is frozen and gets peft LoRA adapters (`[lora]`: rank, alpha,
  target modules, dropout) through diffusers' `unet.add_adapter`; only the adapters train (and are EMA'd);
- every checkpoint holds `unet_lora/pytorch_lora_weights.safetensors` (and `unet_lora_ema/` with EMA), written by
  the pipeline's `save_lora_weights` with the adapter config as metadata, every key in one format, peft's
  (`unet.<module>.lora_A.weight` / `.lora_B.weight`), so any copy loads fully with `pipe.load_lora_weights(folder)`;
  the export at the end is that file in `RUN/export/`.

Why not diffusers' `convert_state_dict_to_diffusers` (what diffusers' train_text_to_image_lora.py applies): it
renames only the attention projections (`to_q/to_k/to_v/to_out.0` -> `lora.down/lora.up`) and leaves every other
target (`proj_in`, `ff.net.*`, `conv1`, ...) as `lora_A/lora_B`. `load_lora_weights` decides the format from the
first key alone, so such a mixed file loads only one of the two groups (the attention adapters were dropped with
nothing but a peft RuntimeWarning). Files written before the change are mixed: resume reads them, and `sdxs export`
rewrites them in the one format (`sdxs.model_folder.write.export_lora`).

Text-encoder LoRA is not trained: the latent cache holds the text encoder's outputs, so the text encoder never
runs during training (see docs/training-lora.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sdxs.model_folder import LORA_FILE
from sdxs.train.common import fit, make_accelerator
from sdxs.train.config import LoRAConfig, LoRATrainConfig
from sdxs.train.unet import load_base_pipeline, unet_task

logger = logging.getLogger("sdxs.train")

ADAPTER = "default"  # peft adapter name inside the training UNet


def add_lora(unet, lora: LoRAConfig, seed: int) -> int:
    """Freeze `unet` and add trainable LoRA adapters (fp32, A seeded, B zero: the output starts unchanged).

    Returns the number of trainable parameters."""
    from peft import LoraConfig

    if lora.rank < 1:
        raise ValueError(f"`lora.rank` must be >= 1, got {lora.rank}.")
    if lora.alpha <= 0:
        raise ValueError(f"`lora.alpha` must be > 0, got {lora.alpha} (alpha = rank gives the adapters scale 1).")
    if not lora.target_modules:
        raise ValueError('`lora.target_modules` is empty: name the modules to adapt, e.g. ["to_q", "to_k", "to_v"].')
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"`lora.target_modules` {missing} match no module of the UNet; use names such as "
            '"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2".'
        )
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # peft draws A from the global RNG
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        init_lora_weights=True,
    )
    unet.add_adapter(config, adapter_name=ADAPTER)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    return sum(p.numel() for p in trainable)


def save_lora(unet, folder: Path) -> None:
    """The adapters as `folder/pytorch_lora_weights.safetensors` for `load_lora_weights`: keys
    `unet.<module>.lora_A.weight` / `.lora_B.weight` (peft's format for every target module alike: see the module
    docstring), the adapter config as metadata."""
    from peft.utils import get_peft_model_state_dict

    from sdxs.pipeline import SDXSPipeline

    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    odd = [k for k in layers if ".lora_A." not in k and ".lora_B." not in k]
    if odd:  # e.g. DoRA magnitudes or biases: not something `add_lora` makes
        raise ValueError(f"unexpected LoRA tensors {odd[:3]}: only lora_A / lora_B weights are saved.")
    SDXSPipeline.save_lora_weights(
        folder,
        unet_lora_layers={k: v.detach().contiguous() for k, v in layers.items()},
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )


def load_lora(unet, folder: Path) -> None:
    """Resume: put `save_lora`'s file back into the adapters of `unet`; every adapter tensor must be in it.

    Reads peft keys and the older mixed files (attention adapters as `lora.down/lora.up`) alike."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {str(path)!r}: not a checkpoint of `sdxs train lora`.")
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items()}
    state = convert_unet_state_dict_to_peft(state)
    expected = {k for k in unet.state_dict() if "lora_" in k}
    misfit = f"{str(path)!r} does not fit the UNet's adapters (were `lora.rank` or `lora.target_modules` changed?)"
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{misfit}: {str(e).splitlines()[-1].strip()}") from e
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    if missing or result.unexpected_keys or len(state) != len(expected):
        raise ValueError(
            f"{misfit}: {len(state)} tensors for {len(expected)} adapter tensors; missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}."
        )


def train_lora(cfg: LoRATrainConfig, resume: str | None = None) -> Path:
    """Train LoRA adapters on `cfg.model.pretrained`'s UNet on the latent cache `cfg.data.path`; returns the final checkpoint."""
    accelerator = make_accelerator(cfg.run)
    base = load_base_pipeline(cfg.model.pretrained)
    unet = base.unet.float()
    n = add_lora(unet, cfg.lora, cfg.run.seed)
    logger.info(
        "LoRA rank %d, alpha %g on %s: %.3fM trainable of %.2fM UNet parameters",
        cfg.lora.rank,
        cfg.lora.alpha,
        ", ".join(cfg.lora.target_modules),
        n / 1e6,
        sum(p.numel() for p in unet.parameters()) / 1e6,
    )
    unet.train()
    task = dataclasses.replace(
        unet_task(cfg, base, unet, accelerator), name="unet_lora", save_model=save_lora, load_model=load_lora
    )
    return fit(task, cfg, resume=resume, accelerator=accelerator)
