"""Prompt fidelity (lenient): does a generation retrieve the emoji its caption names, in the thumbnail feature space?

Also the feature space's ceiling (the dataset's own images, reconstructed by the VAE, retrieving their original)
and the split of prompt fidelity by kind of emoji (people with skin tones / flags / other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sdxs.eval.dataset import EmojiItem, Groups
from sdxs.eval.features import RetrievalIndex, RetrievalResult
from sdxs.eval.generation import GenerationSettings, generate_from_prompts
from sdxs.eval.vae import VAEResult

# Kinds of caption for the per-kind split. A person in five skin tones is the easiest to retrieve (the shape is
# shared, the tone picks the image), a flag the hardest (small coloured details on one shape): the split keeps a
# large easy kind from hiding a hard one.
CAPTION_KINDS: dict[str, Callable[[str], bool]] = {
    "people with skin tones": lambda caption: "skin tone" in caption,
    "flags": lambda caption: caption.startswith("flag"),
    "other": lambda caption: "skin tone" not in caption and not caption.startswith("flag"),
}


def prompt_fidelity(
    pipe, index: RetrievalIndex, groups: Groups, gen: GenerationSettings, progress=None
) -> tuple[list[RetrievalResult], list[list[tuple[object, str]]]]:
    """What: does the image generated from an emoji's caption look most like that emoji? Each caption (the first
    caption line, `NAME, 3d render`) is generated once (image `i` of a group with seed `gen.seed + i`); the image
    ranks every dataset image by cosine similarity in the thumbnail feature space (`features`); top-k is the share
    whose prompted emoji is among the k nearest.

    On: each group of `groups` (training captions, held-out emoji, held-out skin-tone variants); the gallery is
    every dataset image (train + validation).

    Chance level: k / gallery size (`chance_percent`: 0.03% top-1, 0.15% top-5 for 3,375 images).

    Returns (one `RetrievalResult` per non-empty group, and per group the (image, caption) pairs for the grid).
    """
    results, samples = [], []
    for label, group in groups.items():
        if not group:
            continue
        if progress is not None:
            progress.set_postfix_str(label.split(" (")[0])
        images = generate_from_prompts(pipe, [it.caption for it in group], gen, progress)
        results.append(index.retrieve(label, images, [it.index for it in group]))
        samples.append([(im, it.caption) for im, it in zip(images, group, strict=True)])
    return results, samples


def split_by_kind(result: RetrievalResult, group: Sequence[EmojiItem]) -> list[RetrievalResult]:
    """What: one prompt-fidelity result split by kind of emoji (`CAPTION_KINDS`, read from the captions), so that
    the many easy skin-tone variants cannot hide the flags.

    On: `result`, computed on `group` (same order). Kinds with no caption are left out.

    Chance level: k / gallery size, as the whole group's.
    """
    captions = [it.caption for it in group]
    parts = []
    for kind, is_kind in CAPTION_KINDS.items():
        selected = np.array([is_kind(c) for c in captions], dtype=bool)
        if selected.any():
            parts.append(
                RetrievalResult(f"{result.label.split(' (')[0]}: {kind}", result.ranks[selected], result.gallery_size)
            )
    return parts


def feature_ceiling(index: RetrievalIndex, vae_result: VAEResult, subset: Sequence[EmojiItem], resolution: int):
    """What: the best top-k the feature space allows: the dataset's own images, reconstructed R/2 -> R by the VAE
    and by bicubic 2x (`evaluate_vae`'s outputs), retrieving their original among all dataset images. A generator
    that drew the prompted emoji as well as these reconstructions would score this.

    On: the images of one VAE set (`subset`, in `vae_result`'s order), one row per reconstruction ("VAE", "bicubic").

    Chance level: k / gallery size.
    """
    targets = [it.index for it in subset]
    return [
        RetrievalResult(
            f"{vae_result.label} images, {name} {resolution // 2} -> {resolution}",
            index.ranks(feats, targets),
            len(index),
        )
        for name, feats in vae_result.recon_features.items()
    ]
