"""Sampling speed: seconds per image, UNet it/s, pipeline overhead, peak memory and achieved TFLOP/s.

    python bench/bench_pipeline.py --model tiny --model emoji --model .           # CPU table
    python bench/bench_pipeline.py --model sdxs-1b --dtype bfloat16 --dtype float16 \\
        --size 1024x1408 --size 1024x1024 --speedup compile                       # GPU table

A model is a preset name (random weights: speed does not depend on the weights; sdxs-1b carries a same-shape
random Qwen3.5-2B text encoder) or an exported model folder. Per model and dtype it reports:
  load_s            building/loading the pipeline and moving it to the device
  first_image_s     the first full call after that (cold: allocator, lazy init, compilation if asked)
  s_per_image       best of --repeats calls (CFG on: one batched UNet pass of 2 per step)
  bare_unet_loop_s  the same UNet calls on the same inputs with no scheduler, text encoder or VAE, so
                    overhead_s = s_per_image - bare_unet_loop_s is what the pipeline adds around the UNet
  peak_mem_GiB      torch.cuda.max_memory_allocated over the timed calls (CUDA only)
  unet_gflop_step   the UNet's FLOPs per sampling step (CFG batch), counted by torch's FlopCounterMode
  achieved_tflops   unet_gflop_step x unet_it_per_s / 1000; peak_tflops is a large matmul in the same dtype on the same
                    device, measured here, and pct_of_peak their ratio
Prints a Markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import environment, load_pipeline, parse_size, print_table, write_results
from torch.utils.flop_counter import FlopCounterMode

from sdxs.runtime import torch_dtype

DTYPES = ("float32", "float16", "bfloat16")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def best_of(fn, repeats: int, device: str) -> float:
    return min(timed(fn, device) for _ in range(repeats))


@torch.no_grad()
def matmul_peak_tflops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this device in `dtype`: the practical peak the UNet is compared with."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.startswith("cuda") else 3
    a @ b  # warm-up
    seconds = best_of(lambda: [a @ b for _ in range(reps)], 3, device) / reps
    return 2 * n**3 / seconds / 1e12


@torch.no_grad()
def bench_one(pipe, model: str, size: tuple[int, int], args, dtype_name: str, load_s: float) -> dict:
    device, steps, guidance, repeats = args.device, args.steps, args.guidance, args.repeats
    w, h = size
    prompt = "a smiling face with heart eyes, 3d render"
    kw = dict(prompt=prompt, negative_prompt="low quality", num_inference_steps=steps, guidance_scale=guidance)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first = timed(lambda: pipe(**kw, width=w, height=h, seed=0), device)
    total = best_of(lambda: pipe(**kw, width=w, height=h, seed=1), repeats, device)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None

    emb, mask, neg, neg_mask = pipe.encode_prompt(prompt, device, 1, guidance > 1, "low quality")
    cond = torch.cat([neg, emb]) if guidance > 1 else emb
    cmask = torch.cat([neg_mask, mask]) if guidance > 1 else mask
    f = pipe.vae_scale_factor
    x = torch.randn(cond.shape[0], pipe.unet.config.in_channels, h // f, w // f, device=device, dtype=pipe.unet.dtype)
    t = torch.full((cond.shape[0],), 500.0, device=device)

    def unet_step():
        pipe.unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=cmask, return_dict=False)

    unet_step()  # a new input shape may compile once (with --speedup compile)
    unet_loop = best_of(lambda: [unet_step() for _ in range(steps)], repeats, device)
    with FlopCounterMode(display=False) as counter:
        unet_step()
    gflop_step = counter.get_total_flops() / 1e9
    text = best_of(lambda: pipe.encode_prompt(prompt, device, 1, guidance > 1, "low quality"), repeats, device)
    latents = torch.randn(1, pipe.unet.config.in_channels, h // f, w // f, device=device)
    decode = best_of(lambda: pipe._vae_decode(latents), repeats, device)
    it_s = steps / unet_loop
    peak = args.peak_tflops.get(dtype_name) or matmul_peak_tflops(device, pipe.unet.dtype)
    args.peak_tflops[dtype_name] = peak
    return {
        "model": model,
        "dtype": dtype_name,
        "size": f"{w}x{h}",
        "steps": steps,
        "cfg": guidance,
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
        "load_s": round(load_s, 2),
        "first_image_s": round(first, 3),
        "s_per_image": round(total, 3),
        "unet_it_per_s": round(it_s, 2),
        "bare_unet_loop_s": round(unet_loop, 3),
        "overhead_s": round(total - unet_loop, 3),
        "text_encode_s": round(text, 3),
        "vae_decode_s": round(decode, 3),
        "peak_mem_GiB": round(peak_mem, 2) if peak_mem is not None else "-",
        "unet_gflop_step": round(gflop_step, 2),
        "achieved_tflops": round(gflop_step * it_s / 1000, 3),
        "peak_tflops": round(peak, 3),
        "pct_of_peak": round(100 * gflop_step * it_s / 1000 / peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="preset name or model folder (repeatable; default tiny)")
    parser.add_argument("--size", action="append", type=parse_size, help="WxH (repeatable; default: model's)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable (default float32)")
    parser.add_argument("--speedup", action="append", default=[], help="SDXSPipeline.enable_speedups feature")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.peak_tflops = {}
    rows = []
    for model in args.model or ["tiny"]:
        for dtype_name in args.dtype or ["float32"]:
            t = time.perf_counter()
            pipe = load_pipeline(model, torch_dtype(dtype_name)).to(args.device)
            sync(args.device)
            load_s = time.perf_counter() - t
            pipe.set_progress_bar_config(disable=True)
            pipe.enable_speedups(*args.speedup)
            default = (pipe.config.default_width, pipe.config.default_height)
            for size in args.size or [default]:
                rows.append(bench_one(pipe, model, size, args, dtype_name, load_s))
                print(json.dumps(rows[-1]), flush=True)
            del pipe
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print_table(rows)
    write_results("pipeline", environment(args.device, speedups=args.speedup), rows=rows)


if __name__ == "__main__":
    main()
