"""What training at scale costs, computed: cache bytes, FLOPs, memory per GPU, projected H100 throughput, GPU-days.

    python bench/scale.py                        # sdxs-1b at 1024x1024 and the shipped emoji model at 128x128
    python bench/scale.py --gpus 8 --size 1024x1408 --no-timing

Everything model-shaped is counted, not typed: parameters and FLOPs on the meta device (no weights, seconds on a
CPU) with torch's `FlopCounterMode` (a multiply-add = 2 FLOPs), activation bytes with `saved_tensors_hooks` (what
autograd keeps for the backward pass). Only these inputs are typed, each a flag: the card's 29.98 it/s and the
setting it is assumed to be measured in, and an H100's dense bf16 rate. The emoji text encoder's time per caption
and the emoji UNet's training step are timed on this machine (skip with --no-timing). Prints Markdown tables and
writes JSON to bench/results/. docs/scale.md explains each row.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import environment, parse_size, print_table, write_results

ROOT = Path(__file__).resolve().parents[1]  # the shipped sdxs-emoji model folder
GB = 1e9
FP16 = 2  # bytes: the cache's storage dtype (shards.py) and the bf16 activations / gathered FSDP weights


# ----------------------------------------------------------------------------------------------------------------
# Models on the meta device
# ----------------------------------------------------------------------------------------------------------------


def model_shapes(name: str) -> dict:
    """UNet config, VAE decoder factor, text width / recipe of `name`: a preset, or "emoji" = the shipped folder."""
    from sdxs.presets import get_preset

    if name == "emoji":
        unet = json.loads((ROOT / "unet/config.json").read_text())
        vae = json.loads((ROOT / "vae/config.json").read_text())
        te = json.loads((ROOT / "text_encoder/config.json").read_text())
        recipe = json.loads((ROOT / "model_index.json").read_text())["text_recipe"]
        te_config = {k: te[k] for k in ("text_config", "vision_config")}
    else:
        preset = get_preset(name)
        unet, vae, te_config = dict(preset.unet), preset.vae, copy.deepcopy(preset.text_encoder)
        recipe = {"max_length": 250}  # DEFAULT_TEXT_RECIPE of sdxs.pipeline
    unet = {k: v for k, v in unet.items() if not k.startswith("_")}
    return {
        "unet": unet,
        "decoder_factor": 2 ** (len(vae["up_block_out_channels"]) - 1),  # output px per latent px
        "latent_channels": int(vae["latent_channels"]),
        "text_config": te_config,
        "text_hidden": int(te_config["text_config"]["hidden_size"]),
        "tokens": 1 + int(recipe["max_length"]),  # pooled slot + max_length positions
    }


def meta_unet(config: dict, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config).to(dtype).train()


def unet_inputs(config: dict, batch: int, latent_hw: tuple[int, int], tokens: int, dtype: torch.dtype):
    with torch.device("meta"):
        x = torch.zeros(batch, config["in_channels"], *latent_hw, dtype=dtype)  # (B, C, h, w)
        text = torch.zeros(batch, tokens, config["cross_attention_dim"], dtype=dtype)  # (B, T, D)
        t = torch.full((batch,), 500.0)
    return x, t, text


def unet_flops(config: dict, batch: int, latent_hw, tokens: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one UNet call, backward counted too (weights and activations)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = meta_unet(config, torch.float32)
    x, t, text = unet_inputs(config, batch, latent_hw, tokens, torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = unet(x, t, encoder_hidden_states=text).sample
        forward = counter.get_total_flops()
        out.pow(2).mean().backward()  # the latents and text need no gradient: as in training
    return int(forward), int(counter.get_total_flops())


class SavedBytes:
    """Bytes autograd saves for backward (activations, not weights), each tensor once."""

    def __init__(self, params: set[int]):
        self.params, self.seen, self.keep, self.total = params, set(), [], 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) in self.params or id(base) in self.params or id(t) in self.seen:
            return t
        self.seen.add(id(t))
        self.keep.append(t)  # hold it so its id is not reused
        self.total += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)


def unet_activations(config: dict, batch: int, latent_hw, tokens: int) -> dict[str, int]:
    """Activation bytes of one bf16 training forward, without and with diffusers' gradient checkpointing.

    Attention is counted as a fused kernel keeps it (q, k, v, output and one fp32 log-sum-exp per query row, as
    flash / memory-efficient SDPA on a GPU): on the meta device SDPA runs its math path, which would also save the
    (heads, N, N) probability matrices (168 MB per top-level self-attention at 4096 tokens) that no GPU kernel
    stores.
    With checkpointing, diffusers recomputes each resnet and transformer in the backward pass: kept are their inputs
    and what runs outside them; the backward peak adds the largest single block's saved activations.
    """
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    state: dict = {}

    def fused_sdpa(q, k, v, *args, **kwargs):
        with torch.no_grad():
            out = sdpa(q, k, v, *args, **kwargs)
        counter = state["inner"] or state["outer"]
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        for s in (q, k, v, out, lse):
            counter.add(s)
        return out.requires_grad_(q.requires_grad)

    def measure(checkpointing: bool) -> dict[str, int]:
        unet = meta_unet(config, torch.bfloat16)
        params = {id(p) for p in unet.parameters()}
        state.update(outer=SavedBytes(params), inner=None, inputs=SavedBytes(params), peak=0)

        def checkpoint_fn(module, *args):
            for a in args:  # what torch.utils.checkpoint keeps: the block's inputs
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    state["inputs"].add(a)
            state["inner"] = SavedBytes(params)
            with state["inner"].hooks():  # recomputed in backward: its saved tensors live one block at a time
                out = module(*args)
            state["peak"] = max(state["peak"], state["inner"].total)
            state["inner"] = None
            return out

        if checkpointing:
            unet.enable_gradient_checkpointing(checkpoint_fn)
        x, t, text = unet_inputs(config, batch, latent_hw, tokens, torch.bfloat16)
        with state["outer"].hooks():
            unet(x, t, encoder_hidden_states=text)
        # (a checkpoint input saved by an op outside the blocks is counted in both: a small overcount)
        return {"kept": state["outer"].total + state["inputs"].total, "backward_peak_block": state["peak"]}

    F.scaled_dot_product_attention = fused_sdpa
    try:
        plain, ckpt = measure(False), measure(True)
    finally:
        F.scaled_dot_product_attention = sdpa
    return {"no_checkpointing": plain["kept"], "checkpointing": ckpt["kept"] + ckpt["backward_peak_block"]}


def text_encoder_flops(te_config: dict, tokens: int) -> dict[str, int]:
    """FLOPs of one caption of `tokens` tokens through the text encoder as `encode_text` calls it (the whole
    Qwen3.5 model with output_hidden_states, its LM head included) and through the language model alone."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # the reference linear-attention kernel warns that it is slow
    with torch.device("meta"):
        te = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**copy.deepcopy(te_config))).eval()
        ids = torch.zeros(1, tokens, dtype=torch.long)
    counts = {}
    # no attention_mask: one caption, all real tokens (a meta mask cannot be inspected by the masking code)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        te(input_ids=ids, output_hidden_states=True)
    counts["as_called"] = int(counter.get_total_flops())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        te.model.language_model(input_ids=ids)
    counts["language_model"] = int(counter.get_total_flops())
    counts["parameters"] = sum(p.numel() for p in te.model.language_model.parameters())
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Measured on this machine (the shipped emoji model)
# ----------------------------------------------------------------------------------------------------------------

