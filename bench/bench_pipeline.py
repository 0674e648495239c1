"""Sampling speed on this machine: seconds per image, UNet it/s and pipeline overhead over a bare UNet loop.

    python bench/bench_pipeline.py --model tiny --model emoji [--model PATH] [--steps 40] [--repeats 3]

A model is a preset name (random weights: speed does not depend on the weights) or an exported model folder.
"Bare UNet loop" runs the same UNet calls on the same inputs (CFG batch of 2, precomputed embeddings) with no
scheduler, text encoder or VAE, so `pipeline - bare` is what the pipeline adds around the UNet.
Prints a Markdown table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def load(model: str, dtype: torch.dtype):
    if os.path.isdir(model):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, trust_remote_code=True)
    from sdxs.presets import build_pipeline

    return build_pipeline(model, seed=0, dtype=dtype)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def bench_one(model: str, steps: int, guidance: float, repeats: int, device: str, dtype: torch.dtype) -> dict:
    pipe = load(model, dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    w, h = pipe.config.default_width, pipe.config.default_height
    prompt = "a smiling face with heart eyes, 3d render"
    kw = dict(prompt=prompt, negative_prompt="low quality", num_inference_steps=steps, guidance_scale=guidance)
    pipe(**{**kw, "num_inference_steps": 2}, width=w, height=h, seed=0)  # warm-up: allocator, lazy init
    total = best_of(lambda: pipe(**kw, width=w, height=h, seed=0), repeats)

    emb, mask, neg, neg_mask = pipe.encode_prompt(prompt, device, 1, guidance > 1, "low quality")
    cond = torch.cat([neg, emb]) if guidance > 1 else emb
    cmask = torch.cat([neg_mask, mask]) if guidance > 1 else mask
    f = pipe.vae_scale_factor
    x = torch.randn(cond.shape[0], pipe.unet.config.in_channels, h // f, w // f, device=device, dtype=pipe.unet.dtype)
    t = torch.full((cond.shape[0],), 500.0, device=device)

    def bare():
        for _ in range(steps):
            pipe.unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=cmask, return_dict=False)

    unet_loop = best_of(bare, repeats)
    text = best_of(lambda: pipe.encode_prompt(prompt, device, 1, guidance > 1, "low quality"), repeats)
    latents = torch.randn(1, pipe.unet.config.in_channels, h // f, w // f, device=device)
    decode = best_of(lambda: pipe._vae_decode(latents), repeats)
    params = sum(p.numel() for p in pipe.unet.parameters())
    return {
        "model": model,
        "size": f"{w}x{h}",
        "steps": steps,
        "cfg": guidance,
        "unet_params_M": round(params / 1e6, 2),
        "s_per_image": round(total, 3),
        "unet_it_per_s": round(steps / unet_loop, 2),
        "bare_unet_loop_s": round(unet_loop, 3),
        "overhead_s": round(total - unet_loop, 3),
        "text_encode_s": round(text, 3),
        "vae_decode_s": round(decode, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="preset name or model folder (repeatable)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [bench_one(m, args.steps, args.guidance, args.repeats, args.device, dtype) for m in args.model or ["tiny"]]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
    }
    import diffusers
    import transformers

    env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    print(json.dumps(env))
    out = Path(__file__).parent / "results" / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
