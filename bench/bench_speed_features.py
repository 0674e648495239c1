"""Optional speed features of the pipeline, one at a time, against the plain pipeline.

    python bench/bench_speed_features.py --model emoji [--steps 40] [--device cuda --dtype bf16]

Features (`SDXSPipeline.enable_speedups` or stock pipeline methods; none is on by default except SDPA attention,
which diffusers' attention processors use whenever torch provides it):
  channels_last    pipe.enable_speedups("channels_last")  NHWC UNet weights and activations
  fused_qkv        pipe.enable_speedups("fused_qkv")      unet.fuse_qkv_projections()
  compile          pipe.enable_speedups("compile")        regional torch.compile of each BasicTransformerBlock
  cuda_graphs      pipe.enable_speedups("cuda_graphs")    whole-UNet torch.compile(mode="reduce-overhead"); CUDA only
  vae_tiling       pipe.enable_vae_tiling()               memory, not speed: bounded decode for big images
  vae_slicing      pipe.enable_vae_slicing()              memory, not speed: one image at a time through the decoder
  cpu_offload      pipe.enable_model_cpu_offload()        memory for small GPUs (CUDA only), costs speed
For the compiling features, the first call's time (compilation included) is reported separately, and a second
prompt and seed are run to check that nothing recompiles (dynamo's graph count must not grow).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch._dynamo
from common import load_pipeline

from sdxs.runtime import DTYPE_NAMES, SPEED_FEATURES, apply_speed_features, torch_dtype


def build(model: str, dtype: torch.dtype, device: str):
    pipe = load_pipeline(model, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


FEATURES = ("baseline", *SPEED_FEATURES)  # applied by `sdxs.runtime.apply_speed_features`, as `--speedup` does
CUDA_ONLY = ("cuda_graphs", "cpu_offload")


def timed(pipe, prompt: str, seed: int, steps: int) -> float:
    t = time.perf_counter()
    pipe(prompt, negative_prompt="low quality", num_inference_steps=steps, seed=seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", nargs="+", choices=list(FEATURES), help="default: all this device runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    args = parser.parse_args()
    dtype = torch_dtype(args.dtype)
    rows = []
    cuda = args.device.startswith("cuda")
    for name in args.features or [f for f in FEATURES if cuda or f not in CUDA_ONLY]:
        torch._dynamo.reset()
        pipe = build(args.model, dtype, args.device)
        if name != "baseline":
            pipe = apply_speed_features(pipe, [name], args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first = timed(pipe, "a red apple, 3d render", 0, args.steps)  # warm-up (compiles, if compiling)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        best = min(timed(pipe, "girl, smiling, blue hair", 1 + i, args.steps) for i in range(args.repeats))
        recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        rows.append(
            {
                "feature": name,
                "first_call_s": round(first, 2),
                "s_per_image": round(best, 3),
                "it_per_s": round(args.steps / best, 2),
                "new_graphs_after_warmup": recompiled,
                "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "-",
            }
        )
        print(rows[-1], flush=True)
    base = rows[0]["s_per_image"] if rows[0]["feature"] == "baseline" else None
    print(f"\n{args.model}, {args.device}, {args.dtype}, {args.steps} steps, CFG 4")
    print("| feature | first call (s) | s/image | it/s | vs baseline | graphs added after warm-up | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{base / r['s_per_image']:.2f}x" if base else "-"
        print(
            f"| {r['feature']} | {r['first_call_s']} | {r['s_per_image']} | {r['it_per_s']} | {speedup} | "
            f"{r['new_graphs_after_warmup']} | {r['peak_mem_GiB']} |"
        )
    out = Path(__file__).parent / "results" / f"speed-features-{args.model}-{args.device}-{args.dtype}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
