"""`sdxs init`: assemble a model folder (hub layout) from a preset and/or trained components.

    sdxs init runs/emoji/model --preset emoji --text-encoder runs/emoji/text_encoder     # TE + fresh VAE/UNet
    sdxs init runs/emoji/model --base runs/emoji/model --vae runs/emoji/vae               # swap a trained VAE in

Training runs one component at a time, but `sdxs prepare` and `sdxs train unet` need a whole model folder (VAE,
text encoder, tokenizer, scheduler, UNet config). This command writes one with `sdxs.export.save_hub_layout`:
every component comes from `--base` (an existing model folder) when given, else fresh from `--preset` (random
weights, seeded); `--text-encoder`, `--vae` and `--unet` replace single components with trained ones.

A component source SRC may be a training run folder (its latest checkpoint is used), a checkpoint folder
(`RUN/checkpoints/step-N`), a model folder (holding model_index.json) or the component folder itself. From runs
and checkpoints the EMA weights are taken when the run kept them (and `ema.use_for_export` is on), as
`sdxs export` does. A text encoder brings its tokenizer (`tokenizer/` beside it); a trained VAE brings the
`scaling_factor` its trainer measured. A fresh UNet's cross-attention width follows the text encoder's hidden size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


logger = logging.getLogger("sdxs.assemble")

EPILOG = """examples:
  sdxs init runs/emoji/model --preset emoji --text-encoder runs/emoji/text_encoder
  sdxs init runs/emoji/model --base runs/emoji/model --vae runs/emoji/vae
  sdxs init runs/emoji/model-v2 --base . --shift 1          # the shipped model with the noise shift of v2
  sdxs init out/ --preset tiny                       # random weights: for tests and benchmarks only