EMOJI_CAPTIONS = [  # the style of the emoji training captions (docs/training-emoji.md)
    "grinning face with big eyes, 3d render",
    "red apple, flat illustration",
    "smiling face with heart-eyes, high contrast",
    "woman technologist: medium skin tone, 3d render",
    "party popper, 3d render",
    "cat with wry smile, flat illustration",
    "globe showing europe-africa, 3d render",
    "person rowing boat: dark skin tone, high contrast",
]


def time_emoji(batch: int, repeats: int) -> dict[str, float]:
    """The shipped text encoder: seconds per caption in batches of `batch` (fp32, `encode_text` as the trainer's
    `text_on_the_fly` calls it); the UNet's fp32 forward+backward on the same batch size, for comparison."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    from sdxs.pipeline import encode_text

    recipe = json.loads((ROOT / "model_index.json").read_text())["text_recipe"]
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    te = Qwen3_5ForConditionalGeneration.from_pretrained(ROOT / "text_encoder", dtype=torch.float32).eval()
    prompts = (EMOJI_CAPTIONS * (batch // len(EMOJI_CAPTIONS) + 1))[:batch]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        encode_s = best(lambda: encode_text(te, tokenizer, prompts, recipe, dtype=torch.float32))
        embeds, mask = encode_text(te, tokenizer, prompts, recipe, dtype=torch.float32)
    used = int(mask.any(0).nonzero().max()) + 1  # the trainer trims the batch to its longest caption
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "unet/config.json").read_text())).train()
    shapes = model_shapes("emoji")
    x = torch.randn(batch, shapes["latent_channels"], 16, 16)
    t = torch.rand(batch) * 1000

    def unet_step():
        unet.zero_grad(set_to_none=True)
        unet(x, t, encoder_hidden_states=embeds[:, :used]).sample.pow(2).mean().backward()

    step_s = best(unet_step)
    return {
        "batch": batch,
        "mean_caption_tokens": sum(lengths) / len(lengths),
        "text_tokens_used": used,
        "encode_s_per_caption": encode_s / batch,
        "unet_fwd_bwd_s_per_sample": step_s / batch,
    }


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def memory_rows(params: int, act: dict[str, int], gpus: list[int]) -> list[dict]:
    """Per GPU, GB: fp32 master weights + fp32 grads + optimiser state (+ an fp32 EMA), as the trainer keeps them
    under bf16 autocast; sharded where the engine shards them. Activations: one 1024 px sample, bf16."""
    p = params / GB
    rows = []

    def row(strategy, weights, grads, optim, ema, note=""):
        static = weights + grads + optim
        rows.append(
            {
                "strategy": strategy,
                "weights": f"{weights:.2f}",
                "grads": f"{grads:.2f}",
                "optimizer": f"{optim:.2f}",
                "EMA": f"{ema:.2f}",
                "total": f"{static:.2f}",
                "total+EMA": f"{static + ema:.2f}",
                "+act/sample": f"{act['no_checkpointing'] / GB:.3g}",
                "+act/sample, ckpt": f"{act['checkpointing'] / GB:.3g}",
                "note": note,
            }
        )

    row("DDP, AdamW", 4 * p, 4 * p, 8 * p, 4 * p, "fp32 master, grads, m and v; every GPU holds all")
    row("DDP, AdamW8bit", 4 * p, 4 * p, 2 * p, 4 * p, "bitsandbytes: m and v in 1 byte each (+ block scales)")
    for n in gpus:
        row(
            f"FSDP x{n}, AdamW",
            4 * p / n,
            4 * p / n,
            8 * p / n,
            4 * p / n,
            "FULL_SHARD: all / N (+ 1-2 gathered blocks)",
        )
    for n in gpus:
        row(
            f"ZeRO-2 x{n}, AdamW",
            2 * p + 4 * p / n,
            4 * p / n,
            8 * p / n,
            4 * p,
            "DeepSpeed bf16: full bf16 weights, fp32 master/grads/state sharded; EMA outside ZeRO",
        )
    return rows


def scale_plan(args) -> dict:
    from sdxs.presets import step_flops

    out = {}
    card_w, card_h = args.card_size
    inference = step_flops(args.card_preset, card_w, card_h, batch=2, tokens=251)["unet_step"]
    achieved = inference * args.card_it_s  # FLOP/s the card's sampler reached
    out["card"] = {
        "it_s": args.card_it_s,
        "size": f"{card_w}x{card_h}",
        "unet_flops_per_it": inference,
        "achieved_tflops": achieved / 1e12,
        "utilisation_of_h100": achieved / (args.h100_tflops * 1e12),
    }
    for name, (width, height) in (("sdxs-1b", args.size), ("emoji", (128, 128))):
        s = model_shapes(name)
        factor, c = s["decoder_factor"], s["latent_channels"]
        latent_hw = (height // factor, width // factor)
        config = dict(s["unet"], in_channels=c, out_channels=c, cross_attention_dim=s["text_hidden"])
        t0 = time.perf_counter()
        forward, fwd_bwd = unet_flops(config, 1, latent_hw, s["tokens"])
        act = unet_activations(config, 1, latent_hw, s["tokens"])
        te = text_encoder_flops(s["text_config"], s["tokens"] - 1)
        params = sum(p.numel() for p in meta_unet(config, torch.float32).parameters())
        latent_bytes = 2 * c * latent_hw[0] * latent_hw[1] * FP16  # latents_mean + latents_logvar, fp16
        text_bytes = s["tokens"] * s["text_hidden"] * FP16 + s["tokens"]  # embeds fp16 + uint8 mask, full length
        per_sample = {"plain": fwd_bwd, "checkpointing": fwd_bwd + forward}  # recompute = one more forward
        rate = {k: achieved / v for k, v in per_sample.items()}  # samples/s at the card's FLOP/s
        out[name] = {
            "size": f"{width}x{height}",
            "latent": f"{c}x{latent_hw[0]}x{latent_hw[1]}",
            "unet_parameters": params,
            "cache_latent_bytes": latent_bytes,
            "cache_text_bytes_max": text_bytes,
            "cache_text_bytes_per_token": s["text_hidden"] * FP16 + 1,
            "text_hidden": s["text_hidden"],
            "tokens": s["tokens"],
            "unet_forward_flops": forward,
            "unet_fwd_bwd_flops": fwd_bwd,
            "activations": act,
            "text_encoder": te,
            "samples_per_s": rate,
            "gpu_days": {f"{n:g}": {k: n / r / 86400 for k, r in rate.items()} for n in (1e6, 1e8)},
            "memory": memory_rows(params, act, args.gpus),
            "counted_in_s": time.perf_counter() - t0,
        }
    if not args.no_timing:
        out["emoji"]["timing"] = time_emoji(args.batch_size, args.repeats)
    return out


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def tables(plan: dict) -> dict[str, list[dict]]:
    names = ("sdxs-1b", "emoji")
    m = {n: plan[n] for n in names}
    card = plan["card"]

    def per_model(label, fn):
        return {"quantity": label, **{f"{n} ({m[n]['size']})": fn(m[n]) for n in names}}

    cache = [
        per_model("UNet parameters", lambda d: f"{d['unet_parameters']:,}"),
        per_model("latent (C x h x w)", lambda d: d["latent"]),
        per_model("cache: latents (mean + logvar, fp16)", lambda d: fmt_bytes(d["cache_latent_bytes"])),
        per_model(
            "cache: text embeds, 1 caption at the full 1 + max_length tokens (fp16 + mask)",
            lambda d: f"{fmt_bytes(d['cache_text_bytes_max'])} ({d['tokens']} x {d['text_hidden']})",
        ),
        per_model("cache: text embeds per real token", lambda d: fmt_bytes(d["cache_text_bytes_per_token"])),
        per_model(
            "cache per image, 1 caption, full length",
            lambda d: fmt_bytes(d["cache_latent_bytes"] + d["cache_text_bytes_max"]),
        ),
        per_model(
            "cache for 1M / 100M images",
            lambda d: (
                f"{(d['cache_latent_bytes'] + d['cache_text_bytes_max']) * 1e6 / 1e12:.2f} TB / "
                f"{(d['cache_latent_bytes'] + d['cache_text_bytes_max']) * 1e8 / 1e12:.0f} TB"
            ),
        ),
        per_model("UNet forward, 1 sample (TFLOP)", lambda d: f"{d['unet_forward_flops'] / 1e12:.4f}"),
        per_model(
            "UNet forward + backward, 1 sample (TFLOP; x forward)",
            lambda d: (
                f"{d['unet_fwd_bwd_flops'] / 1e12:.4f} ({d['unet_fwd_bwd_flops'] / d['unet_forward_flops']:.2f}x)"
            ),
        ),
        per_model(
            "... with gradient checkpointing (+1 forward)",
            lambda d: f"{(d['unet_fwd_bwd_flops'] + d['unet_forward_flops']) / 1e12:.4f}",
        ),
        per_model(
            "activations, 1 sample, bf16: plain / checkpointing (GB)",
            lambda d: f"{d['activations']['no_checkpointing'] / GB:.3g} / {d['activations']['checkpointing'] / GB:.3g}",
        ),
    ]
    throughput = [
        per_model(
            f"samples/s per H100 at the card's {card['achieved_tflops']:.0f} TFLOP/s: plain / ckpt",
            lambda d: f"{d['samples_per_s']['plain']:.1f} / {d['samples_per_s']['checkpointing']:.1f}",
        ),
        per_model(
            "GPU-days for 1M samples: plain / ckpt",
            lambda d: f"{d['gpu_days']['1e+06']['plain']:.3g} / {d['gpu_days']['1e+06']['checkpointing']:.3g}",
        ),
        per_model(
            "GPU-days for 100M samples: plain / ckpt",
            lambda d: f"{d['gpu_days']['1e+08']['plain']:.3g} / {d['gpu_days']['1e+08']['checkpointing']:.3g}",
        ),
    ]
    on_the_fly = [
        per_model("text encoder (language model) parameters", lambda d: f"{d['text_encoder']['parameters']:,}"),
        per_model(
            "text encoder FLOPs, 1 caption of max_length tokens: as encode_text calls it / without LM head (TFLOP)",
            lambda d: f"{d['text_encoder']['as_called'] / 1e12:.4f} / {d['text_encoder']['language_model'] / 1e12:.4f}",
        ),
        per_model(
            "text encoder FLOPs per real token, as called (GFLOP; ~linear in tokens)",
            lambda d: f"{d['text_encoder']['as_called'] / (d['tokens'] - 1) / 1e9:.3g}",
        ),
        per_model(
            "... as a share of the UNet training sample (fwd + bwd)",
            lambda d: (
                f"{100 * d['text_encoder']['as_called'] / d['unet_fwd_bwd_flops']:.1f}% / "
                f"{100 * d['text_encoder']['language_model'] / d['unet_fwd_bwd_flops']:.1f}%"
            ),
        ),
        per_model("cache bytes saved per caption (full length)", lambda d: fmt_bytes(d["cache_text_bytes_max"])),
    ]
    timing = m["emoji"].get("timing")
    if timing:
        rate = 1 / timing["unet_fwd_bwd_s_per_sample"]
        throughput.append(
            {
                "quantity": "measured on this CPU (fp32, UNet fwd + bwd only, no optimiser): samples/s; CPU-days per 1M",
                f"sdxs-1b ({m['sdxs-1b']['size']})": "-",
                f"emoji ({m['emoji']['size']})": f"{rate:.1f}; {1e6 / rate / 86400:.2f} CPU-days",
            }
        )
        on_the_fly.append(
            {
                "quantity": f"measured on this CPU, batch {timing['batch']}, {timing['mean_caption_tokens']:.1f} "
                "tokens per caption: encode s/caption vs UNet fwd+bwd s/sample",
                f"sdxs-1b ({m['sdxs-1b']['size']})": "-",
                f"emoji ({m['emoji']['size']})": f"{timing['encode_s_per_caption'] * 1e3:.2f} ms vs "
                f"{timing['unet_fwd_bwd_s_per_sample'] * 1e3:.1f} ms "
                f"(+{100 * timing['encode_s_per_caption'] / timing['unet_fwd_bwd_s_per_sample']:.1f}%)",
            }
        )
    return {
        "cache_and_compute": cache,
        "throughput": throughput,
        "text_on_the_fly": on_the_fly,
        "memory_sdxs-1b": m["sdxs-1b"]["memory"],
        "memory_emoji": m["emoji"]["memory"][:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(1024, 1024), help="sdxs-1b output WIDTHxHEIGHT")
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 8], help="GPU counts for the sharded rows")
    parser.add_argument("--card-it-s", type=float, default=29.98, help="the sdxs-1b card's sampling it/s")
    parser.add_argument(
        "--card-size", type=parse_size, default=(1024, 1408), help="size assumed for the card's it/s (its default)"
    )
    parser.add_argument("--card-preset", default="sdxs-1b")
    parser.add_argument("--h100-tflops", type=float, default=989.0, help="H100 SXM dense bf16 TFLOP/s (spec)")
    parser.add_argument("--batch-size", type=int, default=64, help="emoji timing batch (the emoji recipe's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--no-timing", action="store_true", help="counts only: skip the emoji CPU timings")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    plan = scale_plan(args)
    card = plan["card"]
    print(
        f"card: {card['it_s']} it/s at {card['size']} (assumed), CFG batch 2, 251 tokens: "
        f"{card['unet_flops_per_it'] / 1e12:.3f} TFLOP per it -> {card['achieved_tflops']:.1f} TFLOP/s achieved = "
        f"{100 * card['utilisation_of_h100']:.1f}% of an H100's dense bf16 rate"
    )
    out = tables(plan)
    for title, rows in out.items():
        print(f"\n### {title}")
        print_table(rows)
    env = environment("cpu", command="python bench/scale.py " + " ".join(__import__("sys").argv[1:]))
    path = write_results("scale", env, plan=plan)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
