"""Asymmetric VAE training (`sdxs train vae`): the encoder sees the image at half size, the 16x decoder rebuilds it.

The SDXS trick: train the 8x encoder on a 2x-downsampled crop and ask the 16x decoder for the full-resolution crop,
so the decoder learns a 2x upscale for free. AsymmetricAutoencoderKL.forward(sample) would hand the target image
to its MaskConditionDecoder as a condition (a leak), so training calls encode(...).latent_dist and decode(z) only.
Losses: L1 / MSE + KL + Sobel edges (+ LPIPS when its weights are on disk). At the end the latent channel
statistics are measured and `scaling_factor = 1 / std` (or, with `loss.latent_normalization = "per_channel"`, the
per-channel `latents_mean` / `latents_std`) is written into the VAE config, so pipeline and prepare agree.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdxs.train.batches import IndexBatches
from sdxs.train.common import Task, fit, load_matching, log_load_report, make_accelerator, read_weights
from sdxs.train.config import VAELossConfig, VAETrainConfig

logger = logging.getLogger("sdxs.train")


# ----------------------------------------------------------------------------------------------------------------
# Model wrapper and losses
# ----------------------------------------------------------------------------------------------------------------


class EncodeDecode(torch.nn.Module):
    """Half-size image -> posterior -> sampled latent -> full-size image, as one forward (so DDP sees it)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, small: torch.Tensor, generator: torch.Generator | None = None):
        # small (B, 3, H/2, W/2) in [-1, 1] -> recon (B, 3, H, W), posterior over (B, C, H/16, W/16)
        posterior = self.vae.encode(small).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator, device=small.device, dtype=posterior.mean.dtype)
        z = posterior.mean + posterior.std * eps
        return self.vae.decode(z).sample, posterior


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses per channel: (B, C, H, W) -> (B, 2C, H, W)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=x.shape[1])


def load_lpips(cfg: VAELossConfig):
    """LPIPS from local weights only; None when its weight is 0."""
    if cfg.lpips_weight <= 0:
        return None
    if not cfg.lpips_path or not Path(cfg.lpips_path).is_file():
        raise FileNotFoundError(
            f"`loss.lpips_weight` > 0 needs `loss.lpips_path`, a local LPIPS weights file (got {cfg.lpips_path!r}); "
            "weights are never downloaded during training. Set loss.lpips_weight=0 to train without it."
        )
    try:
        import lpips
    except ModuleNotFoundError as e:
        raise ValueError("`loss.lpips_weight` > 0 needs the `lpips` package (pip install lpips).") from e
    # lpips_path holds LPIPS's linear heads; its VGG backbone comes from torchvision's cache, which must exist too
    backbone = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob("vgg16-*.pth"))
    if not backbone:
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 weights in {torch.hub.get_dir()}/checkpoints (never downloaded here)."
        )
    return (
        lpips.LPIPS(net="vgg", model_path=cfg.lpips_path, pnet_rand=False, verbose=False).eval().requires_grad_(False)
    )


