"""`evaluate`: run every measurement of `sdxs eval` on one model and write the report (docs/eval.md).

Everything is deterministic given `seed`: the training-caption subset, image `i`'s generation seed (`seed + i`
within each group) and `refine_prompts`' sampling.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdxs.eval import strict as eval_strict
from sdxs.eval.dataset import HOLDOUT_EMOJI, HOLDOUT_TONE, EmojiItem, load_emoji_dataset, pick_subset, styles_of
from sdxs.eval.features import RetrievalIndex, gallery_features
from sdxs.eval.fidelity import feature_ceiling, prompt_fidelity, split_by_kind
from sdxs.eval.generation import (
    GenerationSettings,
    LogProgress,
    generate_from_images,
    generate_from_prompts,
    load_eval_pipeline,
)
from sdxs.eval.image_prompts import image_prompt_fidelity
from sdxs.eval.refine import DEFAULT_REFINE_PROMPTS, refine_table
from sdxs.eval.report import EvalResult, _interleave, _version, describe_hardware, save_small_png, write_report
from sdxs.eval.vae import evaluate_vae
from sdxs.grid import make_grid


@dataclass
class EvalPlan:
    """The fixed image subsets of one run (chosen from `seed` before any generation)."""

    items: list[EmojiItem]
    prompt_groups: dict[str, list[EmojiItem]]
    vae_sets: dict[str, list[EmojiItem]]
    image_sets: dict[str, list[EmojiItem]]
    caption_set: list[EmojiItem]
    vae_styles: dict[str, str] = field(default_factory=dict)  # VAE set label -> its style (multi-style data only)

    @property
    def total(self) -> int:
        """Images the progress bar counts: gallery, VAE sets, prompt groups and image prompts."""
        groups = (self.vae_sets, self.prompt_groups, self.image_sets)
        return len(self.items) + sum(len(g) for sets in groups for g in sets.values())


def plan_subsets(
    items: list[EmojiItem],
    seed: int,
    train_captions: int,
    vae_train_images: int,
    image_prompts: int,
    limit: int | None,
) -> EvalPlan:
    """The groups of every measurement: a fixed random subset each (seeds `seed`, `seed + 1`, `seed + 2`)."""

    def cap(n: int | None) -> int | None:
        return n if limit is None else min(limit, n if n is not None else limit)

    train = [it for it in items if it.split == "train"]
    validation = [it for it in items if it.split != "train"]
    caption_set = pick_subset(train, cap(train_captions), seed)
    prompt_groups = {
        f"training captions (random {len(caption_set)} of {len(train)})": caption_set,
        "held-out emoji": pick_subset([it for it in items if it.holdout == HOLDOUT_EMOJI], cap(None), seed),
        "held-out skin-tone variants": pick_subset([it for it in items if it.holdout == HOLDOUT_TONE], cap(None), seed),
    }
    vae_sets, vae_styles = vae_subsets(train, validation, seed, cap(vae_train_images) if vae_train_images else 0, cap)
    image_sets = {
        "training images": pick_subset(caption_set, cap(image_prompts), seed + 2),
        "validation images": pick_subset(validation, cap(image_prompts), seed + 2),
    }
    image_sets = {k: v for k, v in image_sets.items() if v}
    return EvalPlan(items, prompt_groups, vae_sets, image_sets, caption_set, vae_styles)


def vae_subsets(
    train: Sequence[EmojiItem], validation: Sequence[EmojiItem], seed: int, train_images: int, cap=lambda n: n
) -> tuple[dict[str, list[EmojiItem]], dict[str, str]]:
    """The VAE table's image sets -> (label -> items, label -> style).

    One style (every 3d-only dataset): "validation" (the whole split, capped by `cap(None)`) and "training" (a fixed
    random `train_images` of the split, seed `seed + 1`; none when 0), the style map empty. Several styles (`sdxs
    data emoji --styles`): the same two sets per style, drawn within that style with the same seeds
    ("3d validation", "twemoji validation", ..., then "3d training", ...); a style without images in a split has no
    set there.
    """
    styles = styles_of([*train, *validation])
    if len(styles) <= 1:
        sets = {"validation": pick_subset(validation, cap(None), seed)}
        if train_images:
            sets["training"] = pick_subset(train, train_images, seed + 1)
        return sets, {}
    sets, style_of = {}, {}
    for split, pool, n, split_seed in (
        ("validation", validation, cap(None), seed),
        ("training", train, train_images, seed + 1),
    ):
        if split == "training" and not train_images:
            continue
        for style in styles:
            chosen = pick_subset([it for it in pool if it.style == style], n, split_seed)
            if chosen:
                sets[f"{style} {split}"], style_of[f"{style} {split}"] = chosen, style
    return sets, style_of


def strict_fidelity(pipe, data_dir, gen: GenerationSettings, per_kind: int, limit: int | None, refine: bool, progress):
    """The strict, per-kind section (`sdxs.eval.strict.strict_eval`) driven by this pipeline and settings; group
    sizes are capped at `limit` (a quick run)."""

    def cap(n: int) -> int:
        return n if limit is None else min(limit, n)

    return eval_strict.strict_eval(
        eval_strict.load_renders(data_dir),
        lambda prompts: generate_from_prompts(pipe, prompts, gen),
        lambda paths: generate_from_images(pipe, paths, gen),
        (lambda prompts: pipe.refine_prompts(prompts, seed=gen.seed)) if refine else None,
        per_kind=per_kind,
        held_out=cap(60),
        image_prompts=cap(48),
        refine_per_kind=max(1, per_kind // 3),
        seed=gen.seed,
        progress=progress,
    )


def evaluate(
    model,
    data_dir: str | os.PathLike,
    out_md: str | os.PathLike = "docs/eval.md",
    grid_path: str | os.PathLike | None = "media/eval-grid.png",
    steps: int | None = None,
    guidance: float = 4.0,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 16,
    train_captions: int = 200,
    vae_train_images: int = 200,
    image_prompts: int = 100,
    limit: int | None = None,
    refine_prompts: Sequence[str] = DEFAULT_REFINE_PROMPTS,
    refine_max_new_tokens: int = 80,
    grid_images: int = 16,
    strict_per_kind: int = 24,
    device: str = "auto",
    dtype: str = "auto",
    command: str | None = None,
    progress: bool = True,
) -> EvalResult:
    r"""
    Evaluate a model on an emoji-format dataset and write the Markdown report `out_md` (plus the sample grid).

    Args:
        model (`str` or `SDXSPipeline`): a model folder / hub id (loaded with `trust_remote_code=True`) or a loaded
            pipeline (used as is; `device` and `dtype` are then ignored).
        data_dir (`str` or `os.PathLike`): a folder made by `sdxs data emoji` (splits.jsonl, train/, validation/).
        out_md (`str` or `os.PathLike`): the report to write.
        grid_path (`str` or `os.PathLike`, *optional*): the labelled sample grid PNG; `None` writes none.
        steps, guidance, seed, width, height: generation settings; image `i` of each group uses seed `seed + i`.
        batch_size (`int`): images per pipeline call and per VAE pass.
        train_captions (`int`): size of the fixed random subset of training captions for prompt fidelity.
        vae_train_images (`int`): training images in the VAE table besides the validation split (0: none).
        image_prompts (`int`): source images per split (training subset, validation) for the image-prompt test.
        limit (`int`, *optional*): cap on every group's size, for a quick run.
        refine_prompts (`Sequence[str]`): short prompts for the `refine_prompts` table (empty: skip the section).
        refine_max_new_tokens (`int`): length limit of each refined prompt.
        grid_images (`int`): generated images shown in the grid.
        strict_per_kind (`int`): training emoji per kind in the strict section (0: skip it); its bare-name grid
            is written beside `grid_path` as `*-strict.png`.
        device, dtype (`str`): as in the CLI (`auto` picks CUDA/MPS/CPU and bf16/fp16/fp32).
        command (`str`, *optional*): the command line recorded in the report.
        progress (`bool`): show progress: a tqdm bar on a terminal, a plain line a minute in logs and pipes.

    Returns:
        [`EvalResult`]: every number in the report.
    """
    if (steps is not None and steps < 1) or batch_size < 1:
        raise ValueError(f"`steps` and `batch_size` must be >= 1, got steps={steps}, batch_size={batch_size}")
    items = load_emoji_dataset(data_dir)
    pipe, model_name = load_eval_pipeline(model, device, dtype, progress and sys.stderr.isatty())
    steps = steps or int(pipe.config.get("default_num_inference_steps") or 40)  # the model's own default
    gen = GenerationSettings(steps, guidance, seed, width, height, batch_size)
    plan = plan_subsets(items, seed, train_captions, vae_train_images, image_prompts, limit)
    bar = _progress_bar(plan.total, progress)
    pipe.set_progress_bar_config(disable=True)
    strict_n = strict_per_kind if limit is None else min(limit, strict_per_kind)
    result, samples = _measure(pipe, plan, gen, data_dir, bar, refine_prompts, refine_max_new_tokens, strict_n, limit)
    bar.close()
    result.markdown_path = Path(out_md)
    _save_grids(result, samples, grid_path, grid_images)
    write_report(result, _settings(pipe, model_name, data_dir, command, gen, refine_max_new_tokens))
    return result


def _progress_bar(total: int, progress: bool):
    """A tqdm bar on a terminal; a plain line a minute in logs and pipes (not a bar redrawn with \\r); or none."""
    from tqdm.auto import tqdm

    if progress and not sys.stderr.isatty():
        return LogProgress(total, "eval", "img")
    return tqdm(total=total, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)


def _measure(pipe, plan: EvalPlan, gen, data_dir, bar, refine_prompts, refine_max_new_tokens, strict_n, limit):
    """Every measurement in turn -> (`EvalResult` without file paths, the prompt groups' (image, caption) pairs)."""
    vae_res = int(pipe.config.default_width)  # the VAE table's target side: the model's native output size
    # 1. The retrieval gallery: every dataset image (train + validation)
    bar.set_postfix_str("gallery")
    index = RetrievalIndex(gallery_features([it.path for it in plan.items], progress=bar))
    # 2. VAE reconstruction vs bicubic; the reconstructions also give the feature space's ceiling
    vae_results, oracle = [], []
    for label, subset in plan.vae_sets.items():
        bar.set_postfix_str(f"vae {label}")
        style = plan.vae_styles.get(label)
        vae_results.append(evaluate_vae(pipe, subset, label, gen.batch_size, bar, resolution=vae_res, style=style))
        oracle += feature_ceiling(index, vae_results[-1], subset, vae_res)
    # 3. Prompt fidelity, and the training captions split by kind
    prompts, samples = prompt_fidelity(pipe, index, plan.prompt_groups, gen, bar)
    kinds = split_by_kind(prompts[0], plan.caption_set) if plan.caption_set else []
    # 4. Image prompts; 5. refine_prompts
    image_results = image_prompt_fidelity(pipe, index, plan.image_sets, gen, bar)
    refine = refine_table(pipe, refine_prompts, refine_max_new_tokens, gen.seed)
    # 6. Strict, per-kind pixel retrieval (bare names and exact captions)
    strict = None
    if strict_n:
        strict = strict_fidelity(pipe, data_dir, gen, strict_n, limit, bool(refine_prompts), bar)
    result = EvalResult(vae_results, prompts, oracle, image_results, refine, None, Path(), len(index), strict)
    result.prompt_kinds = kinds
    return result, samples


def _save_grids(result: EvalResult, samples, grid_path, grid_images: int) -> None:
    """The sample grid (prompt groups taken in turn) and the strict bare-name grid beside it (`*-strict.png`)."""
    if grid_path is None:
        return
    grid = Path(grid_path)
    if result.strict is not None and result.strict.grid:
        strict_grid = grid.with_name(grid.stem + "-strict.png")
        cells = result.strict.grid
        save_small_png(make_grid([im for im, _ in cells], [p for _, p in cells], columns=6), strict_grid)
        result.strict_grid_path = strict_grid
    if samples:
        picked = _interleave(samples, grid_images)
        save_small_png(make_grid([im for im, _ in picked], [c for _, c in picked]), grid)
        result.grid_path = grid


def _settings(pipe, model_name: str, data_dir, command: str | None, gen: GenerationSettings, refine_tokens: int):
    """What the report's header records: model, data, command, date, hardware, dtype, size, software."""
    import torch

    return {
        "model": model_name,
        "data": str(data_dir),
        "command": command or "evaluate(...) from Python",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": describe_hardware(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "size": f"{gen.width or pipe.config.default_width}x{gen.height or pipe.config.default_height}",
        "vae_resolution": int(pipe.config.default_width),
        "vae_factors": (int(pipe.vae_encoder_scale_factor), int(pipe.vae_scale_factor)),
        "gen": gen,
        "refine_max_new_tokens": refine_tokens,
        "versions": f"torch {torch.__version__}, diffusers {_version('diffusers')}, "
        f"transformers {_version('transformers')}",
    }
