"""Model presets: build a fresh SDXS model (random weights) from configs.

Each preset is a set of plain config dicts for stock classes: diffusers `UNet2DConditionModel`,
`AsymmetricAutoencoderKL`, `FlowMatchEulerDiscreteScheduler` and transformers `Qwen3_5ForConditionalGeneration`.
Random weights are for tests, benchmarks and as the starting point of training — never for making images.

    tiny      seconds on a CPU; every code path of the real model (8x/16x VAE, VLM text encoder) at toy width
    emoji     the shipped model: 64 px into the 4x VAE encoder, 128 px out of the 8x decoder, small Qwen3.5 VLM
    sdxs-1b   ~1.6B-parameter SD1.5-like UNet, 32-channel 8x/16x VAE, Qwen3.5-2B-sized text encoder
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from sdxs.tokenizer import BUILTIN_CORPUS, SPECIAL_TOKENS, train_tokenizer


@dataclass
class Preset:
    """Configs of one model size. `tokenizer_vocab` is the BPE vocabulary trained for it when no tokenizer is given."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: {"shift": 3.0})
    tokenizer_vocab: int = 512
    # how a tokenizer trained for this preset reads text (`sdxs.tokenizer.TEXT_NORMALIZATIONS`): one token form per word wherever
    # it stands, whatever its case. A published tokenizer (sdxs-1b's Qwen) is used exactly as published.
    tokenizer_normalization: tuple[str, ...] = ("nfkc", "lowercase", "prefix-space")
    default_size: tuple[int, int] = (256, 256)  # (width, height) of __call__ when none is given
    note: str = ""

    @property
    def vision_processor(self) -> dict[str, Any]:
        """The image processor's settings: the vision tower's patch, merge and frame sizes (they must agree)."""
        tower = self.text_encoder["vision_config"]
        return dict(
            patch_size=tower["patch_size"],
            merge_size=tower["spatial_merge_size"],
            temporal_patch_size=tower["temporal_patch_size"],
        )


