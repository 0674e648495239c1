"""Image metrics for the VAE table (pixels in [0, 1], tensors (B, 3, H, W)) and the 2x resamplers it compares."""

from __future__ import annotations

import math


def mse_per_image(a, b):
    """Mean squared error of each image pair: (B, C, H, W) x2 -> (B,)."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1)


def psnr_from_mse(mse):
    """PSNR in dB for a peak of 1: `10 log10(1 / mse)`; identical images (mse 0) give `inf`."""
    import torch

    mse = torch.as_tensor(mse, dtype=torch.float64)
    return torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))


def sobel_magnitude(x):
    """Sobel gradient magnitude of each channel: (B, C, H, W) -> (B, C, H, W), borders replicated."""
    import torch
    import torch.nn.functional as F

    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    b, c, h, w = x.shape
    flat = F.pad(x.double().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(flat, kernels)  # (B*C, 2, H, W)
    return g.pow(2).sum(1).sqrt().reshape(b, c, h, w)


def edge_error_per_image(a, b):
    """Mean absolute difference of Sobel gradient magnitudes, per image: (B, C, H, W) x2 -> (B,)."""
    return (sobel_magnitude(a) - sobel_magnitude(b)).abs().flatten(1).mean(1)


def edge_energy_ratio_per_image(a, b):
    """Edge energy of `a` over that of `b`, per image: mean Sobel magnitude ratio, (B, C, H, W) x2 -> (B,).
    1 is as sharp as `b`; below 1 blurred, above 1 over-sharpened or noisy (a flat `b` counts as energy 1e-12)."""
    return sobel_magnitude(a).flatten(1).mean(1) / sobel_magnitude(b).flatten(1).mean(1).clamp_min(1e-12)


def kl_per_image(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements, per image: (B, C, h, w) x2 -> (B,)."""
    mean, logvar = mean.double(), logvar.double()
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).mean(1)


def downsample2x(pixels):
    """2x2 box average (the VAE trainer's `F.interpolate(mode="area")`): (B, 3, H, W) -> (B, 3, H/2, W/2)."""
    import torch.nn.functional as F

    return F.avg_pool2d(pixels, 2)


def bicubic_upscale2x(pixels):
    """Bicubic 2x upscale (PyTorch, a = -0.75, half-pixel centres), clipped to [0, 1]."""
    import torch.nn.functional as F

    return F.interpolate(pixels, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
