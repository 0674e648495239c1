"""Image prompts: `encode_image` of a dataset image as the prompt; does the generation retrieve that image?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdxs.eval.dataset import EmojiItem
from sdxs.eval.features import RetrievalIndex, RetrievalResult, thumbnail_features
from sdxs.eval.generation import GenerationSettings, generate_from_images


def image_prompt_fidelity(
    pipe,
    index: RetrievalIndex,
    groups: dict[str, Sequence[EmojiItem]],
    gen: GenerationSettings,
    progress=None,
) -> list[RetrievalResult]:
    """What: does an image prompt bring back its source? Each source image is embedded by `pipe.encode_image`
    (the prompt-embedding layout), an image is generated from that embedding (seed `gen.seed + i`), and it ranks
    every dataset image in the thumbnail feature space; top-k is the share whose source is among the k nearest.

    On: each group of `groups` (a fixed subset of the training captions' images, and validation images); the
    gallery is every dataset image.

    Chance level: k / gallery size (`chance_percent`).
    """
    results = []
    for label, group in groups.items():
        if progress is not None:
            progress.set_postfix_str(label)
        images = generate_from_images(pipe, [it.path for it in group], gen, progress)
        ranks = index.ranks(np.stack([thumbnail_features(im) for im in images]), [it.index for it in group])
        results.append(RetrievalResult(label, ranks, len(index)))
    return results
