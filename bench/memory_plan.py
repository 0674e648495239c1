"""Computed weight memory of a preset per component and per loading recipe (no GPU, no weights: meta device).

    python bench/memory_plan.py --preset sdxs-1b

Weights only: activations, the CUDA context and the allocator's slack come on top (measure those on a GPU with
bench_pipeline.py). bitsandbytes quantises `nn.Linear` weights only (8-bit: 1 byte per weight plus one fp32 scale
per output row; 4-bit NF4: half a byte plus one absmax per block of 64 weights, 8-bit with double quantisation);
embeddings, norms, convolutions and biases stay 16-bit, and the tied LM head is the embedding.
"""

from __future__ import annotations

import argparse
import copy

import torch

GB = 1e9


def linear_split(module: torch.nn.Module) -> tuple[int, int, int]:
    """(weights in nn.Linear layers, their output rows, all other parameters), each parameter counted once."""
    linear = rows = 0
    seen: set[int] = set()
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            linear += m.weight.numel()
            rows += m.weight.shape[0]
    other = sum(p.numel() for p in module.parameters() if id(p) not in seen)
    return linear, rows, other


def plan(preset_name: str) -> dict[str, float]:
    from accelerate import init_empty_weights
    from diffusers import AsymmetricAutoencoderKL, UNet2DConditionModel
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from sdxs.presets import get_preset

    preset = get_preset(preset_name)
    with init_empty_weights():
        unet = UNet2DConditionModel(**preset.unet)
        vae = AsymmetricAutoencoderKL(**preset.vae)
        te = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**copy.deepcopy(preset.text_encoder)))

    def n(m):
        return sum(p.numel() for p in m.parameters())

    linear, rows, other = linear_split(te)
    gb = {
        "unet_16bit": 2 * n(unet) / GB,
        "vae_16bit": 2 * n(vae) / GB,
        "text_encoder_16bit": 2 * n(te) / GB,
        "text_encoder_8bit": (linear + 4 * rows + 2 * other) / GB,
        "text_encoder_4bit": (linear / 2 + linear / 64 + 2 * other) / GB,
        "text_encoder_linear_share": linear / n(te),
    }
    gb["all_16bit"] = gb["unet_16bit"] + gb["vae_16bit"] + gb["text_encoder_16bit"]
    gb["all_8bit_text"] = gb["unet_16bit"] + gb["vae_16bit"] + gb["text_encoder_8bit"]
    gb["all_4bit_text"] = gb["unet_16bit"] + gb["vae_16bit"] + gb["text_encoder_4bit"]
    gb["offload_peak"] = max(gb["unet_16bit"], gb["vae_16bit"], gb["text_encoder_16bit"])
    gb["embeddings_once"] = gb["unet_16bit"] + gb["vae_16bit"]
    return gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxs-1b")
    args = parser.parse_args()
    gb = plan(args.preset)
    rows = [
        ("UNet, bf16/fp16", "unet_16bit"),
        ("VAE, bf16/fp16", "vae_16bit"),
        ("text encoder, bf16/fp16", "text_encoder_16bit"),
        ("text encoder, 8-bit (bitsandbytes LLM.int8)", "text_encoder_8bit"),
        ("text encoder, 4-bit (bitsandbytes NF4, double quant)", "text_encoder_4bit"),
        ("all on the GPU, 16-bit", "all_16bit"),
        ("all on the GPU, 8-bit text encoder", "all_8bit_text"),
        ("all on the GPU, 4-bit text encoder", "all_4bit_text"),
        ("enable_model_cpu_offload (largest model on the GPU)", "offload_peak"),
        ("embeddings once, text encoder dropped (UNet + VAE)", "embeddings_once"),
    ]
    print(f"preset {args.preset}: computed weight memory (GB = 1e9 bytes; activations not included)")
    for label, key in rows:
        print(f"  {label:55s} {gb[key]:6.2f} GB")
    print(f"  (nn.Linear share of the text encoder's parameters: {100 * gb['text_encoder_linear_share']:.1f}%)")


if __name__ == "__main__":
    main()
