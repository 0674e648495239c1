"""Image prompts: `encode_image` of a dataset image as the prompt; does the generation retrieve that image?"""

from __future__ import annotations

from sdxs.eval.dataset import Groups
from sdxs.eval.features import RetrievalIndex, RetrievalResult
from sdxs.eval.generation import GenerationSettings, generate_from_images


def image_prompt_fidelity(
    pipe, index: RetrievalIndex, groups: Groups, gen: GenerationSettings, progress=None
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
        results.append(index.retrieve(label, images, [it.index for it in group]))
    return results
