"""Training recipes: one dataclass per concern, a note on each default, loaded from TOML/JSON plus key=value overrides.

A recipe file lists only what differs from these defaults (see configs/). Sections are the dataclass fields of the
trainer's config (`[run]`, `[model]`, `[data]`, `[optim]`, `[ema]`, ...); an unknown section or key is an error, and
so is a value of the wrong type. Overrides on the command line use dotted names and are parsed by the field's type:

    sdxs train unet --config configs/tiny/unet.toml optim.lr=3e-4 run.max_steps=200 sample.prompts='["a cat"]'

Why TOML: recipes need comments ("why this value"), which JSON lacks. `tomllib` is in the standard library from
Python 3.11; on 3.10 the identical `tomli` package is used. JSON recipes are accepted too (same schema).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxs.data.captions import CaptionAugmentConfig

# ----------------------------------------------------------------------------------------------------------------
# Concerns shared by all trainers
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Where the run lives, how long it is, how it logs and saves."""

    output_dir: str = "runs/default"  # checkpoints/, samples/, metrics.jsonl, loss.png, export/ go here
    seed: int = 0  # global seed; rank r draws noise/dropout from seed + r, model init uses seed
    max_steps: int = 1000  # optimiser steps (one step = grad_accum micro-batches on every rank)
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (autocast through accelerate; fp32 master weights)
    gradient_checkpointing: bool = False  # trade ~30% compute for activation memory
    log_every: int = 10  # steps between metrics.jsonl lines and progress-bar updates
    checkpoint_every: int = 500  # steps between checkpoints (0: only the final one)
    # also checkpoint once this many minutes have passed since the last one (0: off): bounds what a hard stop (a
    # session ending, a killed machine) loses when steps are slow, whatever checkpoint_every is
    checkpoint_every_minutes: float = 0.0
    keep_last: int = 3  # periodic checkpoints kept besides the final one
    # on --resume, a data plan other than the checkpoint's (data.sample_weights, balance, batch size, another
    # cache) starts the next epoch under the new plan instead of being refused; the weights, optimizer, EMA and
    # LR schedule carry on. Changes a long run's mix without a fork (and without a fresh optimizer)
    replan_data: bool = False
    sample_every: int = 0  # steps between validation grids (0: none during training; one at the end if prompts)
    export_at_end: bool = True  # write output_dir/export (hub layout) after the final checkpoint
    progress_bar: bool = True  # tqdm on the main process


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = (
        "auto"  # "auto" (AdamW8bit on CUDA when bitsandbytes loads, else torch AdamW) | "adamw" | "adamw8bit"
    )
    lr: float = 1e-4  # peak learning rate after warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam moments
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay
    eps: float = 1e-8  # Adam epsilon
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many optimiser steps
    schedule: str = "constant"  # after warmup: "constant" | "cosine" (down to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.1  # floor of the cosine schedule (and of decay_steps), as a fraction of lr
    # constant schedule only: a linear cool-down to min_lr_ratio * lr over the last `decay_steps` steps before
    # run.max_steps (warmup-stable-decay). A constant run resumed with run.max_steps = step + N and decay_steps = N
    # anneals from where it is; 0: no cool-down.
    decay_steps: int = 0
    # `--resume` with another run.max_steps than the checkpoint's plan (cosine only):
    # "replan": the LR is the one of a run planned for the new max_steps from step 0 (exactly that schedule; when a
    #   run is extended the LR jumps up at the resume step to where the longer plan is, then decays);
    # "continue": from the LR the old plan had reached at the resume step, cosine down to min_lr at the new
    #   max_steps (no jump; the decay is stretched over the remaining steps).
    extend: str = "replan"
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimiser step (effective batch = batch * grad_accum * ranks)


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, stepped every optimiser step, saved beside the raw weights."""

    enabled: bool = False  # keep an EMA copy (costs one extra model in memory)
    decay: float = 0.999  # ema = d * ema + (1 - d) * weights, d = min(decay, (1+step)/(10+step)); ~1/(1-decay) steps
    use_for_export: bool = True  # export (and samples) use the EMA weights when there are any


@dataclass
class SampleConfig:
    """Validation grids made through the real SDXSPipeline on the main process."""

    prompts: list[str] = field(default_factory=list)  # fixed prompts (empty: no grids)
    seed: int = 0  # image i of the grid uses seed + i: the same noise at every step, so grids are comparable
    steps: int = 20  # Euler steps
    guidance_scale: float = 4.0  # classifier-free guidance of the samples
    width: int = 0  # 0: the model's default size
    height: int = 0


# ----------------------------------------------------------------------------------------------------------------
# UNet (flow matching)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class UNetModelConfig:
    """Where the UNet comes from and which pipeline it belongs to."""

    pretrained: str = (
        ""  # hub folder (VAE, text encoder, tokenizer, scheduler; default starting UNet) = prepare's model
    )
    unet_preset: str = ""  # build a fresh UNet of this preset (tiny | emoji | sdxs-1b) instead of pretrained's UNet
    init_from: str = ""  # load every tensor whose name and shape match from this UNet folder (grow a model)


@dataclass
class LatentDataConfig:
    """The latent cache written by `sdxs data prepare`."""

    path: str = ""  # folder with the manifest and shards
    batch_size: int = 16  # per rank, per micro-batch
    sample_posterior: bool = True  # latents = mean + std * noise from the cached posterior (false: the mean only)
    # draw groups of images evenly instead of images: files whose names are equal once this regex's matches are
    # deleted are one group ("-1f3f[b-f]": an emoji's skin tones); "" samples every image equally
    balance_pattern: str = ""
    balance_power: float = 1.0  # a group of n images weighs n ** (1 - power): 1 groups equal, 0 images equal
    # a .csv / .jsonl with file_name,weight: how often each image is drawn, times the balance (unlisted: 1)
    sample_weights: str = ""
    # encode each batch's captions in the training loop with the model's (frozen) text encoder instead of reading
    # the cached embeddings: no text in the cache needed at scale; always on when `captions.probability` > 0
    text_on_the_fly: bool = False


@dataclass
class FlowConfig:
    """Flow-matching noise levels: x_s = (1 - s) x0 + s e, target e - x0 (the pipeline's convention)."""

    timestep_sampling: str = "logit_normal"  # "uniform" | "logit_normal" (SD3: more weight on middle noise levels)
    logit_mean: float = 0.0  # mean of the normal before the sigmoid
    logit_std: float = 1.0  # std of the normal before the sigmoid
    shift: float = 0.0  # 0: the scheduler's configured shift (what inference uses); else this value
    caption_dropout: float = 0.1  # fraction of samples conditioned on the cached empty prompt (enables CFG)
    # fraction of samples conditioned on encode_image of their own image instead of a caption (image prompts);
    # needs a cache made with `sdxs prepare --image-embeds`. Drawn before caption dropout.
    image_prompt_fraction: float = 0.0
    # image-prompt samples draw their noise level from [this, 1] instead of [0, 1] (the sampled level mapped
    # linearly): a prompt decides the picture only at high noise (experiments/cond_gap.py), so spend them there
    image_prompt_min_sigma: float = 0.0


@dataclass
class UNetTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/unet"))
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    captions: CaptionAugmentConfig = field(default_factory=CaptionAugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------------------------------------------
# UNet LoRA (flow matching, adapters only)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoRAModelConfig:
    """The pipeline whose UNet gets the adapters (also the model `sdxs prepare` encoded the data with)."""

    pretrained: str = ""  # hub folder: its UNet stays frozen; VAE, text encoder and scheduler for samples/export


@dataclass
class LoRAConfig:
    """peft `LoraConfig` of the UNet adapters: W x + (alpha / rank) * B A x on each target module."""

    rank: int = 8  # r: inner size of A (r x in) and B (out x r); adapter size grows linearly with it
    alpha: float = 8.0  # lora_alpha: the update is scaled by alpha / rank (alpha = rank: scale 1)
    # module names (or name suffixes) that get adapters: the attention projections, as diffusers' LoRA scripts do
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0  # lora_dropout on the adapter input (regularises a very small style set)


@dataclass
class LoRATrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/lora"))
    model: LoRAModelConfig = field(default_factory=LoRAModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    # weight decay would shrink the adapters back toward the base model: off
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0))
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class VAEModelConfig:
    pretrained: str = ""  # hub folder whose vae/ is the starting point (and the pipeline for export)
    vae_preset: str = ""  # build a fresh AsymmetricAutoencoderKL of this preset instead
    init_from: str = ""  # load every tensor whose name and shape match from this VAE folder
    # false: fine-tune the decoder only (SD's ft-MSE recipe). The encoder, the latent space and scaling_factor stay
    # as they are, so a UNet and a latent cache made with this VAE remain valid; needs pretrained or init_from.
    train_encoder: bool = True


@dataclass
class ImageDataConfig:
    path: str = ""  # image folder (captions are ignored by the VAE trainer)
    resolution: int = 256  # side of the decoder's output crop; the encoder sees resolution / 2
    batch_size: int = 8  # per rank, per micro-batch
    # how images are resized to `resolution` (PIL filter): "lanczos" (sharp), or "box" (the pixel average, the
    # reference `sdxs eval` scores reconstructions against), "bicubic", "bilinear"
    resample: str = "lanczos"
    # a .csv / .jsonl with file_name (relative to `path`),weight: how often each image is drawn (unlisted: 1), e.g.
    # one style of a multi-style dataset more often than the others
    sample_weights: str = ""


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0  # mean absolute error on pixels in [-1, 1]
    mse_weight: float = 0.0  # mean squared error on pixels
    kl_weight: float = 1e-6  # KL of the posterior to N(0, 1): keeps the latent space smooth, small to keep detail
    edge_weight: float = 0.1  # L1 between Sobel edge maps: sharpens the 2x upscale
    lpips_weight: float = 0.0  # perceptual loss; needs lpips_path (local weights, never downloaded)
    lpips_path: str = ""  # a local LPIPS weights file for the `lpips` package
    stats_batches: int = 8  # batches used at the end to measure latent channel statistics
    # how the measured statistics go into the VAE config (pipeline, prepare and training all read them from there):
    # "scalar": scaling_factor = 1 / std over all channels (the emoji recipe); "per_channel": latents_mean and
    # latents_std per channel with scaling_factor 1, applied as diffusers' SDXL/Flux pipelines do (issue 19)
    latent_normalization: str = "scalar"


@dataclass
class VAETrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/vae"))
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TextModelConfig:
    pretrained: str = ""  # hub folder whose text_encoder/ + tokenizer/ are the starting point
    preset: str = "tiny"  # otherwise: Qwen3.5 shape of this preset, from scratch
    vocab_size: int = 0  # tokenizer vocabulary trained on the captions (0: the preset's)
    # how that tokenizer reads text: "preset" (the preset's), "none", or names from sdxs.tokenizer
    # ("nfkc,lowercase,prefix-space"); pinned in a recipe so a reproduction trains the tokenizer the model shipped with
    tokenizer_normalization: str = "preset"
    dtype: str = "fp32"  # "fp32" | "bf16" (fp16 is refused: Qwen3.5's linear attention overflows in it)
    # 0: train everything. N > 0: only the language model's last N decoder layers and its final norm (embeddings, the
    # tied LM head and the vision tower stay frozen). 1 keeps the hidden states the UNet reads (the layer before the
    # last) exactly as they were: a `refine_prompts` fine-tune of a shipped model that leaves its images unchanged
    train_layers: int = 0


@dataclass
class TextDataConfig:
    path: str = ""  # image folder with captions (sdxs.data.folder layout)
    batch_size: int = 8  # sequences per rank, per micro-batch
    max_length: int = 256  # tokens per training sequence (image tokens included)
    instruction_fraction: float = 0.3  # share of short prompt -> full caption pairs (for refine_prompts)
    image_fraction: float = 0.3  # share of image -> caption pairs through the vision tower (for encode_image)
    image_size: int = 64  # side of the images fed to the vision tower
    short_words: int = 3  # a "short prompt" is the caption's first comma-separated tags, at most this many words
    # what the user says in an instruction pair: "words" (the caption's first tags, `short_words` words) or
    # "first_line" (the item's first caption line, answered with one of its other lines: `sdxs data emoji` writes the
    # bare name and tones first, so "woman cook" is answered with a caption of the yellow woman cook, never a toned one)
    short_prompt: str = "words"


@dataclass
class TextEncoderTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/text_encoder"))
    model: TextModelConfig = field(default_factory=TextModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    ema: EMAConfig = field(default_factory=EMAConfig)


# ----------------------------------------------------------------------------------------------------------------
# Text alignment (the text encoder through the frozen UNet)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TextAlignModelConfig:
    """The model whose text encoder learns the rewrites (its UNet stays frozen; also prepare's model)."""

    pretrained: str = ""  # hub folder
    train_layers: int = -1  # decoder layers trained from the bottom (-1: every layer below text_recipe.hidden_layer)
    # also train the token-embedding rows (special tokens excepted). Off by default: a row gets gradient only when
    # its token is in the batch, and Adam's momentum keeps moving it for steps after, so names drift (measured)
    train_embeddings: bool = False
    # a tokenizer folder to train the text encoder for instead of pretrained's, e.g. one with a normaliser
    # (`sdxs init --text-normalization nfkc,lowercase`): the cache's embeddings (made with the old tokenizer) stay
    # the targets, so the text encoder learns to give for the new token forms what the old ones gave. Exported with it.
    tokenizer: str = ""


@dataclass
class AlignConfig:
    """What the text encoder is pulled towards and what anchors it (`sdxs.train.text_align`)."""

    min_sigma: float = 0.1  # noise levels from [min_sigma, 1]: the prompt decides the picture at mid and high noise
    anchor_weight: float = 4.0  # loss weight of exact captions and image prompts (keep what the model already does)
    empty_weight: float = 8.0  # loss weight of the one empty prompt per batch (CFG's unconditional branch; 0: none)
    image_prompts: int = 4  # encode_image anchors per batch (needs `sdxs prepare --image-embeds`; 0: none)
    image_folder: str = ""  # where the cached images are ("": the folder the cache was prepared from)
    # "unet": compare the whole UNet's predictions (a UNet forward and backward per sample); "attention": compare the
    # outputs of its cross-attention layers, the only place the UNet reads text, on the queries each cached image gave
    # them (cached once at the start, `query_draws` noise draws per image): several times cheaper per sample
    objective: str = "unet"
    query_draws: int = 4


@dataclass
class TextAlignTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/text_align"))
    model: TextAlignModelConfig = field(default_factory=TextAlignModelConfig)
    data: LatentDataConfig = field(default_factory=lambda: LatentDataConfig(batch_size=48))
    captions: CaptionAugmentConfig = field(default_factory=lambda: CaptionAugmentConfig(probability=0.75))
    align: AlignConfig = field(default_factory=AlignConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=50, weight_decay=0.0))
    ema: EMAConfig = field(default_factory=EMAConfig)


# ----------------------------------------------------------------------------------------------------------------
# Loading, overrides, serialisation
# ----------------------------------------------------------------------------------------------------------------


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The nested dict of a .toml or .json recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(path.read_text())
    raise ValueError(f"config file {str(path)!r} must end in .toml or .json.")


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from defaults, then the recipe at `path`, then `section.key=value` overrides (typed)."""
    cfg = from_dict(cls, read_recipe(path) if path else {})
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def from_dict(cls, data: dict[str, Any], where: str = "", base=None):
    """Recursively build dataclass `cls` from `data`; unknown keys and wrong types raise with the dotted name.

    `base`: the defaults to start from (a section starts from its parent's default for it, e.g. the LoRA trainer's
    `OptimConfig(weight_decay=0.0)`, not from the bare `OptimConfig()`)."""
    if not isinstance(data, dict):
        raise TypeError(f"config `{where or 'root'}` must be a table/object, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys{' in `' + where + '`' if where else ''}: {', '.join(sorted(names))}."
        )
    obj = copy.deepcopy(base) if base is not None else cls()
    for key, value in data.items():
        tp = hints[key]
        name = _join(where, key)
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, from_dict(tp, value, name, base=getattr(obj, key)))
        else:
            setattr(obj, key, _check_type(value, tp, name))
    return obj


def apply_override(cfg, item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed by the field's type."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4).")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            where = ".".join(parts[:i])
            raise ValueError(
                f"unknown config key `{dotted}` in override {item!r}; "
                f"valid keys{' in `' + where + '`' if where else ''}: {', '.join(sorted(names))}."
            )
        tp = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ValueError(f"override {item!r} names a whole section; set its keys, e.g. {dotted}.KEY=VALUE.")
            setattr(obj, part, parse_value(raw, tp, dotted))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ValueError(f"`{'.'.join(parts[: i + 1])}` is a value, not a section, in override {item!r}.")
            obj = getattr(obj, part)


def parse_value(raw: str, tp, name: str):
    """Parse a command-line string as type `tp` (bool, int, float, str, list[...]) and check it."""
    raw = raw.strip()
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise TypeError(f"`{name}` must be a boolean (true/false), got {raw!r}.")
    if tp is str:
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TypeError(f"`{name}` must be {_type_name(tp)}, got {raw!r} (not parseable).") from e
    return _check_type(value, tp, name)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _check_type(value, tp, name: str):
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"`{name}` must be a list, got {value!r}.")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, name)
            except TypeError:
                continue
        raise TypeError(f"`{name}` must be {_type_name(tp)}, got {value!r}.")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise TypeError(f"`{name}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
