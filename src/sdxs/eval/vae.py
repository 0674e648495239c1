"""The VAE measurement: R/2 -> R reconstruction against a bicubic 2x upscale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sdxs.eval import metrics
from sdxs.eval.dataset import EmojiItem, load_image01
from sdxs.eval.features import thumbnail_features
from sdxs.eval.generation import batches


def _stack_same_size(images: Sequence[np.ndarray], multiple: int = 16) -> np.ndarray:
    """(B, H, W, 3) from same-size images whose sides are multiples of `multiple` (the decoder factor)."""
    shapes = {im.shape for im in images}
    if len(shapes) != 1 or any(side % multiple for side in images[0].shape[:2]):
        raise ValueError(
            f"the VAE eval needs same-size images with sides that are multiples of {multiple} "
            f"(the emoji set is 256x256); got sizes {sorted(s[:2] for s in shapes)}"
        )
    return np.stack(images)


@dataclass
class VAEResult:
    """Mean metrics of one image set for the VAE and the bicubic baseline, plus raw features of the reconstructions."""

    label: str
    count: int
    # "VAE" / "bicubic" -> {"MSE": .., "PSNR": .., "Edge": .., "EdgeEnergy": .., "KL": ..}; Edge is the Sobel edge
    # error, EdgeEnergy the reconstruction's Sobel energy over the original's (1: as sharp), KL the VAE's only
    rows: dict[str, dict[str, float]]
    psnr_wins: int = 0  # images whose VAE reconstruction has the higher PSNR of the two
    recon_features: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # name -> (count, D)
    style: str = ""  # the set's style on a multi-style dataset (`sdxs data emoji --styles`); "" otherwise
    # the first `keep` images (`evaluate_vae(keep=...)`): "original" / "VAE" / "bicubic" -> uint8 (H, W, 3) arrays
    samples: dict[str, list[np.ndarray]] = field(repr=False, default_factory=dict)


def evaluate_vae(
    pipe,
    items: Sequence[EmojiItem],
    label: str,
    batch_size: int,
    progress=None,
    resolution: int | None = None,
    style: str | None = None,
    keep: int = 0,
) -> VAEResult:
    """What: how well the VAE upscales, as a 2x super-resolution: each image box-downsampled to R/2, encoded and
    decoded (decoder factor / encoder factor = 2) back to R, compared with the image at R: MSE, PSNR, Sobel edge
    error, and the posterior's KL; beside it the same numbers for a bicubic 2x upscale of the same R/2 input.

    On: `items` (the validation split, and a fixed subset of training images), box-resized to `resolution` R (the
    model's output size; None: their own size). Batches of `batch_size`. `style` (a multi-style dataset's
    `style` field, e.g. "twemoji"): only the items of that style, and the result records it; None: all items.
    `keep`: also return the first `keep` originals and reconstructions (`samples`, for a grid).

    Chance level: none (not a retrieval); the bicubic row is the baseline, and `psnr_wins` counts the images whose
    VAE reconstruction beats it (half of them for a VAE as good as bicubic).
    """
    import torch

    from sdxs.pipeline import normalize_latents

    if style is not None:
        items = [it for it in items if it.style == style]
    if not items:
        where = f" of style {style!r}" if style is not None else ""
        raise ValueError(f"no images{where} to reconstruct for the VAE set {label!r}")
    vae = pipe.vae
    ratio = pipe.vae_scale_factor // pipe.vae_encoder_scale_factor  # 2: the decoder's extra upsampling
    if ratio != 2:
        raise ValueError(
            f"the VAE eval needs a 2x asymmetric VAE (decoder factor = 2 x encoder's); this one is {ratio}x"
        )
    sums: dict[str, dict[str, float]] = {"VAE": {}, "bicubic": {}}
    feats: dict[str, list[np.ndarray]] = {"VAE": [], "bicubic": []}
    wins = 0
    samples: dict[str, list[np.ndarray]] = {"original": [], "VAE": [], "bicubic": []}
    for start, end in batches(len(items), batch_size):
        target = torch.from_numpy(_stack_same_size([load_image01(it.path, resolution) for it in items[start:end]]))
        target = target.permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]
        small = metrics.downsample2x(target)  # (B, 3, H/2, W/2) in [0, 1]
        with torch.no_grad():
            posterior = vae.encode((small * 2 - 1).to(vae.device, vae.dtype)).latent_dist
            # the pipeline's own latent space (per-channel latents_mean/std when the VAE config has them)
            decoded = pipe._vae_decode(normalize_latents(posterior.mode(), vae))  # [-1, 1], float32
        outputs = {"VAE": ((decoded.cpu() + 1) / 2).clamp(0, 1), "bicubic": metrics.bicubic_upscale2x(small)}
        kl = metrics.kl_per_image(posterior.mean.float().cpu(), posterior.logvar.float().cpu())
        mses = {name: metrics.mse_per_image(out, target) for name, out in outputs.items()}
        wins += int((mses["VAE"] < mses["bicubic"]).sum())
        for name, images in (("original", target), *outputs.items()):
            taken = images[: max(0, keep - start)].permute(0, 2, 3, 1).numpy()
            samples[name] += [(im * 255 + 0.5).clip(0, 255).astype(np.uint8) for im in taken]
        for name, out in outputs.items():
            mse = mses[name]
            per_image = {
                "MSE": mse,
                "PSNR": metrics.psnr_from_mse(mse),
                "Edge": metrics.edge_error_per_image(out, target),
                "EdgeEnergy": metrics.edge_energy_ratio_per_image(out, target),
            }
            if name == "VAE":
                per_image["KL"] = kl
            for metric, values in per_image.items():
                sums[name][metric] = sums[name].get(metric, 0.0) + float(values.sum())
            feats[name] += [thumbnail_features(im) for im in out.permute(0, 2, 3, 1).numpy()]
        if progress is not None:
            progress.update(end - start)
    rows = {name: {m: total / len(items) for m, total in totals.items()} for name, totals in sums.items()}
    features = {k: np.stack(v) for k, v in feats.items()}
    return VAEResult(label, len(items), rows, wins, features, style or "", samples if keep else {})
