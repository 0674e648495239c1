"""Former home of the strict, per-kind prompt-fidelity check, kept so that `from sdxs import eval_strict` still
works: it is `sdxs.eval.strict` now. New code imports from there."""

from sdxs.eval.strict import *  # noqa: F403
from sdxs.eval.strict import (  # noqa: F401
    KINDS,
    THUMB,
    PixelGallery,
    Render,
    StrictResult,
    StrictScores,
    kind_of,
    load_renders,
    markdown_table,
    names_the_emoji,
    pick_per_kind,
    score_images,
    sobel_energy,
    strict_eval,
    thumbnail,
    to_white,
)