def _text_config(hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, inter: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # 25% of each head is rotary, split over (time, height, width) as Qwen3.5's interleaved M-RoPE
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [max(head_dim // 16, 1), max(head_dim // 32, 1), max(head_dim // 32, 1)],
            "mrope_interleaved": True,
        },
    )


def _vision_tower(depth: int, hidden: int, inter: int, heads: int, patch: int, out_hidden: int, positions: int) -> dict:
    """Qwen3.5's vision tower (`vision_config`): 2x2 neighbouring patches merged into one token, 2 frames per patch."""
    return dict(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=out_hidden,
        num_position_embeddings=positions,
    )


def _unet(channels, attn_levels, layers, heads_dim, cross_dim, sample_size, latent_ch, groups, transformer_layers=1):
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels))
    return dict(
        sample_size=sample_size,
        in_channels=latent_ch,
        out_channels=latent_ch,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        cross_attention_dim=cross_dim,
        attention_head_dim=heads_dim,
        transformer_layers_per_block=transformer_layers,
        norm_num_groups=groups,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _vae(down_channels, up_channels, latent_ch, groups, layers_down=1, layers_up=1, scaling_factor=1.0):
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(down_channels),
        down_block_out_channels=tuple(down_channels),
        layers_per_down_block=layers_down,
        up_block_types=("UpDecoderBlock2D",) * len(up_channels),
        up_block_out_channels=tuple(up_channels),
        layers_per_up_block=layers_up,
        latent_channels=latent_ch,
        norm_num_groups=groups,
        scaling_factor=scaling_factor,
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        unet=_unet((32, 64), (True, True), 1, 8, 32, sample_size=4, latent_ch=4, groups=8),
        vae=_vae((8, 8, 16, 16), (8, 8, 16, 16, 16), latent_ch=4, groups=4),
        text_encoder=dict(
            text_config=_text_config(32, 4, 2, 1, 16, 64, vocab=512),
            vision_config=_vision_tower(2, 32, 64, 2, patch=8, out_hidden=32, positions=64),
        ),
        tokenizer_vocab=512,
        default_size=(64, 64),
        note="for tests: seconds on a CPU",
    ),
    "emoji": Preset(
        name="emoji",
        # sized so the whole model is < 60 MB in fp16 (repo-root budget); GroupNorm groups of >= 4 channels, because
        # a group of 1 (instance norm) erases each channel's mean and with it flat colour
        unet=_unet((64, 128, 256), (False, True, True), 1, 32, 256, sample_size=16, latent_ch=16, groups=16),
        # 4x encoder / 8x decoder, 64 px in -> 128 px out, 16x16x16 latents: the 64 -> 128 fallback, because
        # the 128 -> 256 VAE (8x/16x) trains at 0.36 samples/s on the 2-core CPU we had (no GPU); this one at ~12.
        # 16 channels (48 input values per latent pixel -> 16): with 8 the short CPU run stalled far below bicubic.
        # GroupNorm with 2 groups (>= 8 channels each): with 8 groups the 16-channel levels had 2 channels per group
        # and the decoder learnt shapes in grey-brown only (a small group's normalisation erases its colour)
        vae=_vae((16, 32, 64), (16, 32, 64, 128), latent_ch=16, groups=2),
        text_encoder=dict(
            text_config=_text_config(256, 4, 4, 2, 64, 768, vocab=4096),
            vision_config=_vision_tower(2, 192, 512, 4, patch=16, out_hidden=256, positions=256),
        ),
        # 16x16 latents: shift 1 (shift 3 suits 1024 px / 128x128 latents; on 16x16 it left 2.6% of training
        # samples below sigma 0.3 and the images blotchy: issue 16)
        scheduler={"shift": 1.0},
        tokenizer_vocab=4096,
        default_size=(128, 128),
        note="the shipped sdxs-emoji model: 64 px VAE input, 128 px output",
    ),
    "sdxs-1b": Preset(
        name="sdxs-1b",
        # The published shape as far as public evidence shows it (issue 19): SD1.5-like, four levels with a widened
        # last one, layers per block (4, 3, 2, 2), transformer layers (2, 2, 3, 4) with cross-attention at the first
        # three down levels (and their mirrored up levels) and a plain fourth; the mid block is cross-attention with
        # the last level's 4 transformer layers. With cross_attention_dim=768 this counts exactly 1,585,405,344
        # parameters, the count reported for an earlier, CLIP-conditioned sdxs of this shape
        # (`python -m sdxs.presets sdxs-1b --cross-attention-dim 768`); with Qwen3.5-2B's 2048 it is larger.
        # Heads: diffusers' `attention_head_dim` is the number of heads; (5, 10, 20, 24) heads = 64 channels each.
        unet=_unet(
            (320, 640, 1280, 1536),
            (True, True, True, False),
            (4, 3, 2, 2),
            (5, 10, 20, 24),
            2048,
            sample_size=64,
            latent_ch=32,
            groups=32,
            transformer_layers=(2, 2, 3, 4),
        ),
        vae=_vae((128, 256, 512, 512), (128, 128, 256, 512, 512), latent_ch=32, groups=32, layers_down=2, layers_up=3),
        # Qwen3.5-2B-sized language model (hidden 2048, 24 layers, 248,320-token vocabulary) + vision tower
        text_encoder=dict(
            text_config=_text_config(2048, 24, 8, 2, 256, 4096, vocab=248320),
            vision_config=_vision_tower(24, 1024, 4096, 16, patch=16, out_hidden=2048, positions=2304),
        ),
        # Flow `shift` is a recipe value, not part of the shape: 3.0 suits 1024 px (64x88 latents), where most of
        # the signal is decided at high noise (shift 1 on 16x16 latents: the emoji preset). Not published; tune it.
        scheduler={"shift": 3.0},
        tokenizer_vocab=248320,
        tokenizer_normalization=(),  # stands in for Qwen's published tokenizer, which has no lowercasing
        default_size=(1024, 1408),
        note="the SDXS-1B shape, random weights: for benchmarks and as a training start",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def build_text_encoder(preset: Preset, tokenizer, dtype: torch.dtype = torch.float32):
    """A Qwen3_5ForConditionalGeneration with the preset's shape and the tokenizer's vocabulary and special ids."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_cfg = dict(preset.text_encoder["text_config"])
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(tokenizer))
    text_cfg.update(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen3_5Config(
        text_config=text_cfg,
        vision_config=dict(preset.text_encoder["vision_config"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen3_5ForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model.eval()


FRESH_COMPONENTS = ("text_encoder", "vae", "unet")


def fresh_component(
    preset: Preset,
    name: str,
    seed: int,
    tokenizer=None,
    text_hidden_size: int | None = None,
    latent_channels: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Random weights for component `name` (text_encoder, vae or unet) of `preset`, drawn right after
    `torch.manual_seed(seed)`.

    The one seeding rule for random weights: every fresh component is seeded on its own with the given seed, so it
    comes out the same whether or not other components are built fresh beside it. `build_pipeline`, `sdxs init` and
    the trainers' fresh components (`run.seed`) all build them here.

    A UNet's cross-attention width and latent channels follow `text_hidden_size` / `latent_channels` when given (the
    preset's shape fitted to the model's text and latent spaces); a text encoder needs its `tokenizer`.
    """
    from diffusers import AsymmetricAutoencoderKL, UNet2DConditionModel

    if name not in FRESH_COMPONENTS:
        raise ValueError(f"`name` must be one of {list(FRESH_COMPONENTS)}, got {name!r}.")
    torch.manual_seed(seed)
    if name == "text_encoder":
        if tokenizer is None:
            raise ValueError("a fresh text encoder needs `tokenizer` (its vocabulary and special token ids).")
        return build_text_encoder(preset, tokenizer, dtype)
    if name == "vae":
        return AsymmetricAutoencoderKL(**preset.vae).to(dtype).eval()
    config = dict(preset.unet)
    if text_hidden_size is not None:
        config["cross_attention_dim"] = int(text_hidden_size)
    if latent_channels is not None:
        config["in_channels"] = config["out_channels"] = int(latent_channels)
    return UNet2DConditionModel(**config).to(dtype).eval()


def build_pipeline(
    name: str = "tiny",
    seed: int = 0,
    tokenizer=None,
    corpus=None,
    dtype: torch.dtype = torch.float32,
    text_recipe: dict | None = None,
    **components,
):
    """A fresh SDXSPipeline of preset `name`: random weights (`fresh_component`'s seeding) and a local tokenizer.

    Components passed by name (`text_encoder=`, `vae=`, `unet=`, `scheduler=`, `vision_processor=`) are used as they
    are; the rest is built fresh, a UNet fitted to the text encoder's width and the VAE's latent channels. This and
    loading a folder (`sdxs.model_folder.load_local_pipeline`) are the two places a pipeline is constructed; every
    other one is derived with `from_pipe` or `register_modules`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdxs.pipeline import SDXSPipeline

    preset = get_preset(name)
    unknown = set(components) - {"text_encoder", "vae", "unet", "scheduler", "vision_processor"}
    if unknown:
        raise TypeError(f"build_pipeline() got unknown component(s) {sorted(unknown)}.")
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus or BUILTIN_CORPUS, preset.tokenizer_vocab, preset.tokenizer_normalization)
    te, vae, unet = (components.get(k) for k in ("text_encoder", "vae", "unet"))
    if te is None:
        te = fresh_component(preset, "text_encoder", seed, tokenizer, dtype=dtype)
    if vae is None:
        vae = fresh_component(preset, "vae", seed, dtype=dtype)
    if unet is None:
        hidden, latent = te.config.text_config.hidden_size, vae.config.latent_channels
        unet = fresh_component(preset, "unet", seed, text_hidden_size=hidden, latent_channels=latent, dtype=dtype)
    scheduler = components.get("scheduler")
    vision_processor = components.get("vision_processor")
    return SDXSPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(**preset.scheduler),
        vision_processor=vision_processor
        if vision_processor is not None
        else Qwen2VLImageProcessorPil(**preset.vision_processor),
        text_recipe=text_recipe,
        default_width=preset.default_size[0],
        default_height=preset.default_size[1],
    )


def unet_config(name: str, cross_attention_dim: int | None = None) -> dict[str, Any]:
    """The preset's UNet config; `cross_attention_dim` overrides the text width (e.g. 768 for a CLIP-L encoder)."""
    config = get_preset(name).unet
    if cross_attention_dim is not None:
        config["cross_attention_dim"] = int(cross_attention_dim)
    return config


def count_parameters(name: str, cross_attention_dim: int | None = None) -> dict[str, int]:
    """Parameter counts per component of a preset, built on the meta device (no memory, no time)."""
    from accelerate import init_empty_weights
    from diffusers import AsymmetricAutoencoderKL, UNet2DConditionModel
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    preset = get_preset(name)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config(name, cross_attention_dim))
        vae = AsymmetricAutoencoderKL(**preset.vae)
        te = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**copy.deepcopy(preset.text_encoder)))

    def n(m):
        return sum(p.numel() for p in m.parameters())

    vision = n(te.model.visual)
    return {
        "unet": n(unet),
        "vae_encoder": n(vae.encoder) + n(vae.quant_conv),
        "vae_decoder": n(vae.decoder) + n(vae.post_quant_conv),
        "text_encoder_language": n(te) - vision,
        "text_encoder_vision": vision,
    }


