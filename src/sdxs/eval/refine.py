"""`refine_prompts` as a table: short prompts in, the text encoder's refined prompts out."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_REFINE_PROMPTS = ("a cat", "a red apple", "a smiling face", "a rocket", "a woman surfing", "a pizza")


def refine_table(pipe, prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[tuple[str, str]]:
    """What: what `pipe.refine_prompts` writes for short prompts (sampling with the pipeline's defaults,
    temperature 0.7, top-p 0.9, seeded with `seed`), as (input, output) pairs for the report to show.

    On: `prompts` (`DEFAULT_REFINE_PROMPTS` by default); none: an empty table.

    Chance level: none (shown, not scored; the strict section scores whether refined prompts keep the emoji).
    """
    if not prompts:
        return []
    refined = pipe.refine_prompts(list(prompts), max_new_tokens=max_new_tokens, seed=seed)
    return list(zip(prompts, refined, strict=True))
