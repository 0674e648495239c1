"""`sdxs eval`: measure a model on the emoji dataset and write docs/eval.md (how: docs/eval-method.md).

One module per measurement; each measurement is a function whose docstring says what it measures, on what, and its
chance level:

- `vae`: `evaluate_vae`, the R/2 -> R reconstruction against bicubic 2x (MSE, PSNR, Sobel edge error and energy,
  KL), per style on a multi-style dataset (`suite.vae_subsets`);
- `fidelity`: `prompt_fidelity` (captions -> generation -> retrieval of the prompted emoji in a lenient CIELAB
  feature space), `split_by_kind` (people with skin tones / flags / other), `feature_ceiling` (the feature
  space's best case: reconstructions retrieving their original);
- `image_prompts`: `image_prompt_fidelity` (`encode_image` of a dataset image -> generation -> retrieval of it);
- `refine`: `refine_table` (`refine_prompts`' inputs and outputs);
- `strict`: `strict_eval`, pixel-space retrieval per kind of emoji with nearest-render distance and edge energy.

The parts they share: `dataset` (splits.jsonl), `features` (the retrieval feature space), `metrics` (image
metrics), `generation` (seeded batches, model loading, progress). `report` holds every number (`EvalResult`) and
writes the Markdown page and grids; `suite.evaluate` runs everything; `cli` is the `sdxs eval` subcommand.

Everything is deterministic given `seed`: the subsets, image `i`'s generation seed (`seed + i` within each
group) and `refine_prompts`' sampling.
"""

from sdxs.eval.cli import EPILOG, cmd_eval, register
from sdxs.eval.dataset import (
    HOLDOUT_EMOJI,
    HOLDOUT_TONE,
    EmojiItem,
    load_emoji_dataset,
    load_image01,
    pick_subset,
    styles_of,
)
from sdxs.eval.features import (
    FEATURE_SIDE,
    HIST_BINS,
    HIST_SIDE,
    HIST_WEIGHT,
    THUMB_DIM,
    TOP_K,
    RetrievalIndex,
    RetrievalResult,
    chance_percent,
    gallery_features,
    lab_histogram,
    srgb_to_lab,
    thumbnail_features,
    topk_percent,
)
from sdxs.eval.fidelity import CAPTION_KINDS, feature_ceiling, prompt_fidelity, split_by_kind
from sdxs.eval.generation import (
    GenerationSettings,
    LogProgress,
    generate_from_images,
    generate_from_prompts,
    load_eval_pipeline,
)
from sdxs.eval.image_prompts import image_prompt_fidelity
from sdxs.eval.metrics import (
    bicubic_upscale2x,
    downsample2x,
    edge_energy_ratio_per_image,
    edge_error_per_image,
    kl_per_image,
    mse_per_image,
    psnr_from_mse,
    sobel_magnitude,
)
from sdxs.eval.refine import DEFAULT_REFINE_PROMPTS, refine_table
from sdxs.eval.report import (
    GRID_MAX_BYTES,
    GRID_THUMB,
    EvalResult,
    describe_hardware,
    render_markdown,
    save_small_png,
    write_report,
)
from sdxs.eval.strict import StrictResult, StrictScores, strict_eval
from sdxs.eval.suite import EvalPlan, evaluate, plan_subsets, strict_fidelity, vae_subsets
from sdxs.eval.vae import VAEResult, evaluate_vae

__all__ = [
    "CAPTION_KINDS",
    "DEFAULT_REFINE_PROMPTS",
    "EPILOG",
    "FEATURE_SIDE",
    "GRID_MAX_BYTES",
    "GRID_THUMB",
    "HIST_BINS",
    "HIST_SIDE",
    "HIST_WEIGHT",
    "HOLDOUT_EMOJI",
    "HOLDOUT_TONE",
    "THUMB_DIM",
    "TOP_K",
    "EmojiItem",
    "EvalPlan",
    "EvalResult",
    "GenerationSettings",
    "LogProgress",
    "RetrievalIndex",
    "RetrievalResult",
    "StrictResult",
    "StrictScores",
    "VAEResult",
    "bicubic_upscale2x",
    "chance_percent",
    "cmd_eval",
    "describe_hardware",
    "downsample2x",
    "edge_energy_ratio_per_image",
    "edge_error_per_image",
    "evaluate",
    "evaluate_vae",
    "feature_ceiling",
    "gallery_features",
    "generate_from_images",
    "generate_from_prompts",
    "image_prompt_fidelity",
    "kl_per_image",
    "lab_histogram",
    "load_emoji_dataset",
    "load_eval_pipeline",
    "load_image01",
    "mse_per_image",
    "pick_subset",
    "plan_subsets",
    "prompt_fidelity",
    "psnr_from_mse",
    "refine_table",
    "register",
    "render_markdown",
    "save_small_png",
    "sobel_magnitude",
    "split_by_kind",
    "srgb_to_lab",
    "strict_eval",
    "strict_fidelity",
    "styles_of",
    "thumbnail_features",
    "topk_percent",
    "vae_subsets",
    "write_report",
]
