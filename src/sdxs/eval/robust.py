"""Robust prompts: does the model draw a trained emoji when it is asked the way people ask, not by its caption?

Each class rewrites the bare name of a training emoji one way, with templates and words kept for evaluation only:
none of them is in the training augmentation's lists (`sdxs.data.captions`; a test checks the two are disjoint), so
a class measures a phrasing the model never saw, not a memorised one.

    case            "RED APPLE", "Red Apple", "Red apple"
    articles        "one red apple", "this red apple", "my red apple"
    adjectives      "tiny red apple", "glossy red apple"
    suffix words    "red apple clipart", "red apple symbol"
    phrases         "show me red apple", "give me red apple"
    plurals         "two red apples", "a few red apples"
    punctuation     "red apple?", "'red apple'", "red apple..."
    everyday words  a keyword that names this emoji alone and was never a training prompt on its own
                    (`CaptionAugmentConfig.holdout_tags`): it was only ever seen beside other words (in a caption,
                    or in a list of keywords with `keywords_form`); words only, no codes ("fi", "2130")
    word order      the qualifier first ("medium skin tone, woman surfing") or the head noun first ("apple, red"; the
                    training's `head_first` form never puts a comma there: "apple (red)", "apple: red")

Scored as the strict check scores (`sdxs.eval.strict.score_images`: L2 at 32x32 on white against every render),
so numbers compare with the bare-name rows. The emoji are a fixed random choice of the training split, per kind.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdxs.data.captions import CaptionAugmentConfig, CaptionAugmenter, head_word, is_holdout_tag, pluralize
from sdxs.eval.strict import KINDS, PixelGallery, Render, StrictScores, score_images

# Evaluation-only words and templates: keep them out of sdxs.data.captions' training lists.
EVAL_ARTICLES = ["one", "this", "my", "that", "your"]
EVAL_ADJECTIVES = ["tiny", "lovely", "glossy", "colorful", "adorable", "detailed", "beautiful", "classic"]
EVAL_SUFFIXES = ["clipart", "symbol", "graphic", "emoticon", "artwork"]
EVAL_PHRASES = ["show me {}", "give me {}", "generate {}", "i would like {}", "a sketch of {}", "an illustration of {}"]
EVAL_QUANTITIES = ["two", "three", "a few", "lots of"]
EVAL_PUNCTUATION = ["{}?", "'{}'", '"{}"', "{}...", "({})"]
EVAL_CASES = ("upper", "title", "capitalised")
# an everyday word: letters (words separated by single spaces), three or more
EVERYDAY_WORD = re.compile(r"[A-Za-z]{3,}(?: [A-Za-z]+)*")


def eval_only_words() -> set[str]:
    """Every word of the lists above: what a training word list (`sdxs data emoji`'s words.txt) must leave out."""
    lists = (EVAL_ARTICLES, EVAL_ADJECTIVES, EVAL_SUFFIXES, EVAL_PHRASES, EVAL_QUANTITIES)
    return {w for items in lists for item in items for w in item.replace("{}", " ").lower().split()}


CLASSES = (
    "case",
    "articles",
    "adjectives",
    "suffix words",
    "phrases",
    "plurals",
    "punctuation",
    "everyday words",
    "word order",
)


def parse_classes(text: str | None) -> tuple[str, ...]:
    """'everyday words,plurals' -> those classes, in `CLASSES` order (None or empty: all of them)."""
    if not text:
        return CLASSES
    wanted = {c.strip().lower() for c in text.split(",") if c.strip()}
    unknown = sorted(wanted - set(CLASSES))
    if unknown:
        raise ValueError(
            f"unknown robustness class(es) {', '.join(map(repr, unknown))}; choose from {', '.join(CLASSES)}."
        )
    return tuple(c for c in CLASSES if c in wanted)


def _case(text: str, rng: random.Random) -> str:
    how = rng.choice(EVAL_CASES)
    return text.upper() if how == "upper" else text.title() if how == "title" else text[:1].upper() + text[1:]


def _split_name(render: Render) -> tuple[str, str]:
    """(main, qualifiers): "woman surfing", ", medium skin tone" (empty when it has no skin tone)."""
    quals = "".join(f", {t}" for t in render.skin_tones)
    return render.name, quals


def rewrite(render: Render, klass: str, rng: random.Random, everyday: dict[str, list[str]]) -> str | None:
    """The bare name of `render` rewritten by class `klass` (None when the class does not apply to it)."""
    main, quals = _split_name(render)
    if klass == "case":
        return _case(main + quals, rng)
    if klass == "articles":
        return f"{rng.choice(EVAL_ARTICLES)} {main}{quals}"
    if klass == "adjectives":
        return f"{rng.choice(EVAL_ADJECTIVES)} {main}{quals}"
    if klass == "suffix words":
        return f"{main} {rng.choice(EVAL_SUFFIXES)}{quals}"
    if klass == "phrases":
        return rng.choice(EVAL_PHRASES).replace("{}", main + quals)
    if klass == "plurals":
        return f"{rng.choice(EVAL_QUANTITIES)} {pluralize(main)}{quals}"
    if klass == "punctuation":
        return rng.choice(EVAL_PUNCTUATION).replace("{}", main + quals)
    if klass == "everyday words":
        words = everyday.get(main.lower())
        return f"{rng.choice(words)}{quals}" if words else None
    if klass == "word order":
        if quals:
            return f"{quals[2:]}, {main}"
        words = main.split()
        head = head_word(main)
        if len(words) < 2 or head != words[-1]:
            return None
        return f"{head}, {' '.join(words[:-1])}"
    raise ValueError(f"unknown robustness class {klass!r}; choose from {', '.join(CLASSES)}.")


def everyday_words(caption_lines: Sequence[Sequence[str]], holdout_share: float) -> dict[str, list[str]]:
    """name (lower case) -> the keywords that name that emoji alone and never stood alone in training: the
    unambiguous tags of `CaptionAugmenter` that `is_holdout_tag` keeps out (the training run's `holdout_tags`), and
    only words (`EVERYDAY_WORD`): the keyword lists also hold codes nobody types for the thing ("fi" for the flag of
    Finland, "2130" for nine-thirty, "55b6" for a Japanese button)."""
    aug = CaptionAugmenter(CaptionAugmentConfig(probability=1.0, style_tags=["3d render"]), caption_lines)
    out: dict[str, list[str]] = {}
    for lines in caption_lines:
        e = aug.parse(lines)
        words = [
            w
            for t in e.tags
            if t.lower() in aug.unambiguous_tags
            and is_holdout_tag(t, holdout_share)
            and t.lower() != e.main.lower()
            and EVERYDAY_WORD.fullmatch(w := t.replace("\xa0", " "))
        ]
        if words:
            out.setdefault(e.main.lower(), words)
    return out


@dataclass
class RobustResult:
    scores: list[StrictScores]  # one per class, its label the class name
    examples: dict[str, list[str]]  # class -> its first prompts
    grid: list[tuple[Any, str]] = field(default_factory=list)  # (image, label): each class's first prompt per kind

    def summary(self) -> dict[str, float]:
        """Top-5 per class and their mean (the headline)."""
        top5 = {s.label: s.top(5) for s in self.scores}
        top5["mean over classes"] = sum(top5.values()) / max(len(top5), 1)
        return top5


def robust_eval(
    renders: Sequence[Render],
    caption_lines: Sequence[Sequence[str]],
    generate_prompts: Callable[[list[str]], list],
    per_kind: int = 8,
    holdout_share: float = 0.25,
    classes: Sequence[str] = CLASSES,
    seed: int = 0,
    gallery: PixelGallery | None = None,
    progress=None,
) -> RobustResult:
    r"""
    What: strict retrieval (`score_images`) of training emoji asked for in each class's eval-only phrasing.

    On: `per_kind` training emoji per kind for each class (a fixed random choice among those the class applies to),
    scored against every render of the gallery.

    Chance level: 5 / gallery size at top-5 (0.15% for 3,375 renders).

    Args:
        renders: `sdxs.eval.strict.load_renders(data)`.
        caption_lines: the caption lines of every training image (for the everyday words).
        generate_prompts: fn(prompts) -> images.
        holdout_share: the training run's `captions.holdout_tags`.
    """
    gallery = gallery or PixelGallery(renders)
    train = [r for r in renders if r.split == "train"]
    everyday = everyday_words(caption_lines, holdout_share)
    scores, examples, grid = [], {}, []
    for klass in classes:
        rng = random.Random(f"{seed}:{klass}")
        targets, prompts = [], []
        for kind in KINDS:
            pool = [r for r in train if r.kind == kind]
            rng.shuffle(pool)
            taken = 0
            for r in pool:
                if taken == per_kind:
                    break
                text = rewrite(r, klass, rng, everyday)
                if text is not None:
                    targets.append(r)
                    prompts.append(text)
                    taken += 1
        if not prompts:
            continue
        if progress is not None:
            progress.set_postfix_str(f"robust: {klass}")
        images = generate_prompts(prompts)
        s = score_images(gallery, images, targets, klass)
        s.prompts = prompts
        scores.append(s)
        for kind in KINDS:  # the first prompt of each kind, marked with its strict top-5 result
            i = next((i for i, r in enumerate(targets) if r.kind == kind), None)
            if i is not None:
                grid.append((images[i], f"{'hit' if s.ranks[i] < 5 else 'miss'}: {prompts[i]}"))
        examples[klass] = prompts[:: max(1, len(prompts) // 6)][:6]
    return RobustResult(scores, examples, grid)


def markdown_table(result: RobustResult) -> str:
    """One row per class: n, top-1, top-5 overall and top-5 per kind."""
    head = "| class | n | top-1 | top-5 | " + " | ".join(KINDS) + " | example |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(KINDS) + "---|"]
    for s in result.scores:
        per_kind = " | ".join(f"{s.top(5, k):.0f}" if s.n(k) else "-" for k in KINDS)
        ex = result.examples.get(s.label, [""])[0]
        lines.append(f"| {s.label} | {s.count} | {s.top(1):.1f}% | {s.top(5):.1f}% | {per_kind} | `{ex}` |")
    mean = result.summary()["mean over classes"]
    lines.append(f"| **mean over classes** | | | **{mean:.1f}%** |" + " |" * len(KINDS) + " |")
    return "\n".join(lines)
