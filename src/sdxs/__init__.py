"""SDXS: Simple Diffusion XS — pipeline, presets, data preparation, training, export, evaluation, CLI, server."""

__version__ = "0.1.0"
