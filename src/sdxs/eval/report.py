"""The report: every number of a run (`EvalResult`), the Markdown page (docs/eval.md) and the PNG grids."""

from __future__ import annotations

import io
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from sdxs.eval import strict as eval_strict
from sdxs.eval.features import TOP_K, RetrievalResult, chance_percent
from sdxs.eval.generation import GenerationSettings
from sdxs.eval.vae import VAEResult

GRID_THUMB = 128  # sample grid cell side in pixels
GRID_MAX_BYTES = 500_000  # the grid is committed: keep it small


def save_small_png(image: PIL.Image.Image, path: Path, max_bytes: int = GRID_MAX_BYTES) -> int:
    """Save as PNG; if larger than `max_bytes`, as a 256-colour palette PNG instead. Returns the size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    if buffer.tell() > max_bytes:
        buffer = io.BytesIO()
        image.quantize(256, method=PIL.Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


@dataclass
class EvalResult:
    """Every number of the report (also returned by `evaluate` for tests and scripts)."""

    vae: list[VAEResult]
    prompts: list[RetrievalResult]
    oracle: list[RetrievalResult]
    image_prompts: list[RetrievalResult]
    refine: list[tuple[str, str]]
    grid_path: Path | None
    markdown_path: Path
    gallery_size: int
    strict: eval_strict.StrictResult | None = None
    strict_grid_path: Path | None = None
    prompt_kinds: list[RetrievalResult] = field(default_factory=list)  # training captions split by kind


def _interleave(groups: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """Up to `n` items taken round-robin from the groups, so every group shows in the grid."""
    picked, i = [], 0
    while len(picked) < n and any(i < len(g) for g in groups):
        picked += [g[i] for g in groups if i < len(g)]
        i += 1
    return picked[:n]


def describe_hardware(device) -> str:
    """The accelerator (if any), the CPU and its core count, e.g. "NVIDIA H100 (cuda); CPU: ... x16"."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = []
    device = torch.device(device)
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} (cuda)")
    elif device.type != "cpu":
        parts.append(device.type)
    parts.append(f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    return "; ".join(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def _fmt_metrics(row: dict[str, float]) -> str:
    parts = [f"MSE={row['MSE']:.3e}", f"PSNR={row['PSNR']:.2f}", f"Edge={row['Edge']:.3f}"]
    if "KL" in row:
        parts.append(f"KL={row['KL']:.3f}")
    return " ".join(parts)


def _retrieval_table(results: Sequence[RetrievalResult], first_column: str) -> list[str]:
    head = [f"| {first_column} | n | " + " | ".join(f"top-{k}" for k in TOP_K) + " | chance top-1 / top-5 |"]
    head.append("|---|---:|" + "---:|" * len(TOP_K) + "---:|")
    for r in results:
        chance = " / ".join(f"{chance_percent(k, r.gallery_size):.2f}%" for k in TOP_K)
        tops = " | ".join(f"{r.top(k):.1f}%" for k in TOP_K)
        head.append(f"| {_cell(r.label)} | {r.count} | {tops} | {chance} |")
    return head


def render_markdown(result: EvalResult, settings: dict[str, Any]) -> str:
    """The report: settings, then one section per measurement, with a link to docs/eval-method.md."""
    lines = _header_lines(result, settings) + _vae_lines(result, settings) + _fidelity_lines(result, settings)
    lines += _refine_lines(result, settings) + _strict_lines(result) + _samples_lines(result)
    return "\n".join(lines)


def write_report(result: EvalResult, settings: dict[str, Any]) -> Path:
    """Write `render_markdown` to `result.markdown_path` (folders made as needed) and return the path."""
    result.markdown_path.parent.mkdir(parents=True, exist_ok=True)
    result.markdown_path.write_text(render_markdown(result, settings), encoding="utf-8")
    return result.markdown_path


def _relative(path: Path, result: EvalResult) -> str:
    """`path` relative to the report's folder, with forward slashes (a Markdown link)."""
    return os.path.relpath(path.resolve(), result.markdown_path.parent.resolve()).replace(os.sep, "/")


def _header_lines(result: EvalResult, settings: dict[str, Any]) -> list[str]:
    gen: GenerationSettings = settings["gen"]
    return [
        "# SDXS evaluation",
        "",
        "Written by `sdxs eval`; how each number is computed: [eval-method.md](eval-method.md).",
        "",
        f"- date: {settings['date']}",
        f"- model: `{settings['model']}`",
        f"- data: `{settings['data']}` ({result.gallery_size} images)",
        f"- command: `{settings['command']}`",
        f"- hardware: {settings['hardware']}",
        f"- software: {settings['versions']}",
        f"- generation: {gen.steps} steps, guidance {gen.guidance}, {settings['size']} px, {settings['dtype']}, "
        f"seed {gen.seed} + i for image i of each group, batch size {gen.batch_size}",
        "",
    ]


def _vae_lines(result: EvalResult, settings: dict[str, Any]) -> list[str]:
    res = settings.get("vae_resolution", 256)
    enc_f, dec_f = settings.get("vae_factors", (8, 16))
    lines = [
        f"## VAE: {res // 2} -> {res} reconstruction",
        "",
        f"Each image is box-resized to {res} px (the model's output size; the emoji files are 256 px), "
        f"box-downsampled to {res // 2} px, then either encoded ({enc_f}x) and decoded ({dec_f}x) by the VAE or "
        f"upscaled 2x bicubic; both are compared with the {res} px image (pixels in [0, 1]). KL only applies to "
        "the VAE.",
        "",
    ]
    for v in result.vae:
        lines += [f"{v.label} split, {v.count} images:", "", "```"]
        lines += [f"{name} | {_fmt_metrics(row)}" for name, row in v.rows.items()]
        lines += ["```", "", f"The VAE's PSNR is the higher of the two on {v.psnr_wins} of the {v.count} images.", ""]
    if any(v.style for v in result.vae):
        lines += vae_style_table(result.vae)
    return lines


def vae_style_table(results: Sequence[VAEResult]) -> list[str]:
    """The VAE sets of a multi-style dataset side by side: PSNR of the VAE and of bicubic, the VAE's wins, the Sobel
    edge error and the edge energy (reconstruction's Sobel energy / the original's: 1 is as sharp, < 1 blurred)."""
    lines = [
        "Per style (edge energy: the reconstruction's Sobel energy over the original's, 1 = as sharp, < 1 blurred):",
        "",
        "| set | n | PSNR VAE | PSNR bicubic | VAE PSNR higher | edge error VAE / bicubic "
        "| edge energy VAE / bicubic |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in results:
        vae, bic = v.rows["VAE"], v.rows["bicubic"]
        lines.append(
            f"| {_cell(v.label)} | {v.count} | {vae['PSNR']:.2f} dB | {bic['PSNR']:.2f} dB | "
            f"{v.psnr_wins}/{v.count} | {vae['Edge']:.3f} / {bic['Edge']:.3f} | "
            f"{vae['EdgeEnergy']:.2f} / {bic['EdgeEnergy']:.2f} |"
        )
    return [*lines, ""]


def _fidelity_lines(result: EvalResult, settings: dict[str, Any]) -> list[str]:
    """Prompt fidelity, its split by kind, the feature space's ceiling, and image prompts."""
    res = settings.get("vae_resolution", 256)
    lines = [
        "## Prompt fidelity",
        "",
        f"Each first caption line is generated once; the image then retrieves its nearest neighbours among all "
        f"{result.gallery_size} dataset images (train + validation) in the thumbnail feature space. A hit is the "
        "prompted emoji's own image within the top k.",
        "",
        *_retrieval_table(result.prompts, "captions"),
        "",
    ]
    if result.prompt_kinds:
        lines += [
            "The training captions by kind (people with skin tones are the easiest to retrieve: the shape is "
            "shared and the tone picks the image; flags the hardest: small coloured details on one shape):",
            "",
            *_retrieval_table(result.prompt_kinds, "kind"),
            "",
        ]
    return lines + [
        f"Ceiling of the feature space: the dataset's own images, reconstructed {res // 2} -> {res}, retrieving the "
        "original.",
        "",
        *_retrieval_table(result.oracle, "queries"),
        "",
        "## Image prompts",
        "",
        "`encode_image` of a dataset image, generation from that embedding, retrieval of the source image.",
        "",
        *_retrieval_table(result.image_prompts, "source images"),
        "",
    ]


def _refine_lines(result: EvalResult, settings: dict[str, Any]) -> list[str]:
    if not result.refine:
        return []
    return [
        "## refine_prompts",
        "",
        f"`pipe.refine_prompts(prompts, max_new_tokens={settings['refine_max_new_tokens']}, "
        f"seed={settings['gen'].seed})`",
        "",
        "| input | output |",
        "|---|---|",
        *[f"| {_cell(a)} | {_cell(b)} |" for a, b in result.refine],
        "",
    ]


def _strict_lines(result: EvalResult) -> list[str]:
    st = result.strict
    if st is None:
        return []
    lines = [
        "## Strict prompt fidelity, per kind",
        "",
        "Each generation and every dataset render are composited on white and box-downsampled to 32x32; the "
        f"{result.gallery_size} renders are ranked by L2 distance and a hit is the prompted emoji within the top k "
        f"(chance {100 / result.gallery_size:.2f}% top-1). Bare names are what a user types (`red apple`); exact "
        "captions add the dataset's `, 3d render`. Nearest-render distance: RMS per pixel to the nearest render "
        "(renders are a median ~0.17 apart); edge energy: Sobel energy of the generation over the retrieved "
        "render's (blur < 1 < blotchy). Method: `sdxs/eval/strict.py`.",
        "",
        eval_strict.markdown_table(st.scores),
        "",
    ]
    if st.refine_kept is not None:
        lines += [
            f"`refine_prompts` of bare training names keeps the named emoji in {st.refine_kept:.1f}% of "
            f"{len(st.refine_examples)} prompts (rows 'refine set') and adds {st.refine_tags[0]} of the emoji's own "
            f"caption tags and {st.refine_tags[1]} others (style and skin tones aside). Examples:",
            "",
            "| bare name | refined |",
            "|---|---|",
            *[f"| {_cell(a)} | {_cell(b)} |" for a, b in st.refine_examples[:8]],
            "",
        ]
    if result.strict_grid_path is not None:
        lines += [
            "Bare-name generations across kinds:",
            "",
            f"![bare names]({_relative(result.strict_grid_path, result)})",
            "",
        ]
    return lines


def _samples_lines(result: EvalResult) -> list[str]:
    if result.grid_path is None:
        return []
    return [
        "## Samples",
        "",
        "Generated images of the prompt-fidelity groups (taken in turn), captioned with their prompt.",
        "",
        f"![sample grid]({_relative(result.grid_path, result)})",
        "",
    ]