"""


def resolve_component(src: str | Path, name: str) -> Path:
    """The folder holding component `name` (config + safetensors) inside a run, checkpoint, model or itself."""
    from sdxs.train.common import checkpoint_dirs

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--{name.replace('_', '-')} {str(src)!r}: no such folder.")
    if (path / "checkpoints").is_dir():  # a training run: its latest complete checkpoint
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise FileNotFoundError(f"{str(path)!r} is a run folder without a complete checkpoint.")
        path = dirs[-1]
    if (path / "state.json").is_file():  # a checkpoint: EMA weights when the run kept and exports them
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        ema = path / f"{name}_ema"
        if ema.is_dir() and config.get("ema", {}).get("use_for_export", True):
            return ema
        path = path / name
    elif (path / "model_index.json").is_file():
        path = path / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(src)!r} holds no {name} (looked for {str(path / 'config.json')!r}).")
    return path


def find_tokenizer(text_encoder_dir: Path) -> Path:
    """The tokenizer saved beside a text encoder (checkpoint or model folder), or inside its folder."""
    text_encoder_dir = Path(text_encoder_dir)
    for candidate in (text_encoder_dir.parent / "tokenizer", text_encoder_dir):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer beside {str(text_encoder_dir)!r} (expected ../tokenizer/).")


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
) -> Path:
    """Write a model folder to `out` from `base` (or fresh `preset` components) with the given components swapped in.

    Returns `out`. The text encoder's hidden size must match the UNet's cross-attention width when both are given
    or kept from `base`; a fresh UNet is built to fit. `shift` sets the scheduler's noise shift (training reads it
    from the model folder, so it must be set before a UNet is trained for it).
    """
    import torch
    from diffusers import AsymmetricAutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdxs.export import load_local_pipeline, save_hub_layout
    from sdxs.pipeline import SDXSPipeline
    from sdxs.presets import BUILTIN_CORPUS, build_text_encoder, get_preset, train_tokenizer

    p = get_preset(preset)
    parts: dict = {}
    config: dict = {}
    sources: dict[str, str] = {}
    if base is not None:
        if not (Path(base) / "model_index.json").is_file():
            raise FileNotFoundError(f"--base {str(base)!r} is not a model folder (no model_index.json).")
        pipe = load_local_pipeline(base, dtype=torch.float32)
        parts = dict(pipe.components)
        config = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in parts}
        sources = {k: f"{base}/{k}" for k, v in parts.items() if v is not None}

    if text_encoder is not None:
        folder = resolve_component(text_encoder, "text_encoder")
        parts["text_encoder"] = Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        parts["tokenizer"] = AutoTokenizer.from_pretrained(find_tokenizer(folder))
        sources["text_encoder"] = str(folder)
        sources["tokenizer"] = str(find_tokenizer(folder))
        vp = folder.parent / "vision_processor"
        if vp.is_dir():
            parts["vision_processor"] = Qwen2VLImageProcessorPil.from_pretrained(vp)
    if parts.get("tokenizer") is None:
        parts["tokenizer"] = train_tokenizer(BUILTIN_CORPUS, p.tokenizer_vocab)
        sources["tokenizer"] = f"fresh BPE ({p.tokenizer_vocab}) on the built-in corpus"
    if parts.get("text_encoder") is None:
        torch.manual_seed(seed)
        parts["text_encoder"] = build_text_encoder(p, parts["tokenizer"])
        sources["text_encoder"] = f"preset {preset} (random, seed {seed})"
    hidden = parts["text_encoder"].config.text_config.hidden_size

    if vae is not None:
        folder = resolve_component(vae, "vae")
        parts["vae"] = AsymmetricAutoencoderKL.from_pretrained(folder).float().eval()
        sources["vae"] = str(folder)
    elif parts.get("vae") is None:
        torch.manual_seed(seed + 1)
        parts["vae"] = AsymmetricAutoencoderKL(**p.vae).eval()
        sources["vae"] = f"preset {preset} (random, seed {seed + 1})"

    if unet is not None:
        folder = resolve_component(unet, "unet")
        parts["unet"] = UNet2DConditionModel.from_pretrained(folder).float().eval()
        sources["unet"] = str(folder)
    elif parts.get("unet") is None or parts["unet"].config.cross_attention_dim != hidden:
        if parts.get("unet") is not None:
            logger.warning("the base UNet does not fit the text encoder (hidden %d): a fresh UNet is built", hidden)
        unet_config = dict(p.unet, cross_attention_dim=hidden)
        torch.manual_seed(seed + 2)
        parts["unet"] = UNet2DConditionModel(**unet_config).eval()
        sources["unet"] = f"preset {preset} (random, seed {seed + 2})"
    if parts["unet"].config.cross_attention_dim != hidden:
        raise ValueError(
            f"the UNet's cross_attention_dim is {parts['unet'].config.cross_attention_dim} but the text encoder's "
            f"hidden size is {hidden}: they cannot be assembled (train a UNet for this text encoder)."
        )
    if parts.get("scheduler") is None:
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**p.scheduler)
        sources["scheduler"] = f"preset {preset}"
    if shift is not None:
        if not shift > 0:
            raise ValueError(f"--shift must be > 0, got {shift}.")
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler"].config, shift=float(shift))
        sources["scheduler"] += f" (shift {shift:g})"
    if parts.get("vision_processor") is None:
        parts["vision_processor"] = Qwen2VLImageProcessorPil(**p.vision_processor)
        sources["vision_processor"] = f"preset {preset}"
    if base is None:
        config.setdefault("default_width", p.default_size[0])
        config.setdefault("default_height", p.default_size[1])
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vision_processor")
    pipe = SDXSPipeline(**{k: parts[k] for k in names}, **config)
    extra = {"assembled_by": "sdxs init", "preset": preset, "base": str(base) if base else None, "sources": sources}
    out = save_hub_layout(pipe, out, dtype=dtype, extra_config=extra, verify=verify)
    for name in names:
        logger.info("%-16s <- %s", name, sources.get(name, "?"))
    return out


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "init",
        help="assemble a model folder from a preset and/or trained components (text encoder, VAE, UNet)",
        description="Write a model folder (hub layout) whose components come from --base or fresh from --preset, "
        "with --text-encoder / --vae / --unet swapped in from training runs, checkpoints or model folders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="model folder to write (hub layout; component folders are replaced)")
    p.add_argument("--preset", default="emoji", help="shapes of fresh components (tiny | emoji | sdxs-1b)")
    p.add_argument("--base", metavar="MODEL", help="start from this model folder instead of fresh components")
    p.add_argument("--text-encoder", metavar="SRC", help="trained text encoder (+ tokenizer): run/checkpoint/folder")
    p.add_argument("--vae", metavar="SRC", help="trained VAE: run, checkpoint, model or vae folder")
    p.add_argument("--unet", metavar="SRC", help="trained UNet: run, checkpoint, model or unet folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh (random) components")
    p.add_argument("--shift", type=float, help="the scheduler's noise shift (default: the base's or the preset's)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the saved weights (default: as loaded)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the folder with plain diffusers")
    p.set_defaults(func=cmd_init)


def cmd_init(args) -> int:
    from sdxs.presets import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset}: unknown preset; choose one of {', '.join(PRESETS)}.")
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    logging.getLogger("sdxs.assemble").setLevel(logging.INFO)
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = assemble(
        args.out,
        preset=args.preset,
        base=args.base,
        text_encoder=args.text_encoder,
        vae=args.vae,
        unet=args.unet,
        seed=args.seed,
        dtype=dtypes.get(args.dtype),
        verify=not args.no_verify,
        shift=args.shift,
    )
    print(out)
    return 0
