"""Fingerprints of what made a latent cache: VAE encoder, text encoder and text recipe.

A cache is only valid for the exact encoders that made it: latents from another VAE or embeddings from another
text encoder would silently train a model against the wrong spaces. `prepare` stores these fingerprints in the
manifest and training compares them with its own models (`LatentShardLoader.check_fingerprint`).

Weights are hashed as float16 bytes so that the same weights loaded in float32, float16 or on another device give
the same fingerprint (the cache itself is stored in float16). Only the VAE *encoder* side (encoder, quant_conv,
scaling factor) is hashed: the decoder never touches the cache, so a fine-tuned decoder keeps it valid.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

FINGERPRINT_KEYS = ("vae", "text_encoder", "text_recipe", "tokenizer")


def hash_state(module: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the (name, shape, float16 bytes) of every parameter and buffer whose name starts with `prefixes`."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(torch.float16)
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_vae(vae) -> str:
    """Fingerprint of the parts of the VAE that make latents: encoder, quant_conv, scaling_factor (and latents_mean/std)."""
    h = hashlib.sha256(hash_state(vae, ("encoder.", "quant_conv.")).encode())
    h.update(repr(float(vae.config.scaling_factor)).encode())
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:  # per-channel normalisation (absent: the fingerprint is unchanged)
        h.update(repr(([float(v) for v in mean], [float(v) for v in std])).encode())
    return h.hexdigest()[:16]


def fingerprint_text_encoder(text_encoder) -> str:
    """Fingerprint of all text-encoder weights."""
    return hash_state(text_encoder)


def fingerprint_tokenizer(tokenizer) -> str:
    """Fingerprint of how a tokenizer turns text into ids: the normaliser, pre-tokeniser and model (vocabulary and
    merges) of its tokenizer.json. Another normalisation gives other ids, hence other embeddings; padding and
    truncation settings, which a loaded tokenizer may carry differently, are left out."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        spec = {"vocab": tok.get_vocab()}
    else:
        full = json.loads(backend.to_str())
        spec = {k: full.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_recipe(recipe: dict[str, Any]) -> str:
    """Fingerprint of the (complete) text recipe, key order independent."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(
    vae=None, text_encoder=None, text_recipe: dict[str, Any] | None = None, tokenizer=None
) -> dict[str, str]:
    """{"vae": ..., "text_encoder": ..., "text_recipe": ..., "tokenizer": ...} for the components given (others are
    left out)."""
    from sdxs.pipeline import DEFAULT_TEXT_RECIPE

    out = {}
    if vae is not None:
        out["vae"] = fingerprint_vae(vae)
    if text_encoder is not None:
        out["text_encoder"] = fingerprint_text_encoder(text_encoder)
    if text_recipe is not None:
        out["text_recipe"] = fingerprint_recipe({**DEFAULT_TEXT_RECIPE, **text_recipe})
    if tokenizer is not None:
        out["tokenizer"] = fingerprint_tokenizer(tokenizer)
    return out


def compare_fingerprints(cached: dict[str, str], current: dict[str, str], where: str = "the cache") -> None:
    """Raise `ValueError` naming every component whose fingerprint differs between `cached` and `current`."""
    # a cache made before the tokenizer was fingerprinted has no "tokenizer" entry: it is not checked, not refused
    differ = [k for k in FINGERPRINT_KEYS if k in current and k in cached and cached[k] != current[k]]
    differ += [k for k in ("vae", "text_encoder", "text_recipe") if k in current and k not in cached]
    if differ:
        detail = ", ".join(f"{k} (cache {cached.get(k)}, given {current[k]})" for k in differ)
        raise ValueError(
            f"{where} was made with a different {' and '.join(differ)}: {detail}. Train with the model the cache "
            "was made with, or run `sdxs prepare` again with this model into a new folder."
        )
