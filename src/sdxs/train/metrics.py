"""Training metrics: metrics.jsonl (one JSON object per logged step), the loss-curve PNG and the progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = path.read_text().splitlines() if path.exists() and resume_step > 0 else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    """Loss (and a smoothed curve) against step, log-scale y, written with matplotlib's Agg backend."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 5:
        k = max(len(loss) // 20, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


def progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