def describe_preset(name: str) -> dict[str, Any]:
    """What `sdxs info` shows of a preset: default size, note and parameter counts (meta device, no memory)."""
    preset = get_preset(name)
    return {"default_size": list(preset.default_size), "note": preset.note, "parameters": count_parameters(name)}


def step_flops(
    name: str,
    width: int | None = None,
    height: int | None = None,
    batch: int = 2,
    tokens: int = 251,
    cross_attention_dim: int | None = None,
) -> dict[str, int]:
    """FLOPs counted by torch's `FlopCounterMode` on the meta device (no memory, no weights, seconds).

    `unet_step`: one sampling step = one UNet call on `batch` latents (2: classifier-free guidance batches the
    prompt and the negative), `tokens` = 1 pooled + 250 text positions. `vae_decode`: one image through the 16x
    decoder, once per image. Size defaults to the preset's `default_size`; the latent is size / decoder factor.
    A multiply-add counts as 2 FLOPs (torch's convention).
    """
    from diffusers import AsymmetricAutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    preset = get_preset(name)
    width, height = width or preset.default_size[0], height or preset.default_size[1]
    config = unet_config(name, cross_attention_dim)
    factor = 2 ** (len(preset.vae["up_block_out_channels"]) - 1)
    if width % factor or height % factor:
        raise ValueError(f"size {width}x{height} must be a multiple of the decoder factor {factor}.")
    h, w = height // factor, width // factor
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        vae = AsymmetricAutoencoderKL(**preset.vae)
        x = torch.zeros(batch, config["in_channels"], h, w)
        text = torch.zeros(batch, tokens, config["cross_attention_dim"])
        t = torch.full((batch,), 500.0)
        z = torch.zeros(1, preset.vae["latent_channels"], h, w)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
        unet(x, t, encoder_hidden_states=text)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_counter:
        vae.decode(z)
    return {"unet_step": int(unet_counter.get_total_flops()), "vae_decode": int(vae_counter.get_total_flops())}


