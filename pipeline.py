# Copyright 2026 The SDXS authors. Apache-2.0.
"""SDXS: Simple Diffusion XS — a compact flow-matching text-to-image pipeline.

This file is the single source of truth for the hub entry point: `sdxs export` copies it verbatim to
`pipeline.py` beside `model_index.json`, where diffusers loads it as a dynamic module. It may therefore import
only torch, numpy, PIL, diffusers and transformers — never `sdxs`. The `sdxs` package imports the shared helpers
from here (`encode_text`, `flow_sigmas`, `shift_sigmas`, `load_rgb_image`, ...), so pipeline, data preparation
and training cannot drift apart.

Map of this file (in the order of diffusers' own pipelines):

    constants            DEFAULT_TEXT_RECIPE, DEFAULT_NUM_INFERENCE_STEPS, the schedulers the loop can drive
    hub layout           write_hub_files, drop_ignored_config_keys          (save_pretrained and `sdxs export`)
    shared helpers       the text recipe (encode_text, encode_images), sigmas (flow_sigmas, shift_sigmas,
                         sigma_to_timestep), VAE factors and latent statistics, load_rgb_image
    class SDXSPipeline   components and properties, encode_prompt, check_inputs, prepare_latents, __call__, then
                         the extra public methods: encode_image, refine_prompts, image_upscale (+ VAE tiling and
                         slicing), enable_speedups, save_pretrained
    module helpers       tiling ramps, refine_prompts' tag filters
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import AsymmetricAutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import USE_PEFT_BACKEND, deprecate, logging, scale_lora_layers, unscale_lora_layers
from transformers import ImageProcessingMixin, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

logger = logging.get_logger(__name__)

# The frozen text-conditioning recipe. Stored in model_index.json (pipeline config `text_recipe`), fingerprinted
# by data preparation, so a cache made with another recipe is refused. Change it only together with a new model.
DEFAULT_TEXT_RECIPE: dict[str, Any] = {
    "max_length": 250,  # tokens per prompt, padded to exactly this length (fixed shapes: caching, compile)
    "padding_side": "right",  # causal encoder: real tokens never see right padding -> batch-invariant states
    "chat_template": False,  # True: wrap the prompt as a user turn of the tokenizer's chat template first
    "hidden_layer": -2,  # which entry of `hidden_states` is the sequence (-2: the layer before the last)
}

# Euler steps of `__call__` when neither the call nor the model's config says (sdxs-1b's card: 40)
DEFAULT_NUM_INFERENCE_STEPS = 40

# Instruction for `refine_prompts`; stored in the pipeline config, overridable per call.
DEFAULT_REFINE_INSTRUCTION = (
    "Rewrite the short prompt as one detailed image caption in the same style as the training captions."
)

# An image argument: diffusers' own `PipelineImageInput` (PIL, array, tensor, or a list of them) or file path(s).
ImageInput = PipelineImageInput | str | os.PathLike | list[str | os.PathLike]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# a skin-tone tag as the emoji captions write it ("medium-light skin tone"): a tone makes another emoji, so
# `refine_prompts` drops one the prompt did not ask for
SKIN_TONE_TAG = re.compile(r"^(light|medium-light|medium|medium-dark|dark) skin tone$", re.IGNORECASE)


def check_style_tags(style_tags: dict[str, str] | None) -> dict[str, str]:
    """The config's `style_tags` (style name -> caption tag), checked: non-empty names and tags, no comma in a tag
    (a tag is the last comma-separated part of a caption), names and tags unique ignoring case."""
    if style_tags is None:
        return {}
    if not isinstance(style_tags, dict):
        raise TypeError(f"style_tags must be a dict of style name -> caption tag, got {type(style_tags).__name__}.")
    out, seen = {}, set()
    for name, tag in style_tags.items():
        if not (isinstance(name, str) and isinstance(tag, str) and name.strip() and tag.strip()):
            raise ValueError(f"style_tags: {name!r} -> {tag!r}: a style needs a non-empty name and caption tag.")
        name, tag = name.strip(), " ".join(tag.split())
        if "," in tag:
            raise ValueError(f"style_tags: the tag of {name!r} ({tag!r}) has a comma; a tag is one caption part.")
        if name.lower() in seen or tag.lower() in seen - {name.lower()}:
            raise ValueError(f"style_tags: {name!r} -> {tag!r} repeats a name or a tag of another style.")
        seen |= {name.lower(), tag.lower()}
        out[name] = tag
    return out


def find_style(style_tags: dict[str, str], style) -> str | None:
    """The name of the style `style` asks for, by name or tag, any case (`"Flat"` -> `"twemoji"`); None: none."""
    if not isinstance(style, str):
        return None
    key = style.strip().lower()
    return next((name for name, tag in style_tags.items() if key in (name.lower(), tag.lower())), None)


def styled_prompt(prompt: str, tag: str, all_tags) -> str:
    """`prompt` asking for the style of `tag`: style tags it already ends in (any of `all_tags`) are replaced,
    otherwise `, tag` is added ("red apple" -> "red apple, flat"; "red apple, 3d render" -> "red apple, flat")."""
    known = {t.lower() for t in all_tags}
    text = prompt.strip()
    while True:
        head, comma, last = text.rpartition(",")
        if not (comma and (not last.strip() or last.strip().lower() in known)):
            break
        text = head.rstrip()
    if text.lower() in known:
        text = ""
    return f"{text}, {tag}" if text else tag

# A hub repository with custom code names its pipeline class as [module file, class] in model_index.json.
HUB_CLASS_NAME = ["pipeline", "SDXSPipeline"]

# Schedulers the denoising loop can drive. The UNet predicts the flow velocity `noise - x0` at timestep 1000 * sigma.
# FlowMatch*: used as they are (Euler and LCM get the pipeline's unshifted sigmas, Heun builds its own).
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler")
# Multistep solvers (tested: an oracle velocity lands on x0; DEIS and SA-Solver do not): only with `use_flow_sigmas=True, prediction_type="flow_prediction"` (then they read the velocity).
FLOW_SIGMA_SCHEDULERS = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler")


# ----------------------------------------------------------------------------------------------------------------
# Hub layout (used by `SDXSPipeline.save_pretrained` and by `sdxs export`: one implementation)
# ----------------------------------------------------------------------------------------------------------------


def write_hub_files(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> list[str]:
    """Turn a diffusers `save_pretrained` folder into a repository `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)` loads: `pipeline.py` beside model_index.json (a byte copy of `source`, by default this
    very file, also when it runs as diffusers' dynamic module), `_class_name` as `["pipeline", "SDXSPipeline"]`, and
    component configs without the keys their classes ignore on load. Returns the dropped keys as "folder.key"."""
    folder = Path(folder)
    src = Path(source if source is not None else __file__)
    dst = folder / "pipeline.py"
    if not dst.exists() or src.resolve() != dst.resolve():
        tmp = dst.with_suffix(".py.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = list(HUB_CLASS_NAME)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return drop_ignored_config_keys(folder)


# Config keys a model class does not take but the pipeline reads from `component.config` (diffusers keeps unknown keys
# there on load): the VAE's per-channel latent statistics (`AsymmetricAutoencoderKL` has no such arguments).
KEPT_CONFIG_KEYS = ("latents_mean", "latents_std")


def drop_ignored_config_keys(folder: str | os.PathLike) -> list[str]:
    """Remove from each component's config.json the keys its diffusers model class would ignore on load.

    diffusers' `AsymmetricAutoencoderKL.__init__` registers `block_out_channels` and `force_upcast`, which it does not
    accept back, so every load of a saved VAE warns that they "are not expected and will be ignored". The class
    registers both again when it is built, so nothing is lost. Which keys are ignored is decided by diffusers' own
    `extract_init_dict`, the check that warns on load. Returns the removed keys as "folder.key".
    """
    import diffusers

    removed = []
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # extract_init_dict would print the very warning this removes
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
        logging.set_verbosity(verbosity)
    return removed


def _peft_layers(module) -> list:
    """peft's LoRA layers inside `module` (duck-typed: this file may not import peft)."""
    if not isinstance(module, torch.nn.Module):
        return []
    return [m for m in module.modules() if hasattr(m, "get_base_layer") and hasattr(m, "merged")]


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers (imported by sdxs.data and sdxs.train; keep them free of pipeline state)
# ----------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor | np.ndarray | float, shift: float):
    """Resolution shift of flow-matching noise levels: s' = shift * s / (1 + (shift - 1) * s).

    The same formula as `FlowMatchEulerDiscreteScheduler` (static shift); training samples its noise levels
    through it too, so train and inference see the same distribution of sigmas.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_inference_steps: int) -> np.ndarray:
    """Unshifted sigmas for `num_inference_steps` Euler steps: 1, 1 - 1/N, ..., 1/N (the final 0 is implicit).

    Pass these as `scheduler.set_timesteps(sigmas=...)`: the stock scheduler applies its configured shift exactly
    once. (Its default path shifts the already-shifted sigma_min again, so the last step lands on the wrong level.)
    """
    return np.linspace(1.0, 0.0, num_inference_steps + 1, dtype=np.float64)[:-1].astype(np.float32)


def sigma_to_timestep(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The UNet's timestep input for noise level `sigmas` (the scheduler's convention: t = sigma * 1000)."""
    return sigmas * num_train_timesteps


def vae_scale_factors(vae) -> tuple[int, int]:
    """(encoder_factor, decoder_factor) of an (asymmetric) VAE, read from its config: e.g. (4, 8) for the shipped one.

    AsymmetricAutoencoderKL registers the *decoder's* channels as `block_out_channels`, so deriving the factor from
    that alone (as stock pipelines do) would give the encoder the decoder's factor too. Read both explicitly.
    """
    cfg = vae.config
    down = cfg.get("down_block_out_channels", cfg.get("block_out_channels"))
    up = cfg.get("up_block_out_channels", cfg.get("block_out_channels"))
    return 2 ** (len(down) - 1), 2 ** (len(up) - 1)


def latent_statistics(vae) -> tuple[list[float], list[float]] | None:
    """The VAE config's per-channel `(latents_mean, latents_std)`, or None when it has not both (SDXL's rule)."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None
    channels = int(vae.config.latent_channels)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"VAE config `latents_mean`/`latents_std` have {len(mean)}/{len(std)} entries for {channels} latent channels."
        )
    return list(mean), list(std)


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=torch.float32).view(1, -1, 1, 1)


def normalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """VAE latents -> the UNet's latent space, as diffusers' SDXL/Flux pipelines do.

    With `latents_mean`/`latents_std` in the VAE config: `(z - mean) * scaling_factor / std` per channel; without:
    `z * scaling_factor`. Shared by the pipeline, data preparation and training.
    """
    sf = vae.config.scaling_factor
    stats = latent_statistics(vae)
    if stats is None:
        return latents * sf
    mean, std = _channel_view(stats[0], latents), _channel_view(stats[1], latents)
    return ((latents.float() - mean) * sf / std).to(latents.dtype)


def denormalize_latents(latents: torch.Tensor, vae) -> torch.Tensor:
    """The inverse of `normalize_latents`: `z * std / scaling_factor + mean` (or `z / scaling_factor`)."""
    sf = vae.config.scaling_factor
    stats = latent_statistics(vae)
    if stats is None:
        return latents / sf
    mean, std = _channel_view(stats[0], latents), _channel_view(stats[1], latents)
    return (latents.float() * std / sf + mean).to(latents.dtype)


def unet_size_multiple(unet) -> int:
    """Latent side multiple the UNet needs: every downsampling but the deepest must halve exactly.

    diffusers' UNet2DConditionModel forwards explicit upsample sizes, so its deepest level may round up (e.g. a
    68-latent goes 68 -> 34 -> 17 -> 9 and back); all shallower levels must halve without remainder.
    """
    num_down = len(unet.config.down_block_types) - 1
    return 2 ** max(num_down - 1, 0)


def open_image_file(fp: str | os.PathLike | BinaryIO, label: str) -> PIL.Image.Image:
    """Open an image file (a path or a binary file object): its first frame loaded, palette -> RGBA, info and EXIF
    kept. A file that is not a readable image is a ValueError naming `label`."""
    try:
        with PIL.Image.open(fp) as im:
            im.seek(0)
            im.load()
            image = im.copy() if im.mode != "P" else im.convert("RGBA")
            image.info.update(im.info)
            exif = im.getexif()
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"`image` {label} is not a readable image ({e}).") from e
    if exif:
        image.info["exif"] = exif.tobytes()
    return image


def load_rgb_image(
    image: PIL.Image.Image | np.ndarray | str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)
) -> PIL.Image.Image:
    """Open `image` (path, PIL, HWC uint8/float array) as 8-bit RGB.

    EXIF orientation is applied; transparency (RGBA, LA, palette with transparency) is composited on
    `background`; greyscale, palette, CMYK and 16-bit images are converted; animated images give their first frame.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`image` path {path!r} does not exist or is not a file.")
        image = open_image_file(path, f"file {path!r}")
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        image = PIL.Image.fromarray(arr)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"`image` must be a path, a PIL image or a numpy array, got {type(image).__name__}. "
            "For tensors in [-1, 1] use the pipeline's `image=` argument."
        )
    with contextlib.suppress(Exception):  # broken EXIF must not lose the image
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the type's range, not by clipping
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 or image.mode.startswith("I;16") else 255.0
        image = PIL.Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = PIL.Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGBA", rgba.size, tuple(background) + (255,))
        image = PIL.Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def encode_text(
    text_encoder,
    tokenizer,
    prompts: list[str],
    recipe: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning shared by the pipeline, data preparation and training.

    Returns `(embeds, mask)`: embeds (B, 1 + max_length, D) with `embeds[:, 0]` the pooled vector (hidden state of
    the last real token) followed by the hidden states of layer `recipe["hidden_layer"]`, zeroed at padding; mask
    (B, 1 + max_length) long, 1 for the pooled slot and real tokens. Over-long prompts are truncated with a warning.
    An empty prompt has no tokens, so it is encoded as one pad token (still a fixed, batch-independent vector).
    """
    recipe = {**DEFAULT_TEXT_RECIPE, **(recipe or {})}
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a full processor carries its tokenizer
    max_length = int(recipe["max_length"])
    if recipe["chat_template"]:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=False)
            for p in prompts
        ]
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
    dropped = [n - max_length for n in lengths if n > max_length]
    if dropped:
        logger.warning(
            f"{len(dropped)} prompt(s) longer than {max_length} tokens were truncated "
            f"({', '.join(str(d) for d in dropped)} token(s) dropped)."
        )
    # Run the encoder only as long as the longest prompt, then zero-pad the outputs to max_length: with a causal
    # encoder, real tokens never attend to padding, so this equals encoding at full length (tested) and is up to
    # max_length / longest times cheaper.
    longest = min(max_length, max(1, *lengths))
    enc = tok(
        prompts,
        padding="max_length",
        max_length=longest,
        truncation=True,
        padding_side=recipe["padding_side"],
        return_tensors="pt",
    )
    device = device if device is not None else text_encoder.device
    input_ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    left = recipe["padding_side"] == "left"
    empty = mask.sum(1) == 0
    if empty.any():  # no tokens at all: let the (first) pad token stand in as the one real token
        mask[empty, longest - 1 if left else 0] = 1
    out = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[recipe["hidden_layer"]]  # (B, longest, D)
    pad = (max_length - longest, 0) if left else (0, max_length - longest)
    hidden = torch.nn.functional.pad(hidden, (0, 0, *pad))  # (B, max_length, D)
    mask = torch.nn.functional.pad(mask, pad)
    return _pool_and_pack(hidden, mask, dtype)


def encode_images(
    text_encoder,
    tokenizer,
    vision_processor,
    images: list[PIL.Image.Image | np.ndarray | str | os.PathLike],
    recipe: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image conditioning in exactly `encode_text`'s layout (used by `SDXSPipeline.encode_image` and `sdxs prepare`).

    Each image goes through the vision processor, its tokens (`<|vision_start|><|image_pad|>*n<|vision_end|>`, at most
    max_length - 2 image tokens) through the language model; returns embeds (B, 1 + max_length, D) with the pooled
    (last-token) vector first, and the mask (B, 1 + max_length).
    """
    te = text_encoder
    if te is None or getattr(te.config, "vision_config", None) is None or vision_processor is None:
        raise ValueError(
            "`encode_image` needs a text encoder with a vision tower (e.g. Qwen3_5ForConditionalGeneration) and "
            "its image processor as the pipeline's `vision_processor`; this pipeline has "
            f"text_encoder={type(te).__name__}, vision_processor={type(vision_processor).__name__}."
        )
    if not images:
        raise ValueError("`image` is an empty list: pass at least one image or path.")
    images = [load_rgb_image(im) for im in images]
    recipe = {**DEFAULT_TEXT_RECIPE, **(recipe or {})}
    device = device if device is not None else te.device
    max_length = int(recipe["max_length"])
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    vp = vision_processor
    unit = int(vp.patch_size) * int(vp.merge_size)  # pixels per side of one image token
    # at most max_length - 2 image tokens (vision_start/end around them), at least 4
    size = {"shortest_edge": 4 * unit * unit, "longest_edge": max(4, max_length - 2) * unit * unit}
    cfg = te.config
    start = tok.convert_ids_to_tokens(cfg.vision_start_token_id)
    end = tok.convert_ids_to_tokens(cfg.vision_end_token_id)
    pad = tok.convert_ids_to_tokens(cfg.image_token_id)
    all_embeds, all_masks = [], []
    for im in images:  # one at a time: each image has its own token count
        vis = vp(images=[im], size=size, return_tensors="pt")
        n = int(vis["image_grid_thw"][0].prod()) // (int(vp.merge_size) ** 2)
        text = start + pad * n + end
        if recipe["chat_template"]:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        enc = tok([text], padding="max_length", max_length=max_length, padding_side=recipe["padding_side"])
        input_ids = torch.tensor(enc["input_ids"], device=device)
        mask = torch.tensor(enc["attention_mask"], device=device)
        if input_ids.shape[1] > max_length:
            raise ValueError(f"image prompt has {input_ids.shape[1]} tokens, more than max_length={max_length}.")
        out = te(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=vis["pixel_values"].to(device, te.dtype),
            image_grid_thw=vis["image_grid_thw"].to(device),
            mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
            output_hidden_states=True,
        )
        embeds, mask = _pool_and_pack(out.hidden_states[recipe["hidden_layer"]], mask, None)
        all_embeds.append(embeds)
        all_masks.append(mask)
    return torch.cat(all_embeds), torch.cat(all_masks)


def _pool_and_pack(
    hidden: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # hidden (B, L, D), mask (B, L) -> embeds (B, 1 + L, D), mask (B, 1 + L)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # index of the last real token, whatever the padding side
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    seq = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    embeds = torch.cat([pooled.unsqueeze(1), seq], dim=1)
    mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).long()
    return embeds.to(dtype or hidden.dtype), mask


def image_processor_from_tokenizer(tokenizer):
    """The text encoder's image processor when it is kept with the tokenizer (the published sdxs-1b layout).

    Either `tokenizer` is a full processor (it has `.image_processor`), or its folder (`tokenizer.name_or_path`, a
    local folder: diffusers loads a hub repository from its local snapshot) holds a `preprocessor_config.json`,
    as `processor.save_pretrained("tokenizer")` writes it. Qwen2-VL-style image processors load with their PIL
    backend (no torchvision needed). None when there is none.
    """
    found = getattr(tokenizer, "image_processor", None)
    if found is not None or tokenizer is None:
        return found
    folder = getattr(tokenizer, "name_or_path", None) or ""
    path = os.path.join(folder, "preprocessor_config.json") if os.path.isdir(folder) else ""
    if not os.path.isfile(path):
        return None
    import json

    with open(path, encoding="utf-8") as f:
        kind = str(json.load(f).get("image_processor_type", ""))
    if kind.startswith("Qwen2VLImageProcessor"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(folder)
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


class SDXSPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""
    Text-to-image with a flow-matching UNet, an asymmetric VAE whose decoder upsamples 2x more than its encoder
    downsamples, and a Qwen3.5 text encoder.

    Args:
        unet ([`UNet2DConditionModel`]): predicts the flow velocity `noise - x0` from latents, sigma*1000 and text.
        vae ([`AsymmetricAutoencoderKL`]): the encoder downsamples `pipe.vae_encoder_scale_factor` x, the decoder
            upsamples `pipe.vae_scale_factor` x (both read from its config by `vae_scale_factors`: 4x and 8x for the
            shipped model); the ratio, 2, makes it a 2x upscaler.
        text_encoder ([`~transformers.PreTrainedModel`]): returns hidden states (Qwen3_5ForConditionalGeneration:
            its LM head serves `refine_prompts`, its vision tower `encode_image`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or a processor holding one): the text encoder's tokenizer.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): Euler steps from sigma 1 to 0; `shift` in its config.
        vision_processor ([`~transformers.ImageProcessingMixin`], *optional*): the text encoder's image processor
            (e.g. the PIL backend `Qwen2VLImageProcessorPil`, which needs no torchvision), for `encode_image`;
            absent, it is taken from the tokenizer's folder or processor (the published layout).
        text_recipe (`dict`, *optional*): the frozen text-conditioning recipe, see `DEFAULT_TEXT_RECIPE`.
        default_width / default_height (`int`, *optional*): the size `__call__` makes when none is given.
        default_num_inference_steps (`int`, *optional*, defaults to 40): the steps `__call__` takes when none are
            given; a model stores the count its quality-per-step curve supports (the CLI, server and page read it).
        refine_instruction (`str`, *optional*): default instruction for `refine_prompts`.
        style_tags (`dict[str, str]`, *optional*): the styles the model was trained to draw, name -> the caption tag
            that asks for it (`{"3d": "3d render", "twemoji": "flat"}`; a prompt without a tag gets the style the training
            captions without one had). `__call__(style=...)` and `apply_style` add the tag; empty: no styles. (Saved
            configs sort their keys, so the order of the styles is not kept.)
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    # vision_processor: absent in the published layout (its image processor lives in tokenizer/). Any component may
    # still be passed as None (`from_pretrained(folder, text_encoder=None)` to denoise precomputed `prompt_embeds`,
    # `unet=None, vae=None` to only encode prompts), as in diffusers' own pipelines, whose optional components are
    # the ones a text-to-image call works without.
    _optional_components = ["vision_processor"]
    # diffusers' contract (as StableDiffusionPipeline): with CFG "prompt_embeds" is the batched [negative, positive]
    # conditioning the UNet sees; a callback may return a replacement (e.g. SDCFGCutoffCallback keeps the last rows).
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "prompt_attention_mask"]
    _lora_loadable_modules = ["unet", "text_encoder"]

    # ------------------------------------------------------------------------------------------------------------
    # Components and properties
    # ------------------------------------------------------------------------------------------------------------

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AsymmetricAutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | ProcessorMixin,
        scheduler: SchedulerMixin,
        vision_processor: ImageProcessingMixin | None = None,
        text_recipe: dict[str, Any] | None = None,
        default_width: int | None = None,
        default_height: int | None = None,
        refine_instruction: str | None = None,
        default_num_inference_steps: int | None = None,
        style_tags: dict[str, str] | None = None,
    ):
        super().__init__()
        # One dtype on a plain load: diffusers loads the UNet and VAE in float32 unless `dtype=` is given, while
        # transformers loads the text encoder in its stored dtype (float16). A text encoder in lower precision than
        # a float32 UNet is upcast (lossless), so a plain load is float32 throughout; `dtype=` still sets all three.
        if (
            isinstance(text_encoder, torch.nn.Module)
            and isinstance(unet, torch.nn.Module)
            and unet.dtype == torch.float32
            and text_encoder.dtype in (torch.float16, torch.bfloat16)
        ):
            text_encoder.to(torch.float32)
        if vision_processor is None:  # published layout: the image processor is kept with the tokenizer
            vision_processor = image_processor_from_tokenizer(tokenizer)
        self.register_modules(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            vision_processor=vision_processor,
        )
        # A pipeline may be loaded without its UNet or VAE (`from_pretrained(..., unet=None, vae=None)`: prompt
        # embeddings on one device, denoising on another): then the SDXS-1B factors stand in, as diffusers' pipelines
        # fall back to 8 without a VAE.
        self.vae_encoder_scale_factor, self.vae_scale_factor = vae_scale_factors(vae) if vae is not None else (8, 16)
        self.size_step = self.vae_scale_factor * (unet_size_multiple(unet) if unet is not None else 1)
        default_side = int(unet.config.sample_size) * self.vae_scale_factor if unet is not None else 1024
        self.register_to_config(
            text_recipe={**DEFAULT_TEXT_RECIPE, **(text_recipe or {})},
            default_width=int(default_width or default_side),
            default_height=int(default_height or default_side),
            refine_instruction=refine_instruction or DEFAULT_REFINE_INSTRUCTION,
            default_num_inference_steps=int(default_num_inference_steps or DEFAULT_NUM_INFERENCE_STEPS),
            style_tags=check_style_tags(style_tags),
        )
        # Postprocessing only (resize/normalise of pipeline images is done at the latent scale below).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def cross_attention_kwargs(self) -> dict[str, Any]:
        return self._cross_attention_kwargs

    def apply_style(self, prompt: str | list[str], style: str) -> str | list[str]:
        r"""
        The prompt(s) asking for one of the model's styles (`config.style_tags`): its caption tag replaces a style
        tag the prompt ends in, or is added (`"red apple"` with style "twemoji" -> `"red apple, flat"`).

        Args:
            prompt (`str` or `list[str]`): the prompt(s).
            style (`str`): a style's name or its tag, any case (`"twemoji"` or `"flat"`).
        """
        tags = dict(self.config.get("style_tags") or {})
        if not tags:
            raise ValueError(
                "style: this model declares no styles (its config's style_tags is empty); describe the style in the "
                "prompt instead."
            )
        name = find_style(tags, style)
        if name is None:
            choices = ", ".join(f"{name!r} ({tag})" for name, tag in tags.items())
            raise ValueError(f"style={style!r} is not one of this model's styles: {choices}; or leave style out.")
        tag = tags[name]
        if isinstance(prompt, str):
            return styled_prompt(prompt, tag, tags.values())
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return [styled_prompt(p, tag, tags.values()) for p in prompt]
        raise TypeError(f"prompt must be a str or a list of str to take a style, got {type(prompt).__name__}.")

    # ------------------------------------------------------------------------------------------------------------
    # Prompt encoding
    # ------------------------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r"""
        Encode prompts into `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_mask)`.

        Embeddings are (B * num_images_per_prompt, 1 + max_length, D) with the pooled vector first. The negative
        pair is `None` without classifier-free guidance; an absent negative prompt is the empty prompt.
        `lora_scale` scales text-encoder LoRA layers (if any) for this call.
        """
        device = device or self._execution_device
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        texts: list[str] = []
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(texts) if prompt_embeds is None else prompt_embeds.shape[0]
        need_negative = do_classifier_free_guidance and negative_prompt_embeds is None
        if need_negative:
            negative_prompt = negative_prompt or ""
            texts += batch * [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if texts:
            # One text-encoder pass for prompts and negatives, each distinct text once: the embeddings are
            # batch-invariant, so this equals encoding them separately.
            unique = list(dict.fromkeys(texts))
            emb, mask = self._encode_text(unique, device, lora_scale)
            index = torch.tensor([unique.index(t) for t in texts], device=emb.device)
            emb, mask = emb[index], mask[index]
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = emb[:batch], mask[:batch]
            if need_negative:
                negative_prompt_embeds, negative_prompt_attention_mask = emb[-batch:], mask[-batch:]
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
            )

        prompt_embeds = _repeat_rows(prompt_embeds, num_images_per_prompt, device).to(dtype)
        prompt_attention_mask = _repeat_rows(prompt_attention_mask, num_images_per_prompt, device)
        if do_classifier_free_guidance and negative_prompt_embeds is not None:
            negative_prompt_embeds = _repeat_rows(negative_prompt_embeds, num_images_per_prompt, device).to(dtype)
            negative_prompt_attention_mask = _repeat_rows(negative_prompt_attention_mask, num_images_per_prompt, device)
        else:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        # plain names, as `__call__` takes them: diffusers' tests feed encode_prompt's outputs back by these names
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    @torch.no_grad()
    def _encode_text(
        self, prompts: list[str], device: torch.device, lora_scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("This pipeline has no text encoder/tokenizer: pass `prompt_embeds` instead of `prompt`.")
        scaled = lora_scale is not None and USE_PEFT_BACKEND and bool(_peft_layers(self.text_encoder))
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            return encode_text(self.text_encoder, self.tokenizer, prompts, self.config.text_recipe, device=device)
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)

    # ------------------------------------------------------------------------------------------------------------
    # Input checks
    # ------------------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        strength: float,
        output_type: str,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        callback_on_step_end_tensor_inputs,
        image=None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator=None,
        batch_size: int | None = None,
    ) -> None:
        """Every check of `__call__`'s arguments, before any work: a `ValueError`/`TypeError` naming the argument."""
        self._check_size_and_sampling(height, width, num_inference_steps, guidance_scale, strength, image, output_type)
        self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        for name, emb, mask in (
            ("prompt", prompt_embeds, prompt_attention_mask),
            ("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            self._check_embeds(name, emb, mask)
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape[0] != negative_prompt_embeds.shape[0]
        ):
            raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same batch size.")
        self.check_scheduler()
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {bad}."
                )
        if seed is not None and generator is not None:
            raise ValueError("Pass either `seed` or `generator`, not both.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        n_prompts = len(prompt) if isinstance(prompt, list) else (1 if prompt is not None else prompt_embeds.shape[0])
        if batch_size is not None:
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
            if n_prompts not in (1, batch_size):
                raise ValueError(
                    f"`batch_size`={batch_size} but {n_prompts} prompts were given; pass 1 or {batch_size}."
                )
            n_prompts = batch_size
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
        if image is not None:
            self._check_image(image, n_prompts, n_prompts * num_images_per_prompt)

    def _check_size_and_sampling(
        self, height, width, num_inference_steps, guidance_scale, strength, image, output_type
    ):
        step = self.size_step
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
            if value < step or value % step:
                lo = value // step * step
                nearest = [v for v in (lo, lo + step) if v >= step]
                raise ValueError(
                    f"`{name}` must be a positive multiple of {step} for this model, got {value}; "
                    f"nearest valid sizes: {nearest}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        if strength is not None and image is None:
            raise ValueError(
                f"`strength`={strength} was given without `image`: strength is the img2img noise level; pass an "
                "`image=` to start from, or drop `strength` for text-to-image."
            )
        if strength is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must be in [0, 1], got {strength}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide a `prompt` (str or list of str) or `prompt_embeds`.")
        if prompt is not None:
            if isinstance(prompt, list):
                if not prompt or not all(isinstance(p, str) for p in prompt):
                    raise ValueError("`prompt` must be a non-empty list of strings.")
            elif not isinstance(prompt, str):
                raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if isinstance(negative_prompt, list):
            n = len(prompt) if isinstance(prompt, list) else (1 if prompt is not None else prompt_embeds.shape[0])
            if len(negative_prompt) != n:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but there are {n} prompts; "
                    "pass one negative prompt per prompt, or a single string."
                )
        elif negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a str or a list of str, got {type(negative_prompt).__name__}.")

    def _check_embeds(self, name: str, emb: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        if emb is None:
            return
        if emb.ndim != 3 or emb.shape[-1] != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"`{name}_embeds` must be (batch, tokens, {self.unet.config.cross_attention_dim}), "
                f"got {tuple(emb.shape)}."
            )
        if mask is None:
            raise ValueError(
                f"Must provide `{name}_attention_mask` when passing `{name}_embeds`: the embeddings are padded, and "
                "without the mask the UNet would attend to the padding. `pipe.encode_prompt(...)` and "
                "`pipe.encode_image(...)` return the mask with the embeddings: pass both."
            )
        if tuple(mask.shape) != tuple(emb.shape[:2]):
            raise ValueError(
                f"`{name}_attention_mask` must be {tuple(emb.shape[:2])} to match `{name}_embeds`, "
                f"got {tuple(mask.shape)}."
            )

    @staticmethod
    def _check_image(image, n_prompts: int, total: int) -> None:
        """img2img sources: 1, one per prompt or `total` images; tensors (B, 3, H, W) or (3, H, W)."""
        images = image if isinstance(image, list) else [image]
        count = 0
        for im in images:
            if isinstance(im, torch.Tensor):
                if im.ndim not in (3, 4) or im.shape[-3] != 3:
                    raise ValueError(f"A tensor `image` must be (B, 3, H, W) or (3, H, W), got {tuple(im.shape)}.")
                count += im.shape[0] if im.ndim == 4 else 1
            else:
                count += 1
        if count not in (1, n_prompts, total):
            raise ValueError(
                f"Got {count} `image`s for {n_prompts} prompt(s) and {total} images to make; pass 1, one per prompt "
                f"({n_prompts}) or one per image ({total})."
            )

    def check_scheduler(self) -> None:
        """Refuse a scheduler the flow-matching loop cannot drive, naming the supported ones."""
        sched = self.scheduler
        name = type(sched).__name__
        cfg = sched.config
        supported = (
            f"{', '.join(FLOW_MATCH_SCHEDULERS)}; and {', '.join(FLOW_SIGMA_SCHEDULERS)} configured with "
            '`use_flow_sigmas=True, prediction_type="flow_prediction"` (e.g. '
            "`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True, "
            'prediction_type="flow_prediction", flow_shift=pipe.scheduler.config.shift)`)'
        )
        if name in FLOW_MATCH_SCHEDULERS:
            if cfg.get("use_dynamic_shifting", False):
                raise ValueError(
                    f"{name} with `use_dynamic_shifting=True` needs a resolution-dependent `mu` this pipeline does not "
                    "compute; use a static `shift` (the model's scheduler config) instead."
                )
            return
        if name in FLOW_SIGMA_SCHEDULERS:
            if cfg.get("use_flow_sigmas", False) and cfg.get("prediction_type") == "flow_prediction":
                return
            raise ValueError(
                f"{name} must be configured for flow matching to drive this model (it predicts the velocity "
                f'noise - x0): pass `use_flow_sigmas=True, prediction_type="flow_prediction"`. Supported: {supported}.'
            )
        raise ValueError(f"This flow-matching model cannot be sampled with {name}. Supported schedulers: {supported}.")

    # ------------------------------------------------------------------------------------------------------------
    # Latents and timesteps
    # ------------------------------------------------------------------------------------------------------------

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gaussian noise (B, C, H / vae_scale_factor, W / vae_scale_factor), drawn on the CPU so that a seed gives
        the same image on every device."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(
                    f"Got {len(generator)} generators for {batch_size} images; pass one per image or a single one."
                )
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
        else:
            gen_device = generator.device if generator is not None else "cpu"
            noise = torch.randn(shape, generator=generator, device=gen_device)
        return noise.to(device=device, dtype=dtype)

    def prepare_image_latents(
        self, image, height: int, width: int, batch_size: int, device: torch.device
    ) -> torch.Tensor:
        """img2img source: resize to the output size, shrink by decoder factor / encoder factor (the VAE config's
        `vae_scale_factor // vae_encoder_scale_factor`) so the encoder's latents have the output's latent size,
        encode. `check_inputs` has checked the count (1, one per prompt or `batch_size`) and the tensor shapes."""
        images = image if isinstance(image, list) else [image]
        if all(isinstance(im, torch.Tensor) for im in images):  # (B, 3, H, W) or (3, H, W) in [0, 1]
            pixels = torch.cat([im if im.ndim == 4 else im[None] for im in images]).float()
            if pixels.min() < 0:  # as diffusers' VaeImageProcessor: [-1, 1] still works, with a deprecation warning
                warnings.warn(
                    "Passing `image` as a torch tensor with values in [-1, 1] is deprecated and will be removed: pass "
                    f"values in [0, 1] (diffusers' convention, and what `output_type='pt'` returns); got values in "
                    f"[{pixels.min().item():.3f}, {pixels.max().item():.3f}].",
                    FutureWarning,
                    stacklevel=4,
                )
            else:
                pixels = pixels * 2.0 - 1.0
            pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic").clamp(-1, 1)
        else:
            pils = [load_rgb_image(im).resize((width, height), PIL.Image.Resampling.LANCZOS) for im in images]
            pixels = torch.cat([self._image_to_tensor(p) for p in pils])
        r = self.vae_scale_factor // self.vae_encoder_scale_factor
        if r > 1:
            pixels = torch.nn.functional.interpolate(pixels, scale_factor=1 / r, mode="area")
        latents = self._vae_encode(pixels.to(device)).to(device)
        if latents.shape[0] != batch_size:  # one image for all, or one per prompt (kept with its prompt's images)
            latents = latents.repeat_interleave(batch_size // latents.shape[0], dim=0)
        return latents

    def _set_timesteps(self, num_inference_steps: int, device: torch.device) -> None:
        sched = self.scheduler
        if "sigmas" in inspect.signature(sched.set_timesteps).parameters and type(sched).__name__ in (
            FLOW_MATCH_SCHEDULERS
        ):
            # unshifted sigmas in: the scheduler applies the configured shift once (see `flow_sigmas`)
            sched.set_timesteps(sigmas=flow_sigmas(num_inference_steps), device=device)
        else:  # Heun, multistep solvers with flow sigmas: their own schedule from the step count
            sched.set_timesteps(num_inference_steps, device=device)

    def _prepare_timesteps(
        self, num_inference_steps: int, strength: float | None, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """(timesteps, index of the first): unshifted sigmas in, the scheduler applies its shift once; img2img
        (`strength` given) skips the first `1 - strength` of the schedule."""
        self._set_timesteps(num_inference_steps, device)
        timesteps = self.scheduler.timesteps
        start = 0
        if strength is not None:
            order = getattr(self.scheduler, "order", 1)
            start = (num_inference_steps - min(int(round(num_inference_steps * strength)), num_inference_steps)) * order
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start)
        self._num_timesteps = len(timesteps)
        return timesteps, start

    def _initial_latents(
        self, total: int, height: int, width: int, device, generator, latents, image, start: int
    ) -> torch.Tensor:
        """float32 noise (B, C, H / vae_scale_factor, W / vae_scale_factor), or the init image noised to the first
        sigma: x_s = (1 - s) x0 + s e."""
        latents = self.prepare_latents(total, height, width, torch.float32, device, generator, latents)
        if image is None:
            return latents
        image_latents = self.prepare_image_latents(image, height, width, total, device).float()
        sigma = self.scheduler.sigmas[start].to(device)
        return (1.0 - sigma) * image_latents + sigma * latents

    # ------------------------------------------------------------------------------------------------------------
    # __call__ and the steps it reads as
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        image: ImageInput | None = None,
        strength: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        style: str | None = None,
        **kwargs,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images from text (or from prompt embeddings, e.g. `encode_image`), optionally from an init image.

        Args:
            prompt (`str` or `list[str]`): what to draw. Mutually exclusive with `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): what to steer away from (needs guidance > 1).
            height, width (`int`, *optional*): output size in pixels, a multiple of `pipe.size_step`; defaults to the
                model's `default_height` / `default_width` (or the init image's size for img2img).
            num_inference_steps (`int`, *optional*): Euler steps from sigma 1 to 0; defaults to the model's
                `default_num_inference_steps` (chosen from its measured quality-per-step curve; 40 when unset).
            guidance_scale (`float`, defaults to 4.0): classifier-free guidance; 1 disables it (one UNet pass/step).
            num_images_per_prompt (`int`, defaults to 1): images per prompt. (`batch_size`, which repeated a single
                prompt, is deprecated: it is `num_images_per_prompt` and still works, with a warning.)
            seed (`int`, *optional*): image `i` uses `seed + i`, so image `i` of a batch equals a single call with that
                seed. Mutually exclusive with `generator`.
            generator (`torch.Generator` or a list of them, *optional*): diffusers-style randomness.
            latents (`torch.Tensor`, *optional*): initial noise (B, C, H / `pipe.vae_scale_factor`, W / ...).
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask: precomputed
                `(embeds, mask)` pairs as `encode_prompt` / `encode_image` return them (a mask goes with its embeds).
            image (*optional*): img2img source: path, PIL, HWC array, or tensor (B, 3, H, W) / (3, H, W) in [0, 1]
                (as diffusers' `VaeImageProcessor`; [-1, 1] still works with a deprecation warning), or a list.
            strength (`float`, *optional*, defaults to 0.6 with `image`): img2img noise level; 0 returns the
                (VAE-reconstructed) input, 1 ignores it. Without `image` it is a `ValueError`.
            output_type (`str`): "pil", "np", "pt" or "latent".
            return_dict (`bool`): return an `ImagePipelineOutput` (else a tuple whose `[0]` is the images).
            cross_attention_kwargs (`dict`, *optional*): passed to the UNet's attention processors; `{"scale": s}`
                scales loaded LoRA adapters for this call (UNet and text encoder; 0 gives the base model).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                `fn(pipe, step, timestep, callback_kwargs) -> dict`; returned tensors replace the pipeline's: "latents",
                "prompt_embeds" (with CFG the batched [negative, positive] conditioning, as `StableDiffusionPipeline`),
                "negative_prompt_embeds", "prompt_attention_mask". A `PipelineCallback` brings its own `tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): names passed in `callback_kwargs` (any of
                `pipe._callback_tensor_inputs`; default ["latents"]).
            style (`str`, *optional*): one of the model's styles (`pipe.config.style_tags`, by name or tag): its
                caption tag is put at the end of each prompt (`apply_style`); needs `prompt`, not `prompt_embeds`.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the generated images.

        Examples:
            ```py
            >>> pipe = DiffusionPipeline.from_pretrained(".", dtype=torch.float32, trust_remote_code=True)  # or hub id
            >>> image = pipe("grinning face, 3d render", negative_prompt="low quality", seed=0).images[0]
            >>> pipe.load_lora_weights("path/to/lora")  # img2img from it, with a LoRA at half strength:
            >>> edit = pipe("smiling face, 3d render", image=image, strength=0.6, cross_attention_kwargs={"scale": 0.5})
            ```
        """
        # 1. Defaults, the deprecated `batch_size`, and every input check
        batch_size = self._pop_deprecated_kwargs(kwargs)
        if style is not None:
            if prompt is None:
                raise ValueError("style needs a `prompt` (it adds a caption tag); with `prompt_embeds` leave it out.")
            prompt = self.apply_style(prompt, style)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        image = _numpy_to_tensor_images(image)
        height, width = self._default_size(image, height, width)
        if num_inference_steps is None:
            num_inference_steps = int(self.config.default_num_inference_steps)
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            strength,
            output_type,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            callback_on_step_end_tensor_inputs,
            image,
            num_images_per_prompt,
            seed,
            generator,
            batch_size,
        )
        if image is not None and strength is None:
            strength = 0.6
        self._guidance_scale = float(guidance_scale)
        self._cross_attention_kwargs = dict(cross_attention_kwargs or {})
        self._interrupt = False

        # 2. Batch and randomness: image `i` of `total` uses seed `seed + i`
        num_images_per_prompt, total = self._batch_shape(batch_size, prompt, prompt_embeds, num_images_per_prompt)
        if seed is not None:
            generator = [torch.Generator("cpu").manual_seed(seed + i) for i in range(total)]
        device = self._execution_device

        # 3. Encode the prompt: (B, 1 + L, D), pooled vector first; with CFG [negative, positive] in one batch
        conditioning = self._prepare_conditioning(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            device,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        )

        # 4. Timesteps (img2img starts part-way)
        timesteps, start = self._prepare_timesteps(num_inference_steps, strength, device)

        # 5. Initial latents: noise, or the init image noised to the first sigma
        latents = self._initial_latents(total, height, width, device, generator, latents, image, start)

        # 6. Denoising loop
        callback = (callback_on_step_end, callback_on_step_end_tensor_inputs)
        latents = self._denoise(latents, timesteps, conditioning, generator, *callback)

        # 7. Decode (the VAE decoder upsamples `vae_scale_factor` x)
        images = self._decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _pop_deprecated_kwargs(self, kwargs: dict) -> int | None:
        """`batch_size` (deprecated, see `_batch_shape`) out of `__call__`'s `**kwargs`; any other name is an error."""
        batch_size = kwargs.pop("batch_size", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.__call__() got unexpected keyword arguments {sorted(kwargs)}.")
        return batch_size

    def _default_size(self, image, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width): as given; else the init image's size rounded to `size_step`; else the config's."""
        default_w, default_h = self.config.default_width, self.config.default_height
        if image is not None and (width is None or height is None):
            first = image[0] if isinstance(image, list) else image
            if isinstance(first, torch.Tensor):
                first_w, first_h = first.shape[-1], first.shape[-2]
            else:
                first = load_rgb_image(first)
                first_w, first_h = first.width, first.height
            step = self.size_step
            default_w = max(step, round(first_w / step) * step)
            default_h = max(step, round(first_h / step) * step)
        return (default_h if height is None else height), (default_w if width is None else width)

    @staticmethod
    def _batch_shape(batch_size: int | None, prompt, prompt_embeds, num_images_per_prompt: int) -> tuple[int, int]:
        """(images per prompt, images in all), folding in the deprecated `batch_size`: a single prompt made
        `batch_size` times is `num_images_per_prompt` (the same images)."""
        n_prompts = len(prompt) if isinstance(prompt, list) else (1 if prompt is not None else prompt_embeds.shape[0])
        if batch_size is not None:
            deprecate(
                "batch_size",
                "1.0.0",
                "`batch_size` repeated a single prompt and duplicates `num_images_per_prompt`: pass "
                "`num_images_per_prompt` instead (the images are the same).",
                standard_warn=False,
            )
            if n_prompts == 1:
                num_images_per_prompt *= batch_size
        return num_images_per_prompt, n_prompts * num_images_per_prompt

    def _prepare_conditioning(
        self, prompt, negative_prompt, num_images_per_prompt: int, device: torch.device, *embeds
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(embeds, mask, negative embeds) the UNet attends to: (B, 1 + L, D) with the pooled vector first; with CFG
        one batched [negative, positive] conditioning, the shorter sequence padded with masked zeros."""
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            *embeds,
            lora_scale=self._cross_attention_kwargs.get("scale"),
        )
        if not self.do_classifier_free_guidance:
            return prompt_embeds.to(self.unet.dtype), prompt_mask, negative_embeds
        negative_embeds, prompt_embeds = _pad_to_same_length(negative_embeds, prompt_embeds)
        negative_mask, prompt_mask = _pad_to_same_length(negative_mask, prompt_mask)
        cond_embeds = torch.cat([negative_embeds, prompt_embeds]).to(self.unet.dtype)
        return cond_embeds, torch.cat([negative_mask, prompt_mask]), negative_embeds

    def _conditioning_from_callback(
        self, outputs: dict, cond_embeds: torch.Tensor, cond_mask: torch.Tensor, negative_embeds: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a callback's returned "prompt_embeds" / "negative_prompt_embeds" / "prompt_attention_mask"."""
        embeds = outputs.pop("prompt_embeds", None)
        mask = outputs.pop("prompt_attention_mask", None)
        negative = outputs.pop("negative_prompt_embeds", None)
        if embeds is None and negative is not None and negative is not negative_embeds:
            if negative_embeds is None or tuple(negative.shape) != tuple(negative_embeds.shape):
                raise ValueError(
                    "A callback returned `negative_prompt_embeds` of shape "
                    f"{tuple(negative.shape)}; it must keep the shape it was given "
                    f"{None if negative_embeds is None else tuple(negative_embeds.shape)} (and needs CFG)."
                )
            embeds = torch.cat([negative.to(cond_embeds), cond_embeds[negative.shape[0] :]])
        if embeds is None:
            if mask is not None:
                cond_mask = mask
            return cond_embeds, cond_mask
        if mask is None:
            if tuple(embeds.shape[:2]) == tuple(cond_mask.shape):
                mask = cond_mask
            elif embeds.shape[0] < cond_mask.shape[0] and embeds.shape[1] == cond_mask.shape[1]:
                mask = cond_mask[-embeds.shape[0] :]  # e.g. CFG cut off: the conditional rows come last
            else:
                raise ValueError(
                    f"A callback returned `prompt_embeds` of shape {tuple(embeds.shape)} that no known mask fits "
                    f"(the conditioning mask is {tuple(cond_mask.shape)}): return `prompt_attention_mask` too."
                )
        return embeds.to(device=cond_embeds.device, dtype=self.unet.dtype), mask.to(cond_mask.device)

    def _denoise(self, latents, timesteps, conditioning, generator, callback, tensor_inputs) -> torch.Tensor:
        """The sampling loop: latents stay float32, the UNet runs in its own dtype; CFG as one batched pass.
        `conditioning` is `_prepare_conditioning`'s (embeds, mask, negative embeds); a callback may replace them."""
        cond_embeds, cond_mask, negative_embeds = conditioning
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:  # stochastic samplers (LCM)
            step_kwargs["generator"] = generator[0] if isinstance(generator, list) else generator
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                velocity = self.unet(
                    model_input.to(self.unet.dtype),
                    t.expand(model_input.shape[0]),
                    encoder_hidden_states=cond_embeds,
                    encoder_attention_mask=cond_mask,
                    cross_attention_kwargs=dict(self._cross_attention_kwargs) or None,
                    return_dict=False,
                )[0].float()
                if self.do_classifier_free_guidance:
                    v_uncond, v_cond = velocity.chunk(2)
                    velocity = v_uncond + self.guidance_scale * (v_cond - v_uncond)
                latents = self.scheduler.step(velocity, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": cond_embeds,
                        "negative_prompt_embeds": negative_embeds,
                        "prompt_attention_mask": cond_mask,
                    }
                    outputs = callback(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                    latents = outputs.pop("latents", latents)
                    cond_embeds, cond_mask = self._conditioning_from_callback(
                        outputs, cond_embeds, cond_mask, negative_embeds
                    )
                progress_bar.update()
        return latents

    def _decode_latents(self, latents: torch.Tensor, output_type: str):
        """Latents -> images of `output_type` through the VAE decoder (`vae_scale_factor` x the latent size)."""
        if output_type == "latent":
            return latents
        return self.image_processor.postprocess(self._vae_decode(latents), output_type=output_type)

    # ------------------------------------------------------------------------------------------------------------
    # Image prompts: encode_image
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, image: ImageInput, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Embed image(s) through the text encoder's vision path, in exactly the prompt-embedding layout.

        Returns `(embeds, mask)` usable as `prompt_embeds` / `prompt_attention_mask`: `embeds[:, 0]` is the pooled
        vector (last token), the image tokens are capped so that the sequence fits `max_length`.

        Examples:
            ```py
            >>> emb, mask = pipe.encode_image("media/apple.png")  # (1, 251, D), (1, 251)
            >>> images = pipe(prompt_embeds=emb, prompt_attention_mask=mask, seed=0).images  # an image as the prompt
            ```
        """
        images = image if isinstance(image, (list, tuple)) else [image]
        embeds, mask = encode_images(
            self.text_encoder,
            self.tokenizer,
            self.vision_processor,
            images,
            self.config.text_recipe,
            device=device or self._execution_device,
        )
        self.maybe_free_model_hooks()
        return embeds, mask

    # ------------------------------------------------------------------------------------------------------------
    # Prompt refinement: refine_prompts
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def refine_prompts(
        self,
        prompt: str | list[str],
        instruction: str | None = None,
        max_new_tokens: int = 120,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
        keep_prompt: bool = True,
        generator: torch.Generator | None = None,
        add_skin_tone: bool = False,
        min_token_prob: float = 0.05,
        cut_after_unlikely: bool = True,
        **generate_kwargs,
    ) -> list[str]:
        r"""
        Expand short prompt(s) into detailed descriptions with the text encoder's own language-model head.

        Args:
            prompt (`str` or `list[str]`): the prompt(s) to refine.
            instruction (`str`, *optional*): system instruction; defaults to the pipeline's `refine_instruction`.
            max_new_tokens (`int`): length limit of each refined prompt in tokens.
            do_sample, temperature, top_p: sampling settings passed to `generate`.
            seed (`int`, *optional*): makes sampling reproducible.
            keep_prompt (`bool`, defaults to `True`): the answer starts with the prompt itself, closed by a comma,
                and the model only adds tags after it, so the refinement keeps what the user named (a small LM left
                free may answer "cat" with another subject, and one that may go on with the last word turns "rock"
                into "rocket"). `False`: the model writes the whole answer.
            generator (`torch.Generator`, *optional*): diffusers-style randomness instead of `seed` (one seed for
                the sampling is drawn from it, so the same generator state gives the same text).
            add_skin_tone (`bool`, defaults to `False`): keep a skin-tone tag ("medium skin tone") that the model
                adds to a prompt naming none. By default it is dropped: a tone makes another emoji ("woman cook" is
                the yellow one), so it is the user's choice, not the refiner's.
            min_token_prob (`float`, defaults to 0.05): an added tag is dropped when the model gave one of its tokens
                less than this probability (its own distribution, before temperature and top-p). Sampling now and then
                picks a token the model barely believes in, and the tag it starts is noise ("flag of Haiti, ...,
                bordan") or another emoji's keyword (see `docs/eval.md`, "refine_prompts' tags"). `0` keeps every tag.
            cut_after_unlikely (`bool`, defaults to `True`): also drop every tag after the first unlikely one: the
                model wrote them with that tag in view ("flag of Wales, gy, nation, country, banner" ends at the name;
                see `docs/eval.md`). `False` drops only the unlikely tags themselves.
            **generate_kwargs: further arguments of the text encoder's `generate` (`min_p`, `repetition_penalty`, ...).

        Returns:
            `list[str]`: one refined prompt per input prompt.

        Examples:
            ```py
            >>> pipe.refine_prompts("cat", do_sample=False)  # greedy; the shipped model: "cat, animal, ..., 3d render"
            >>> pipe.refine_prompts(["rocket", "blue heart"], generator=torch.Generator().manual_seed(0))
            ```
        """
        if generator is not None:
            if seed is not None:
                raise ValueError("Pass either `seed` or `generator`, not both.")
            if isinstance(generator, list):
                generator = generator[0]
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        prompts, tok = self._check_refine_inputs(prompt, max_new_tokens)
        if not 0.0 <= min_token_prob < 1.0:
            raise ValueError(f"`min_token_prob` must be in [0, 1), got {min_token_prob}; 0 keeps every tag.")
        instruction = self.config.refine_instruction if instruction is None else instruction
        chats = [
            tok.apply_chat_template(
                [{"role": "system", "content": instruction}, {"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in prompts
        ]
        # with keep_prompt the answer opens with the prompt, closed by a comma, and the model adds tags after it
        openings = [_opening(p) if keep_prompt else "" for p in prompts]
        te, device = self.text_encoder, self._execution_device
        # left padding so every row's generation starts right after its own prompt
        texts = [c + o for c, o in zip(chats, openings, strict=True)]
        enc = tok(texts, padding=True, padding_side="left", return_tensors="pt").to(device)
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = te.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                pad_token_id=tok.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
                **generate_kwargs,
            )
        self.maybe_free_model_hooks()
        new_ids = out.sequences[:, enc["input_ids"].shape[1] :].tolist()
        # log-probability of each chosen token under the model's own (unwarped) distribution
        logprobs = te.compute_transition_scores(
            out.sequences, out.logits, getattr(out, "beam_indices", None), normalize_logits=True
        )
        logprobs = logprobs.float().cpu()
        floor = math.log(min_token_prob) if min_token_prob > 0 else -math.inf
        # byte-level tokens keep their leading spaces, so "cat," + " animal" joins as the model meant
        answers = [
            o + ",".join(_kept_tags(_scored_pieces(ids, lp, tok, floor), cut_after_unlikely))
            for o, ids, lp in zip(openings, new_ids, logprobs.tolist(), strict=True)
        ]
        return [_tidy_refined(a, p, add_skin_tone) for a, p in zip(answers, prompts, strict=True)]

    def _check_refine_inputs(self, prompt, max_new_tokens: int):
        """`refine_prompts`' checks: prompts, a text encoder that can generate, a tokenizer with a chat template.
        Returns (list of prompts, the tokenizer)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("`prompt` is an empty list: pass at least one prompt to refine.")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("`prompt` must be a string or a list of strings.")
        te = self.text_encoder
        can_generate = te is not None and hasattr(te, "generate") and getattr(te, "can_generate", lambda: False)()
        if not can_generate:
            raise ValueError(
                f"`refine_prompts` needs a text encoder with a language-model head; {type(te).__name__} cannot "
                "generate. Use a causal LM such as Qwen3_5ForConditionalGeneration."
            )
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("`refine_prompts` needs a tokenizer with a chat template; this tokenizer has none.")
        return prompts, tok

    # ------------------------------------------------------------------------------------------------------------
    # The VAE: encode at `vae_encoder_scale_factor`, decode at `vae_scale_factor`; image_upscale
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def image_upscale(
        self,
        image: ImageInput,
        tile_size: int = 512,
        tile_overlap: int = 64,
        max_pixels: int | None = 2048 * 2048,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]:
        r"""
        Upscale image(s) with the asymmetric VAE: encode at `vae_encoder_scale_factor`, decode at `vae_scale_factor`
        (a "blind" latent upscaler; their ratio is the upscale, 2x for the shipped 4x/8x VAE).

        Args:
            image: a path, a PIL image, a numpy array or a list of them. Any mode (RGBA, palette, greyscale, 16-bit)
                and EXIF orientation are handled; sizes that are not multiples of the encoder factor are padded and
                cropped back.
            tile_size (`int`): inputs larger than this (pixels per side) go through overlapping tiles, so memory stays
                bounded; must be a multiple of the encoder factor.
            tile_overlap (`int`): overlap of neighbouring tiles in input pixels; seams are blended linearly.
            max_pixels (`int`, *optional*): refuse (`ValueError`, before any work) inputs with more pixels than this;
                the default 2048x2048 takes minutes on a CPU. `None`: no limit. Tiled inputs show a progress bar
                over tiles (`set_progress_bar_config` turns it off).
            generator (`torch.Generator`, *optional*): without one the encoder's posterior mode is decoded
                (deterministic); with one a latent is sampled from the posterior with it (diffusers'
                `retrieve_latents(..., sample_mode="sample")`), reproducibly.
            output_type (`str`, defaults to "pil"): "pil", "np" (HWC float in [0, 1]) or "pt" (CHW float in [0, 1]).

        Returns:
            A list with one image per input (a list even for "np"/"pt": sizes may differ), each exactly
            (decoder factor / encoder factor) = 2x the input size.

        Examples:
            ```py
            >>> big = pipe.image_upscale("media/apple.png")[0]  # 128 px -> 256 px PIL image
            >>> arrays = pipe.image_upscale([big, "media/apple.png"], output_type="np")
            ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be one of ('pil', 'np', 'pt'), got {output_type!r}.")
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("`image` is an empty list: pass at least one image or path.")
        enc = self.vae_encoder_scale_factor
        if tile_size % enc or tile_size < 4 * enc:
            raise ValueError(f"`tile_size` must be a multiple of {enc} and at least {4 * enc}, got {tile_size}.")
        if not 0 <= tile_overlap <= tile_size // 2 or tile_overlap % enc:
            raise ValueError(f"`tile_overlap` must be a multiple of {enc} in [0, tile_size/2], got {tile_overlap}.")
        pils = [load_rgb_image(im) for im in images]
        for i, pil in enumerate(pils):
            if max_pixels is not None and pil.width * pil.height > max_pixels:
                raise ValueError(
                    f"image {i} is {pil.width}x{pil.height} = {pil.width * pil.height} pixels, more than "
                    f"`max_pixels`={max_pixels}; pass a larger `max_pixels` (or None) to upscale it anyway."
                )
        results = []
        for pil in pils:
            up = self._upscale_one(pil, tile_size, tile_overlap, generator)
            results.append(self.image_processor.postprocess(up, output_type=output_type)[0])
        self.maybe_free_model_hooks()
        return results

    def _upscale_one(self, pil: PIL.Image.Image, tile_size: int, tile_overlap: int, generator) -> torch.Tensor:
        """One RGB image -> (1, 3, rH, rW) in [-1, 1] on the CPU, r = decoder factor / encoder factor; padded to the
        encoder's multiple with edge pixels and cropped back; tiled (with a progress bar) above `tile_size`."""
        enc = self.vae_encoder_scale_factor
        r = self.vae_scale_factor // enc
        w, h = pil.size
        pixels = self._image_to_tensor(pil)
        ph, pw = (-h) % enc, (-w) % enc
        if ph or pw:
            pixels = torch.nn.functional.pad(pixels, (0, pw, 0, ph), mode="replicate")

        def reconstruct(x: torch.Tensor) -> torch.Tensor:  # (1, 3, H, W) -> (1, 3, rH, rW)
            z = self._vae_encode(x) if generator is None else self._vae_encode(x, generator, sample=True)
            return self._vae_decode_whole(z)

        if max(h + ph, w + pw) > tile_size:
            n_tiles = len(_tile_starts(h + ph, tile_size, tile_overlap)) * len(
                _tile_starts(w + pw, tile_size, tile_overlap)
            )
            with self.progress_bar(total=n_tiles) as bar:

                def reconstruct_tile(x: torch.Tensor) -> torch.Tensor:
                    out = reconstruct(x)
                    bar.update()
                    return out

                up = _blend_tiles(pixels, tile_size, tile_overlap, r, reconstruct_tile).cpu()
        else:
            up = reconstruct(pixels).cpu()
        return up[:, :, : h * r, : w * r]

    def _image_to_tensor(self, image: PIL.Image.Image) -> torch.Tensor:
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)

    def _vae_encode(self, pixels: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/e, W/e), e = `vae_encoder_scale_factor`; H, W
        multiples of e."""
        vae = self.vae
        out = vae.encode(pixels.to(vae.device, vae.dtype))
        if hasattr(out, "latent_dist"):  # diffusers' retrieve_latents rule: a KL VAE's posterior, or plain latents
            latents = out.latent_dist.sample(generator) if sample else out.latent_dist.mode()
        elif hasattr(out, "latents"):  # e.g. AutoencoderTiny
            latents = out.latents
        else:
            raise AttributeError(f"{type(vae).__name__}.encode returned neither `latent_dist` nor `latents`.")
        return normalize_latents(latents, vae)  # with the config's latents_mean/latents_std when it has them

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, C, h, w) -> pixels (B, 3, d h, d w) in [-1, 1], float32, d = `vae_scale_factor`;
        sliced/tiled if enabled."""
        if getattr(self, "_vae_slicing", False) and latents.shape[0] > 1:
            return torch.cat([self._vae_decode(z) for z in latents.split(1)])
        tiling = getattr(self, "_vae_tiling", None)
        if tiling is not None and max(latents.shape[-2:]) > tiling[0]:
            return _blend_tiles(latents, tiling[0], tiling[1], self.vae_scale_factor, self._vae_decode_whole)
        return self._vae_decode_whole(latents)

    def _vae_decode_whole(self, latents: torch.Tensor) -> torch.Tensor:
        """One decoder pass; never NaN: an fp16 decode that overflows is repeated in fp32."""
        vae = self.vae
        z = denormalize_latents(latents.to(vae.device, vae.dtype), vae)
        image = vae.decode(z).sample
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            logger.warning("VAE decode overflowed in %s; decoding again in float32.", vae.dtype)
            dtype = vae.dtype
            vae.to(torch.float32)
            try:
                image = vae.decode(z.float()).sample
            finally:
                vae.to(dtype)
        return image.float().clamp(-1, 1)

    def enable_vae_tiling(self, tile_latents: int = 64, overlap_latents: int = 8) -> None:
        """Decode latents larger than `tile_latents` in overlapping tiles blended linearly: bounded memory for big
        images (a 64-latent tile is 64 x `vae_scale_factor` px: 512 px for the shipped 8x decoder)."""
        if tile_latents < 4 or not 0 <= overlap_latents <= tile_latents // 2:
            raise ValueError(
                f"`tile_latents` must be >= 4 and `overlap_latents` in [0, tile_latents/2], "
                f"got {tile_latents} and {overlap_latents}."
            )
        self._vae_tiling = (tile_latents, overlap_latents)

    def disable_vae_tiling(self) -> None:
        self._vae_tiling = None

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (lower peak memory for large batches)."""
        self._vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self._vae_slicing = False

    SPEEDUPS = ("channels_last", "fused_qkv", "compile", "cuda_graphs")

    # ------------------------------------------------------------------------------------------------------------
    # Speed features
    # ------------------------------------------------------------------------------------------------------------

    def enable_speedups(self, *features: str) -> None:
        """Opt-in UNet speed features; SDPA attention needs none (diffusers uses it whenever torch has it).

        - `channels_last`: NHWC memory format for the UNet's convolutions (tensor cores prefer it).
        - `fused_qkv`: one projection for query, key and value in self-attention (`unet.fuse_qkv_projections()`).
        - `compile`: regional `torch.compile` of the repeated transformer blocks
          (`unet.compile_repeated_blocks(fullgraph=True)`): short compile time, no recompile for a new prompt
          or seed (prompts are padded to a fixed length and timesteps are tensors); a new image size compiles once.
        - `cuda_graphs`: `torch.compile(mode="reduce-overhead")` of the whole UNet, which replays CUDA graphs
          (less CPU launch overhead per step; CUDA only, one graph per image size; not with `compile`).

        Call after `.to(device)`. Measured by `bench/bench_speed_features.py` (docs/benchmarks.md).
        """
        unknown = [f for f in features if f not in self.SPEEDUPS]
        if unknown:
            raise ValueError(f"unknown speed feature(s) {unknown}: choose from {list(self.SPEEDUPS)}.")
        if "compile" in features and "cuda_graphs" in features:
            raise ValueError("`compile` and `cuda_graphs` both compile the UNet: pick one (`cuda_graphs` on CUDA).")
        if "cuda_graphs" in features and self.unet.device.type != "cuda":
            raise ValueError(f"`cuda_graphs` needs the UNet on CUDA, it is on {self.unet.device}: use `compile`.")
        if "channels_last" in features:
            self.unet.to(memory_format=torch.channels_last)
        if "fused_qkv" in features:
            self.unet.fuse_qkv_projections()
        if "compile" in features:
            self.unet.compile_repeated_blocks(fullgraph=True)
        if "cuda_graphs" in features:
            self.unet.compile(mode="reduce-overhead")

    # ------------------------------------------------------------------------------------------------------------
    # Saving: a reloadable custom-code repository
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # A saved SDXS folder names its class as custom code (["pipeline", "SDXSPipeline"], for the hub), which makes
        # diffusers load the folder's own pipeline.py even when this class's from_pretrained was called explicitly,
        # and demand trust_remote_code. Called on this class, the class is this one: no remote code runs. (Through
        # DiffusionPipeline.from_pretrained, cls is DiffusionPipeline and the custom-code path is unchanged.)
        config = super()._dict_from_json_file(json_file)
        if list(config.get("_class_name") or ()) == HUB_CLASS_NAME:
            config["_class_name"] = cls.__name__
        return config

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""
        Save the pipeline as a repository that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
        reloads: diffusers' component folders, `pipeline.py` (this pipeline's own source) beside
        `model_index.json`, and `_class_name` as `["pipeline", "SDXSPipeline"]`.

        Fused LoRA (`fuse_lora()`) is saved baked into the weights; unfused LoRA adapters are refused (fuse them,
        unload them, or save them alone with `save_lora_weights`). Arguments as `DiffusionPipeline.save_pretrained`.

        Examples:
            ```py
            >>> pipe.fuse_lora()
            >>> pipe.save_pretrained("my-sdxs")
            >>> again = DiffusionPipeline.from_pretrained("my-sdxs", trust_remote_code=True)
            ```
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token") if k in kwargs}
        repo_id = kwargs.pop("repo_id", None)
        target = self._without_fused_lora_layers()
        DiffusionPipeline.save_pretrained(
            target,
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=False,
            **kwargs,
        )
        write_hub_files(save_directory)
        if push_to_hub:  # push_to_hub saves again (through this method) into a temporary folder and uploads it
            repo_id = repo_id or os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1]
            self.push_to_hub(repo_id, safe_serialization=safe_serialization, variant=variant, **hub_kwargs)

    def _without_fused_lora_layers(self) -> SDXSPipeline:
        """`self`, or a shallow copy whose LoRA-carrying models are deep copies with the (fused) LoRA layers removed."""
        carriers = {n: _peft_layers(getattr(self, n, None)) for n in self._lora_loadable_modules}
        carriers = {n: layers for n, layers in carriers.items() if layers}
        if not carriers:
            return self
        unfused = [n for n, layers in carriers.items() if not all(layer.merged for layer in layers)]
        if unfused:
            raise ValueError(
                f"{unfused} carry LoRA adapters that are not fused: `save_pretrained` would write peft layers a plain "
                "load cannot read. Call `pipe.fuse_lora()` first to save them baked into the weights, "
                "`pipe.unload_lora_weights()` to drop them, or save the adapters alone with `save_lora_weights`."
            )
        from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch

        components = dict(self.components)
        for name in carriers:
            model = copy.deepcopy(components[name])
            if hasattr(model, "unload_lora"):  # diffusers ModelMixin
                model.unload_lora()
            else:  # a transformers model with diffusers-injected LoRA
                _remove_text_encoder_monkey_patch(model)
            components[name] = model
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in components}
        return type(self)(**components, **config)


def _numpy_to_tensor_images(image):
    """diffusers' numpy images ((H, W, 3) or (N, H, W, 3) float in [0, 1]) -> one (N, 3, H, W) tensor (the tensor
    path: no 8-bit rounding); uint8 batches -> a list of (H, W, 3) arrays (the PIL path). Anything else as it is."""

    def convert(im):
        if not isinstance(im, np.ndarray) or im.ndim not in (3, 4) or im.shape[-1] != 3:
            return [im]
        if im.dtype == np.uint8:
            return list(im) if im.ndim == 4 else [im]
        arr = im.astype(np.float32)
        return [torch.from_numpy(arr if arr.ndim == 4 else arr[None]).permute(0, 3, 1, 2).contiguous()]

    if image is None:
        return None
    items = [x for im in (image if isinstance(image, list) else [image]) for x in convert(im)]
    return items if isinstance(image, list) or len(items) > 1 else items[0]


def _repeat_rows(x: torch.Tensor, n: int, device) -> torch.Tensor:
    """(B, ...) -> (B * n, ...) on `device`, each row n times in a row (prompt i's images stay together)."""
    return x.to(device).repeat_interleave(n, dim=0)


def _pad_to_same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad dim 1 of the shorter tensor (embeddings or masks) so both can share one batched UNet call."""
    n = max(a.shape[1], b.shape[1])

    def pad(x):
        if x.shape[1] == n:
            return x
        extra = torch.zeros((x.shape[0], n - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
        return torch.cat([x, extra], dim=1)

    return pad(a), pad(b)


def _blend_tiles(
    x: torch.Tensor, tile: int, overlap: int, scale: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn` ((B, C, h, w) -> (B, C', h*scale, w*scale)) to overlapping tiles of `x` and blend the results.

    Tiles start every `tile - overlap` pixels (the last one flush with the edge); inside overlaps the weights ramp
    linearly and sum to one. Only an `fn` whose every output pixel depends on its own input pixel alone gives
    exactly the untiled result; a VAE decoder (convolutions, mid-block attention) sees one tile at a time, so the
    tiled image is close to the untiled one, not equal, and the ramps hide the seams.
    """
    _, _, h, w = x.shape
    out = weight = None
    for y in _tile_starts(h, tile, overlap):
        for x0 in _tile_starts(w, tile, overlap):
            part = fn(x[:, :, y : y + tile, x0 : x0 + tile]).float()
            th, tw = part.shape[-2] // scale, part.shape[-1] // scale
            if out is None:
                out = torch.zeros(x.shape[0], part.shape[1], h * scale, w * scale, device=part.device)
                weight = torch.zeros(1, 1, h * scale, w * scale, device=part.device)
            ramp_y = _ramp(th * scale, overlap * scale, y > 0, y + th < h).to(part.device)
            ramp_x = _ramp(tw * scale, overlap * scale, x0 > 0, x0 + tw < w).to(part.device)
            wgt = (ramp_y[:, None] * ramp_x[None, :])[None, None]
            out[:, :, y * scale : (y + th) * scale, x0 * scale : (x0 + tw) * scale] += part * wgt
            weight[:, :, y * scale : (y + th) * scale, x0 * scale : (x0 + tw) * scale] += wgt
    return out / weight.clamp_min(1e-8)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the tiles along one axis of length `n`: every `tile - overlap`, the last flush with the edge."""
    s = list(range(0, max(n - tile, 0) + 1, tile - overlap))
    if s[-1] + tile < n:
        s.append(n - tile)
    return s


def _ramp(n: int, overlap: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Per-pixel blend weight along one axis of a tile: linear ramps over the overlaps, 1 elsewhere."""
    w = torch.ones(n)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if fade_in:
            w[:overlap] = ramp
        if fade_out:
            w[-overlap:] = ramp.flip(0)
    return w


def _opening(prompt: str) -> str:
    """How a refined answer opens with `keep_prompt`: the prompt closed by a comma, so the model adds tags after
    the name instead of going on with its last word."""
    return prompt.strip().rstrip(",").rstrip() + ","


def _scored_pieces(ids: list[int], logprobs: list[float], tok, floor: float) -> list[tuple[str, bool]]:
    """The text of generated token `ids` split at its commas, each piece with whether every token behind it had a
    log-probability >= `floor`."""
    text, char_lp = "", []  # the decoded text so far and, per character, the lowest log-prob of the tokens behind it
    for k, lp in enumerate(logprobs):
        # decode the growing prefix: a character split over byte-level tokens comes out whole once its last byte is in
        now = tok.decode(ids[: k + 1], skip_special_tokens=True)
        same = len(os.path.commonprefix([text, now]))
        redone = min(char_lp[same:], default=0.0)  # a half-decoded character replaced now: it keeps its first bytes' lp
        char_lp = char_lp[:same] + [min(lp, redone)] * (len(now) - same)
        text = now
    pieces, start = [], 0
    for piece in text.split(","):
        end = start + len(piece)
        pieces.append((piece, min(char_lp[start:end], default=0.0) >= floor))
        start = end + 1
    return pieces


def _kept_tags(pieces: list[tuple[str, bool]], cut_after_unlikely: bool) -> list[str]:
    """The texts of `_scored_pieces` with the unlikely ones emptied; with `cut_after_unlikely` every piece after the
    first unlikely one too."""
    kept = []
    for text, ok in pieces:
        if not ok and cut_after_unlikely:
            break
        kept.append(text if ok else "")
    return kept


def _tidy_refined(answer: str, prompt: str, add_skin_tone: bool) -> str:
    """A refined answer as comma-separated tags: empty tags gone, and (unless `add_skin_tone` or the prompt names
    one) no skin-tone tag."""
    tags = [t.strip() for t in answer.split(",")]
    asked = any(SKIN_TONE_TAG.match(t.strip()) for t in prompt.split(","))
    return ", ".join(t for t in tags if t and (add_skin_tone or asked or not SKIN_TONE_TAG.match(t)))
