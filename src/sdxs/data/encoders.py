"""The encoders `sdxs prepare` uses: the VAE, the text encoder and tokenizer of a model, and their batched calls.

Images and captions go through the pipeline's own `encode_text` / `encode_images` / `normalize_latents`, so a
latent cache cannot drift from inference.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import torch

from sdxs.model_folder import load_component
from sdxs.pipeline import (
    encode_text,
    image_processor_from_tokenizer,
    latent_statistics,
    normalize_latents,
    unet_size_multiple,
    vae_scale_factors,
)


@dataclass
class Encoders:
    """What prepare needs from a model: VAE, text encoder, tokenizer, text recipe and the size facts."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_recipe: dict[str, Any]
    default_size: tuple[int, int]  # (width, height) the model generates by default
    size_step: int  # output sides must be multiples of this (decoder factor * UNet multiple)
    source: str
    vision_processor: Any = None  # the text encoder's image processor (for `image_embeds`); None when absent

    @property
    def scale_factors(self) -> tuple[int, int]:
        return vae_scale_factors(self.vae)

    @classmethod
    def from_pipeline(cls, pipe) -> Encoders:
        """Borrow the encoders of an in-memory SDXSPipeline (used as they are: no device or dtype change)."""
        cfg = pipe.config
        return cls(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_recipe=dict(cfg.text_recipe),
            default_size=(int(cfg.default_width), int(cfg.default_height)),
            size_step=int(pipe.size_step),
            source=f"in-memory {type(pipe).__name__}",
            vision_processor=getattr(pipe, "vision_processor", None),
        )

    @classmethod
    def from_folder(cls, model: str | os.PathLike, dtype: torch.dtype | None = None) -> Encoders:
        """Load vae/, text_encoder/ and tokenizer/ of a model folder with the classes model_index.json names."""
        from sdxs.pipeline import DEFAULT_TEXT_RECIPE

        folder = Path(model)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"`model` {str(folder)!r} has no model_index.json: pass an exported SDXS model folder (hub layout)."
            )
        index = json.loads(index_path.read_text())
        vae = load_component(folder, "vae", index, torch_dtype=torch.float32).eval()
        text_encoder = load_component(folder, "text_encoder", index).eval()
        if dtype is not None:
            text_encoder = text_encoder.to(dtype=dtype)
        tokenizer = load_component(folder, "tokenizer", index)
        has_vision = (index.get("vision_processor") or [None])[0] is not None and (folder / "vision_processor").is_dir()
        vision_processor = load_component(folder, "vision_processor", index) if has_vision else None
        if vision_processor is None:  # the published layout keeps the image processor in tokenizer/
            vision_processor = image_processor_from_tokenizer(tokenizer)
        # the UNet's *config* (not its weights) gives the size multiple
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        multiple = unet_size_multiple(SimpleNamespace(config=SimpleNamespace(**unet_config)))
        dec = vae_scale_factors(vae)[1]
        side = int(unet_config.get("sample_size", 64)) * dec
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_recipe={**DEFAULT_TEXT_RECIPE, **(index.get("text_recipe") or {})},
            default_size=(int(index.get("default_width") or side), int(index.get("default_height") or side)),
            size_step=dec * multiple,
            source=str(folder.resolve()),
            vision_processor=vision_processor,
        )


@torch.inference_mode()
def encode_captions(enc: Encoders, captions: list[str], batch_size: int, device: torch.device):
    """encode_text in batches -> embeds (K, 1+L, D), mask (K, 1+L) on the CPU."""
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        e, m = encode_text(
            enc.text_encoder, enc.tokenizer, captions[start : start + batch_size], enc.text_recipe, device
        )
        embeds.append(e.float().cpu())
        masks.append(m.cpu())
    return torch.cat(embeds), torch.cat(masks)


@torch.inference_mode()
def encode_images(enc: Encoders, images: list[PIL.Image.Image], device: torch.device):
    """The pipeline's `encode_image` of each image -> embeds (N, 1+L, D), mask (N, 1+L) on the CPU.

    The same layout as caption embeddings, so the UNet trainer can use them in place of a caption (image prompts).
    """
    from sdxs.pipeline import encode_images as encode_pipeline_images

    if enc.vision_processor is None:
        raise ValueError(
            "`image_embeds` needs the model's vision_processor (a model folder with vision_processor/ and a text "
            "encoder with a vision tower)."
        )
    embeds, masks = encode_pipeline_images(
        enc.text_encoder, enc.tokenizer, enc.vision_processor, images, enc.text_recipe, device
    )
    return embeds.float().cpu(), masks.cpu()


@torch.inference_mode()
def encode_latents(vae, pixels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels (B, H, W, 3) -> scaled posterior mean and log-variance, each (B, C, H/8, W/8) float32 on CPU.

    For z = a * (x - m) with x ~ N(mean, exp(logvar)): z ~ N(a * (mean - m), exp(logvar + 2 log a)), where
    a = sf and m = 0, or per channel a = sf / latents_std and m = latents_mean when the VAE config has them (the
    pipeline's `normalize_latents`).
    """
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    posterior = vae.encode(x.to(vae.dtype)).latent_dist
    sf = float(vae.config.scaling_factor)
    mean = normalize_latents(posterior.mean.float(), vae)
    stats = latent_statistics(vae)
    if stats is None:
        log_scale = 2 * math.log(sf)
    else:
        log_scale = 2 * torch.log(sf / torch.tensor(stats[1], dtype=torch.float32, device=mean.device)).view(
            1, -1, 1, 1
        )
    return mean.cpu(), (posterior.logvar.float() + log_scale).cpu()


def trim_length(mask: torch.Tensor, padding_side: str) -> int:
    """Columns to keep: up to the last real token with right padding; everything with left padding."""
    if padding_side != "right":
        return mask.shape[1]
    return int(mask.any(0).nonzero().max()) + 1


def move_to(module, device: torch.device, enabled: bool) -> None:
    """Move `module` to `device` when `enabled` (text-encoder offload), freeing CUDA memory when it leaves."""
    if enabled and module.device != device:
        module.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()
