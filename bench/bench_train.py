"""UNet training throughput: samples/s and peak memory of one optimiser step, as `sdxs train unet` takes it.

    python bench/bench_train.py --preset tiny                                   # CPU check (torch AdamW, fp32)
    python bench/bench_train.py --preset sdxs-1b --batch-size 8 --size 1024x1024   # GPU: AdamW8bit + ckpt + bf16

The step is the trainer's own: `flow_matching_loss` on a batch of cached-latent shape (random latents and text
embeddings of the preset's sizes: training reads the latent cache, so the VAE and text encoder are not run),
`accelerate` mixed precision, gradient checkpointing, `build_optimizer` (bitsandbytes AdamW8bit on CUDA, else
torch AdamW), gradient clipping at 1.0 and, with --ema, the EMA update. --warmup steps are not timed.
Prints a Markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import environment, parse_size, print_table, write_results


def bench(args) -> dict:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from sdxs.presets import get_preset
    from sdxs.train.common import enable_gradient_checkpointing
    from sdxs.train.config import EMAConfig, FlowConfig, OptimConfig
    from sdxs.train.optim import EMA, build_optimizer
    from sdxs.train.unet import flow_matching_loss

    cuda = args.device.startswith("cuda")
    mixed = args.mixed_precision or ("bf16" if cuda else "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**preset.unet)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer, opt_name = build_optimizer(
        unet.parameters(), OptimConfig(optimizer=args.optimizer, lr=1e-5), accelerator.device
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if args.compile:
        unet = torch.compile(unet)
    ema = EMA(accelerator.unwrap_model(unet), EMAConfig(enabled=True)) if args.ema else None
    unet.train()

    w, h = args.size or preset.default_size
    factor = 2 ** (len(preset.vae["up_block_out_channels"]) - 1)  # decoder factor: output size / latent size
    channels, width = preset.unet["in_channels"], preset.unet["cross_attention_dim"]
    device = accelerator.device
    batch = {
        "latents": torch.randn(args.batch_size, channels, h // factor, w // factor, device=device).contiguous(
            memory_format=torch.channels_last if args.channels_last else torch.contiguous_format
        ),
        "embeds": torch.randn(args.batch_size, 1 + args.tokens, width, device=device),
        "mask": torch.ones(args.batch_size, 1 + args.tokens, dtype=torch.long, device=device),
    }
    empty = (torch.zeros(1, 1 + args.tokens, width, device=device), batch["mask"][:1])
    generator = torch.Generator(device).manual_seed(0)
    shift = float(preset.scheduler.get("shift", 3.0))

    def step(i: int) -> float:
        loss, _ = flow_matching_loss(unet, batch, empty, FlowConfig(), shift, generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet), i)
        return loss.item()  # a host sync, as the trainer's logging makes

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / args.steps
    return {
        "preset": args.preset,
        "size": f"{w}x{h}",
        "latent": f"{channels}x{h // factor}x{w // factor}",
        "batch": args.batch_size,
        "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "optimizer": opt_name.split(" (")[0],
        "mixed_precision": mixed,
        "grad_ckpt": args.gradient_checkpointing,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "ema": args.ema,
        "s_per_step": round(seconds, 3),
        "samples_per_s": round(args.batch_size / seconds, 2),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=parse_size, help="WxH of the images it makes (default: the preset's size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=250, help="caption length in tokens (the recipe pads to 250)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, optimizer state)")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adamw8bit"])
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--ema", action="store_true", help="also update an fp32 EMA copy each step")
    parser.add_argument("--channels-last", action="store_true", help="UNet and latents in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (warm-up steps compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    row = bench(args)
    print_table([row])
    write_results(f"train-{args.preset}", environment(args.device), args=vars(args), row=row)


if __name__ == "__main__":
    main()