def main(argv: list[str] | None = None) -> None:
    """`python -m sdxs.presets sdxs-1b [--size 1024x1408] [--cross-attention-dim 768]`: parameters and FLOPs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdxs.presets", description=main.__doc__)
    parser.add_argument("name", nargs="?", default="sdxs-1b", choices=sorted(PRESETS))
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT of the output image (default: the preset's)")
    parser.add_argument("--cross-attention-dim", type=int, default=None, help="override the text width")
    parser.add_argument("--no-flops", action="store_true", help="parameter counts only")
    args = parser.parse_args(argv)
    preset = get_preset(args.name)
    width, height = preset.default_size
    if args.size:
        width, height = (int(v) for v in args.size.lower().split("x"))
    counts = count_parameters(args.name, args.cross_attention_dim)
    cross = args.cross_attention_dim or preset.unet["cross_attention_dim"]
    print(f"preset {args.name}: UNet levels {list(preset.unet['block_out_channels'])}, cross_attention_dim {cross}")
    for key, value in counts.items():
        print(f"  {key:24s} {value:>15,d}")
    print(f"  {'total':24s} {sum(counts.values()):>15,d}")
    if not args.no_flops:
        flops = step_flops(args.name, width, height, cross_attention_dim=args.cross_attention_dim)
        print(f"FLOPs at {width}x{height} (FlopCounterMode, meta device, multiply-add = 2):")
        print(f"  UNet, one CFG step (batch 2, 251 tokens) {flops['unet_step'] / 1e12:10.3f} TFLOP")
        print(f"  VAE decode, one image                    {flops['vae_decode'] / 1e12:10.3f} TFLOP")


if __name__ == "__main__":
    main()