def vae_loss(model, batch: dict, cfg: VAELossConfig, lpips_model, generator: torch.Generator):
    """Reconstruction of the full-size image from its half-size version; returns (loss, parts)."""
    device = generator.device
    target = batch["pixels"].to(device)  # (B, 3, H, W) in [-1, 1]
    small = F.interpolate(target, scale_factor=0.5, mode="area")  # what the 8x encoder sees
    recon, posterior = model(small, generator)
    recon = recon.float()
    parts = {
        "l1": (recon - target).abs().mean(),
        "mse": F.mse_loss(recon, target),
        "kl": posterior.kl().mean() / posterior.mean[0].numel(),  # per latent element: independent of size
        "edge": (sobel(recon) - sobel(target)).abs().mean(),
    }
    loss = (
        cfg.l1_weight * parts["l1"]
        + cfg.mse_weight * parts["mse"]
        + cfg.kl_weight * parts["kl"]
        + cfg.edge_weight * parts["edge"]
    )
    if lpips_model is not None:
        parts["lpips"] = lpips_model.to(device)(recon, target).mean()
        loss = loss + cfg.lpips_weight * parts["lpips"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Data: image crops, seeded per (epoch, batch, rank) so a resumed run sees the same crops
# ----------------------------------------------------------------------------------------------------------------


def image_weights(files: list[Path], folder: str, source: str) -> list[float]:
    """One draw weight per file from `data.sample_weights` (file_name relative to `folder`; unlisted files: 1)."""
    from sdxs.data.loader import read_sample_weights

    table = read_sample_weights(source)
    names = [p.relative_to(folder).as_posix() for p in files]
    if not any(n in table for n in names):
        raise ValueError(
            f"`data.sample_weights` {source!r} names none of the {len(files)} images of {folder!r} (its keys look like "
            f"{next(iter(table))!r}, the images like {names[0]!r}): list paths relative to `data.path`."
        )
    weights = [table.get(n, 1.0) for n in names]
    if sum(weights) <= 0:
        raise ValueError(f"`data.sample_weights` {source!r} gives every image weight 0.")
    return weights


def list_images(folder: str) -> list[Path]:
    from sdxs.data.folder import IMAGE_EXTENSIONS

    root = Path(folder)
    if not folder or not root.is_dir():
        raise FileNotFoundError(f"`data.path` {folder!r} is not an image folder.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise ValueError(f"`data.path` {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


RESAMPLE_FILTERS = ("lanczos", "box", "bicubic", "bilinear")


class ImageBatches:
    """Random square crops of side `resolution` (shorter side resized to it first), as (B, 3, R, R) in [-1, 1]."""

    def __init__(
        self,
        files: list[Path],
        resolution: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        resample: str = "lanczos",
        weights: list[float] | None = None,
    ):
        import PIL.Image

        if resample not in RESAMPLE_FILTERS:
            raise ValueError(f"`data.resample` must be one of {', '.join(RESAMPLE_FILTERS)}; got {resample!r}.")
        self.files, self.resolution, self.seed, self.rank = files, resolution, seed, rank
        self.resample = PIL.Image.Resampling[resample.upper()]
        self.index = IndexBatches(len(files), batch_size, seed, rank, world, weights=weights)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from sdxs.pipeline import load_rgb_image

        rng = np.random.default_rng([self.seed, self.index.epoch, self.index.position, self.rank])
        pixels = []
        for i in next(self.index):
            im = load_rgb_image(self.files[i])
            scale = self.resolution / min(im.size)
            w, h = max(self.resolution, round(im.width * scale)), max(self.resolution, round(im.height * scale))
            im = im.resize((w, h), self.resample)
            x, y = int(rng.integers(0, w - self.resolution + 1)), int(rng.integers(0, h - self.resolution + 1))
            im = im.crop((x, y, x + self.resolution, y + self.resolution))
            pixels.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        return {"pixels": torch.stack(pixels)}

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict, replan: bool = False) -> None:
        self.index.load_state_dict(state, replan)


# ----------------------------------------------------------------------------------------------------------------
# Model, statistics, entry point
# ----------------------------------------------------------------------------------------------------------------


def build_vae(cfg: VAETrainConfig):
    from diffusers import AsymmetricAutoencoderKL

    from sdxs.presets import fresh_component, get_preset

    m = cfg.model
    if m.vae_preset:
        vae = fresh_component(get_preset(m.vae_preset), "vae", cfg.run.seed)
    elif m.pretrained:
        vae = AsymmetricAutoencoderKL.from_pretrained(Path(m.pretrained) / "vae")
    else:
        raise ValueError("set `model.vae_preset` (fresh VAE) or `model.pretrained` (a model folder with vae/).")
    if m.init_from:
        folder = Path(m.init_from)
        folder = folder / "vae" if (folder / "vae").is_dir() else folder
        log_load_report(load_matching(vae, read_weights(folder)), str(folder))
    if not m.train_encoder:
        if m.vae_preset and not m.init_from:
            raise ValueError(
                "`model.train_encoder = false` fine-tunes the decoder of a trained VAE: set `model.pretrained` or "
                "`model.init_from` (a fresh preset's encoder would stay random)."
            )
        vae.encoder.requires_grad_(False)  # also skips the encoder's backward pass
        vae.quant_conv.requires_grad_(False)
    return vae.float().train()


@torch.no_grad()
def latent_statistics(vae, batches, num_batches: int) -> dict:
    """Per-channel mean/std of the (unscaled) posterior means over `num_batches`, and the implied scaling factor."""
    device = next(vae.parameters()).device
    latents = []
    for _ in range(num_batches):
        pixels = next(batches)["pixels"].to(device)
        latents.append(vae.encode(F.interpolate(pixels, scale_factor=0.5, mode="area")).latent_dist.mean.float())
    z = torch.cat(latents)  # (N, C, h, w)
    std = float(z.std())
    return {
        "latent_channel_mean": [round(v, 5) for v in z.mean((0, 2, 3)).tolist()],
        "latent_channel_std": [round(v, 5) for v in z.std((0, 2, 3)).tolist()],
        "latent_std": std,
        "scaling_factor": 1.0 / max(std, 1e-8),
    }


def train_vae(cfg: VAETrainConfig, resume: str | None = None) -> Path:
    """Train an AsymmetricAutoencoderKL on `cfg.data.path`; returns the final checkpoint folder."""
    from sdxs.model_folder import export_run

    if cfg.loss.latent_normalization not in ("scalar", "per_channel"):
        raise ValueError(
            f"`loss.latent_normalization` must be 'scalar' or 'per_channel', got {cfg.loss.latent_normalization!r}."
        )
    accelerator = make_accelerator(cfg.run)
    vae = build_vae(cfg)
    files = list_images(cfg.data.path)
    d = cfg.data
    if d.resolution % 32:
        raise ValueError(
            f"`data.resolution` must be a multiple of 32 (16x decoder, half-size input), got {d.resolution}."
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    weights = image_weights(files, d.path, d.sample_weights) if d.sample_weights else None
    data = ImageBatches(files, d.resolution, d.batch_size, cfg.run.seed, rank, world, d.resample, weights)
    lpips_model = load_lpips(cfg.loss)
    if accelerator.is_main_process:
        logger.info("VAE: %d images, %d px out, %d px into the encoder", len(files), d.resolution, d.resolution // 2)
        if weights is not None:
            logger.info(
                "sample weights from %s: %g-%g (unlisted images weigh 1)", d.sample_weights, min(weights), max(weights)
            )

    def record_statistics(model) -> dict:
        # the same fixed batches on every rank, so every rank writes the same scaling factor
        fixed = ImageBatches(files, d.resolution, d.batch_size, cfg.run.seed + 1, resample=d.resample)
        stats = latent_statistics(model.vae, fixed, cfg.loss.stats_batches)
        if not cfg.model.train_encoder:  # decoder-only: the latent space, and with it the UNet's scale, is unchanged
            stats["scaling_factor"] = float(model.vae.config.scaling_factor)
        elif cfg.loss.latent_normalization == "per_channel":  # (z - mean) * 1 / std per channel
            stats["scaling_factor"] = 1.0
            model.vae.register_to_config(
                scaling_factor=1.0,
                latents_mean=stats["latent_channel_mean"],
                latents_std=[max(v, 1e-5) for v in stats["latent_channel_std"]],
            )
        else:  # a scalar scale; statistics of a base VAE no longer describe the retrained encoder
            model.vae.register_to_config(scaling_factor=stats["scaling_factor"])
            if model.vae.config.get("latents_mean") is not None or model.vae.config.get("latents_std") is not None:
                model.vae.register_to_config(latents_mean=None, latents_std=None)
        logger.info(
            "latent channel mean %s std %s -> scaling_factor %.4f",
            stats["latent_channel_mean"],
            stats["latent_channel_std"],
            stats["scaling_factor"],
        )
        return stats

    task = Task(
        name="vae",
        model=EncodeDecode(vae),
        loss_fn=lambda model, batch, gen: vae_loss(model, batch, cfg.loss, lpips_model, gen),
        data=data,
        batch_size=d.batch_size,
        save_model=lambda vae, folder: vae.save_pretrained(folder, safe_serialization=True),
        inner=lambda model: model.vae,
        before_final_save=record_statistics,
        export_fn=(lambda run_dir: export_run(run_dir, run_dir / "export")) if cfg.model.pretrained else None,
    )
    return fit(task, cfg, resume=resume, accelerator=accelerator)
