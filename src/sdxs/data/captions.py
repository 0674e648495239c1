"""Caption augmentation: prompts as people type them, made from an image's own captions at training time.

A dataset's captions are written one way ("red apple, 3d render"); people type "an apple", "Red Apples!",
"apple icon", "fruit". Trained only on the caption strings, a small model becomes a lookup table keyed by the exact
string. `CaptionAugmenter` rewrites a share of the training captions into such forms, so the model learns the
subject, not the string. It knows nothing of emoji: it reads the structure every `sdxs prepare` caption file has.

    lines = ["red apple", "red apple, 3d render", "red apple, fruit, food, 3d render"]   # one image's captions
    subject "red apple"      the shortest caption line that the others start with (else the first line)
    tags    fruit, food      the comma-separated parts the longer lines add, minus `style_tags`
    style   3d render        a `style_tags` part the captions carry (kept, moved or dropped as a whole)

What a rewrite can do (each with its own probability in `CaptionAugmentConfig`):

    form        the subject | a tag that names this subject alone ("gherkin") | the name's head word when at
                most `max_subjects` subjects share it and it is not itself a subject ("apple" for the two apples) |
                2-3 of its tags without the subject ("pickle, gherkin, vegetable") | the head word first
                ("apple (red)", `TRAIN_INVERSIONS`)
    plural      "red apples", "women surfing" (inflect), optionally after a quantity word ("several red apples")
    adjective   "cute red apple"
    template    "a {}", "a picture of {}", "{} icon" ... (a/an chosen for the word that follows)
    tags        a few of the image's tags after the subject, or one before it ("fruit, red apple")
    style       the style tag kept at the end, moved to the front, or dropped
    case        lower / Title / UPPER / first letter capitalised
    punctuation a trailing mark or brackets around the prompt (`TRAIN_PUNCTUATION`), commas dropped, hyphens as spaces
    order       the comma parts shuffled ("medium skin tone, woman surfing")
    fillers     1-2 common words the dataset never uses, before or after the subject ("wonder red apple",
                "red apple tonight"): read from `filler_words`, so the model learns that a word it has no meaning
                for does not change the picture

Qualifiers after the subject's first comma ("woman surfing, medium skin tone") stay with every form: they are part
of what the image shows. Every choice comes from the `random.Random` the caller passes, so a loader that seeds it
per (seed, epoch, step, rank) resumes bit-identically. The templates and words here are for *training*; evaluation
uses its own disjoint lists (`sdxs.eval.robust`), so a robustness score is never measured on a trained phrasing.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

# Many forms of each kind, so the model learns that words around a name do not change it, not which few words do not.
# Every content word here is kept out of `sdxs.eval.robust`'s lists (tests/test_captions.py checks).
TRAIN_TEMPLATES = [
    # articles and other determiners
    "a {}",
    "the {}",
    "our {}",
    "his {}",
    "her {}",
    "another {}",
    "any {}",
    "each {}",
    # what it is
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
    "a photo of {}",
    "a render of {}",
    "a cartoon of {}",
    "a doodle of {}",
    "a painting of {}",
    "an emoji of {}",
    "an icon of {}",
    # requests
    "draw {}",
    "make {}",
    "create {}",
    "paint {}",
    "render {}",
    "depict {}",
    "please draw {}",
    "can you draw {}",
    "we need {}",
    "here is {}",
    "just {}",
    # words after the name
    "{} emoji",
    "{} icon",
    "{} sticker",
    "{} art",
    "{} image",
    "{} picture",
    "{} drawing",
    "{} logo",
    "{} badge",
    "{} pictogram",
    "{} design",
    "{} please",
    "{}, emoji",
    "{} on a white background",
    "{} on white",
]
TRAIN_ADJECTIVES = [
    "cute", "little", "big", "small", "simple", "nice", "funny", "pretty", "cool", "shiny", "3d", "happy", "new",
    "old", "round", "bright", "soft", "plain", "neat", "modern", "vintage", "fancy", "great", "good", "sweet",
    "minimal", "clean", "bold", "basic", "huge", "mini", "glowing", "realistic", "stylized", "smooth", "cheerful",
]  # fmt: skip
TRAIN_QUANTITIES = [
    "some", "several", "many", "a group of", "a pair of", "four", "five", "ten", "a couple of", "a bunch of",
    "dozens of", "multiple", "a set of", "a row of",
]  # fmt: skip
# punctuation around the whole prompt ("{}" is the prompt); besides these, commas dropped and hyphens as spaces
TRAIN_PUNCTUATION = ["{}.", "{}!", "{}!!", "{};", "{}:", "[{}]", "*{}*", "{} -", "<{}>", "{}~"]
# the head word first ("{head}" the head noun, "{rest}" the words before it): "apple (red)", "face: grimacing"
TRAIN_INVERSIONS = ["{head} {rest}", "{head}: {rest}", "{head} - {rest}", "{head} ({rest})", "{head} / {rest}"]


@dataclass
class CaptionAugmentConfig:
    """How training captions are rewritten into the forms people type (`sdxs.data.captions`); off by default."""

    probability: float = 0.0  # share of samples whose caption is rewritten (0: off; the cached caption as it is)
    # tags that name the dataset's style rather than the subject ("3d render"): never a subject on their own
    style_tags: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: list(TRAIN_TEMPLATES))  # "{}" is the subject
    adjectives: list[str] = field(default_factory=lambda: list(TRAIN_ADJECTIVES))
    quantities: list[str] = field(default_factory=lambda: list(TRAIN_QUANTITIES))  # before a plural
    punctuation_marks: list[str] = field(default_factory=lambda: list(TRAIN_PUNCTUATION))  # "{}": the prompt
    inversions: list[str] = field(default_factory=lambda: list(TRAIN_INVERSIONS))  # "{head}", "{rest}"
    # a tag stands for its subject alone only when it is unambiguous: at most this many subjects carry it
    max_subjects: int = 1
    # a name's head word ("apple" of "red apple") stands for it when at most this many subjects share the head
    # and no subject is named by the head word alone ("cat" stays the cat)
    max_head_subjects: int = 3
    # share of the unambiguous tags that never stand alone in training (picked by `is_holdout_tag`, a hash of the
    # tag): evaluation types them alone to measure whether a word seen only inside captions is understood alone
    holdout_tags: float = 0.0
    tag_form: float = 0.15  # the subject replaced by one of its unambiguous tags ("gherkin")
    head_form: float = 0.1  # the subject replaced by its head word
    # the subject replaced by 2-3 of the image's tags, ambiguous and held-out ones included ("coffee, caffeine,
    # drink"): keywords people type instead of a name; a held-out tag is still never a prompt on its own
    keywords_form: float = 0.0
    head_first: float = 0.0  # a name whose head word is its last word, head first (`inversions`: "apple (red)")
    plural: float = 0.15  # plural of the subject (half of them after a quantity word)
    adjective: float = 0.15
    template: float = 0.5
    add_tags: float = 0.25  # 1-3 of the image's tags after the subject
    tag_first: float = 0.1  # one tag before the subject ("fruit, red apple")
    keep_style: float = 0.5  # the style tag stays at the end (else: moved to the front 1 in 5, or dropped)
    case: float = 0.5  # a case change (lower / Title / UPPER / capitalised)
    punctuation: float = 0.3  # a punctuation change
    shuffle_parts: float = 0.1  # the comma parts (subject, qualifiers, tags, style) in a random order
    # share of rewrites with 1-2 filler words before or after the subject; they come from `filler_words` (a text
    # file, one word per line: `sdxs data emoji` writes DATA/words.txt) minus every word of the dataset's captions
    # and its simple inflections (`filler_pool`): words that carry no meaning for this dataset
    filler: float = 0.0
    filler_words: str = ""


def is_holdout_tag(tag: str, share: float) -> bool:
    """Is `tag` one of the `share` of tags kept out of tag-only training prompts? A fixed hash of the lower-cased
    tag, so training and evaluation agree without sharing state."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"holdout-tag:{tag.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def word_stem(word: str) -> str:
    """A crude English stem, enough to tell inflections apart from new words: "apples", "apple" -> "appl";
    "dancing", "dance" -> "danc"; "glossier", "glossy" -> "glossy"."""
    w = word.lower()
    for suffix in ("iest", "ier", "ies", "ied"):  # "glossier", "flies" -> "glossy", "fly"
        if w.endswith(suffix) and len(w) - len(suffix) >= 2:
            return w[: -len(suffix)] + "y"
    for suffix in ("ing", "est", "es", "ed", "er", "ly", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    return w.rstrip("e") if len(w) > 3 else w


def filler_pool(words: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """The lower-case alphabetic `words` (2+ letters, each once, in order) that are not in `exclude`, nor an
    inflection of a word there (same `word_stem`)."""
    stems = {word_stem(w) for text in exclude for w in re.findall(r"[a-z]+", text.lower())}
    pool, seen = [], set()
    for w in words:
        w = w.strip().lower()
        if len(w) < 2 or not (w.isascii() and w.isalpha()) or w in seen or word_stem(w) in stems:
            continue
        seen.add(w)
        pool.append(w)
    return pool


# ----------------------------------------------------------------------------------------------------------------
# Reading a caption file's structure
# ----------------------------------------------------------------------------------------------------------------


def split_parts(caption: str) -> list[str]:
    """The comma-separated parts of a caption, stripped, empty ones dropped."""
    return [p.strip() for p in caption.split(",") if p.strip()]


def subject_of(lines: Sequence[str]) -> str:
    """The shortest line that every other line starts with (the bare name); else the first line."""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return ""
    shortest = min(lines, key=len)
    if all(line == shortest or line.startswith(shortest + ",") for line in lines):
        return shortest
    return lines[0]


def tags_of(lines: Sequence[str], subject: str, style_tags: Iterable[str]) -> tuple[list[str], list[str]]:
    """(tags, styles) that the lines add after the subject, in order of first appearance, without repeats."""
    style = {s.lower() for s in style_tags}
    tags, styles = [], []
    for line in lines:
        rest = line.strip()[len(subject) :] if line.strip().startswith(subject) else line
        for part in split_parts(rest):
            target = styles if part.lower() in style else tags
            if part not in target and part != subject:
                target.append(part)
    return tags, styles


def head_word(name: str) -> str:
    """The head noun of a short English noun phrase: the last word before ' with ' / ' of ' / ' in ' / ' on '."""
    core = re.split(r"\s+(?:with|of|in|on|and|for)\s+", name.strip(), maxsplit=1)[0]
    words = core.split()
    return words[-1] if words else ""


@lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def pluralize(name: str) -> str:
    """English plural of a short noun phrase ("red apple" -> "red apples", "woman surfing" -> "women surfing")."""
    eng = _inflect()
    words = name.split()
    if not words or any(_is_plural(eng, w) for w in (words[0], head_word(name))):
        return name  # already plural ("busts in silhouette", "people holding hands")
    # a phrase that ends in a participle ("woman surfing") has its head first
    if len(words) > 1 and words[-1].endswith("ing") and not re.search(r"\s(?:with|of|in|on)\s", name):
        return " ".join([eng.plural_noun(words[0]) or words[0], *words[1:]])
    try:
        return eng.plural_noun(name) or name
    except Exception:  # inflect refuses some inputs (digits, symbols): keep the singular
        return name


def _is_plural(eng, word: str) -> bool:
    try:
        singular = eng.singular_noun(word)
    except Exception:
        return False
    return bool(singular) and singular != word and not word.endswith(("ss", "us", "is"))


def with_article(text: str) -> str:
    """'a' or 'an' before `text`, as English spells it ('an apple', 'a unicorn', 'an 8-ball')."""
    return _inflect().a(text)


# ----------------------------------------------------------------------------------------------------------------
# The augmenter
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    subject: str  # the whole bare name, qualifiers included ("woman surfing, medium skin tone")
    main: str  # its first comma part ("woman surfing")
    qualifiers: list[str]  # the other parts (["medium skin tone"])
    tags: list[str]
    styles: list[str]
    # a line of the image has no style tag: a prompt without one asks for this picture (the dataset's default
    # style), so a rewrite may drop the tag; an image whose every line is tagged ("red apple, flat") keeps it
    untagged: bool = True


class CaptionAugmenter:
    r"""
    Rewrites captions into the forms people type, knowing the whole dataset's captions (which tags are unambiguous).

    Args:
        config (`CaptionAugmentConfig`): probabilities, templates and words.
        all_caption_lines (iterable of `list[str]`): the caption lines of every image of the dataset (one list per
            image), to find which tags and head words name one subject only.
    """

    def __init__(self, config: CaptionAugmentConfig, all_caption_lines: Iterable[Sequence[str]]):
        if not 0.0 <= config.probability <= 1.0:
            raise ValueError(f"`captions.probability` must be in [0, 1], got {config.probability}.")
        for key in ("templates", "punctuation_marks"):
            for t in getattr(config, key):
                if t.count("{}") != 1:
                    raise ValueError(f"`captions.{key}`: {t!r} must hold exactly one '{{}}' (the subject).")
        for t in config.inversions:
            if t.count("{head}") != 1 or t.count("{rest}") != 1:
                raise ValueError(f"`captions.inversions`: {t!r} must hold '{{head}}' and '{{rest}}' once each.")
        if not 0.0 <= config.filler <= 1.0:
            raise ValueError(f"`captions.filler` must be in [0, 1], got {config.filler}.")
        self.config = config
        tag_subjects: dict[str, set[str]] = defaultdict(set)
        head_subjects: dict[str, set[str]] = defaultdict(set)
        mains: set[str] = set()
        vocabulary: set[str] = set()
        for lines in all_caption_lines:
            vocabulary.update(lines)
            e = self.parse(lines)
            if not e.main:
                continue
            mains.add(e.main.lower())
            for tag in e.tags:
                tag_subjects[tag.lower()].add(e.main.lower())
            head_subjects[head_word(e.main).lower()].add(e.main.lower())
        # tags and heads that name few enough subjects, and are not themselves some other subject's name
        self.unambiguous_tags = {
            t for t, s in tag_subjects.items() if len(s) <= config.max_subjects and (t not in mains or t in s)
        }
        self.usable_heads = {
            h
            for h, s in head_subjects.items()
            if h and h not in mains and len(s) <= config.max_head_subjects and all(h != m for m in s)
        }
        self.fillers = self._read_fillers(config, vocabulary) if config.filler > 0 else []

    @staticmethod
    def _read_fillers(config: CaptionAugmentConfig, vocabulary: set[str]) -> list[str]:
        if not config.filler_words:
            raise ValueError(
                "`captions.filler` > 0 needs `captions.filler_words`: a text file of common words, one per line "
                "(`sdxs data emoji` writes DATA/words.txt), or set `captions.filler=0`."
            )
        path = Path(config.filler_words)
        if not path.is_file():
            raise FileNotFoundError(f"`captions.filler_words`: {path} is not a file (a text file, one word per line).")
        pool = filler_pool(path.read_text(encoding="utf-8").split(), vocabulary)
        if not pool:
            raise ValueError(
                f"`captions.filler_words`: no word of {path} is left once the dataset's own words are taken out; "
                "give a list of common words the captions do not use."
            )
        return pool

    def parse(self, lines: Sequence[str]) -> _Entry:
        # a style tag closing a line is not part of the name: "red apple, flat" and "red apple, fruit, flat" name
        # "red apple" (a dataset of several styles tags every line of its other styles)
        style = {t.lower() for t in self.config.style_tags}
        bare, styles, untagged = [], [], not lines
        for line in lines:
            parts = split_parts(line)
            if len(parts) > 1 and parts[-1].lower() in style:
                styles += [parts[-1]] if parts[-1] not in styles else []
                line = ", ".join(parts[:-1])
            else:
                untagged = True
            bare.append(line)
        subject = subject_of(bare)
        parts = split_parts(subject)
        tags, more = tags_of(bare, subject, self.config.style_tags)
        styles += [t for t in more if t not in styles]
        return _Entry(subject, parts[0] if parts else "", parts[1:], tags, styles, untagged)

    def __call__(self, lines: Sequence[str], chosen: str, rng: random.Random) -> str:
        """A prompt for one image: `chosen` (the caption line the loader drew) as it is with probability
        1 - `probability`, else a rewrite made from all its `lines`."""
        c = self.config
        if c.probability <= 0 or rng.random() >= c.probability:
            return chosen
        e = self.parse(lines)
        if not e.main:
            return chosen
        return self.rewrite(e, rng)

    def rewrite(self, e: _Entry, rng: random.Random) -> str:
        c = self.config
        # 1. what names the subject
        text, plural_ok = e.main, True
        tags = [t for t in e.tags if t.lower() in self.unambiguous_tags and not is_holdout_tag(t, c.holdout_tags)]
        r = rng.random()
        beyond = r - c.tag_form - c.head_form  # the keyword and head-first forms fire in their own shares only
        words, head = e.main.split(), head_word(e.main)
        if tags and r < c.tag_form:
            text = rng.choice(tags)
        elif r < c.tag_form + c.head_form and head.lower() in self.usable_heads:
            text = head
        elif 0 <= beyond < c.keywords_form and len(e.tags) >= 2:
            text, plural_ok = ", ".join(rng.sample(e.tags, k=rng.randint(2, min(3, len(e.tags))))), False
        elif 0 <= beyond - c.keywords_form < c.head_first and c.inversions and len(words) >= 2 and head == words[-1]:
            inversion = rng.choice(c.inversions)
            text, plural_ok = inversion.replace("{head}", head).replace("{rest}", " ".join(words[:-1])), False
        if len(text.split()) > 5:  # a sentence-like caption: no plural or adjective games
            plural_ok = False
        # 2. number, adjective, template
        plural = plural_ok and rng.random() < c.plural
        if plural:
            text = pluralize(text)
            if c.quantities and rng.random() < 0.5:
                text = f"{rng.choice(c.quantities)} {text}"
        if plural_ok and c.adjectives and rng.random() < c.adjective:
            text = f"{rng.choice(c.adjectives)} {text}"
        if c.templates and rng.random() < c.template:
            template = rng.choice(c.templates)
            if template.startswith("a {}"):  # "a"/"an" for the word that follows; a plural takes none
                text = (text if plural else with_article(text)) + template[4:]
            else:
                text = template.replace("{}", text)
        if self.fillers and rng.random() < c.filler:  # no draw at all when fillers are off: old runs replay
            for _ in range(rng.randint(1, 2)):
                word = rng.choice(self.fillers)
                text = f"{word} {text}" if rng.random() < 0.5 else f"{text} {word}"
        # 3. qualifiers, tags and style as comma parts
        parts = [text, *e.qualifiers]
        used = {part.lower() for part in split_parts(text)}
        extra = [t for t in e.tags if t.lower() not in used]
        if extra and rng.random() < c.add_tags:
            parts += rng.sample(extra, k=min(len(extra), rng.randint(1, 3)))
        if extra and rng.random() < c.tag_first:
            parts.insert(0, rng.choice(extra))
        if e.styles:
            r = rng.random()
            if c.keep_style <= r < c.keep_style + (1 - c.keep_style) / 5:
                parts.insert(0, e.styles[0])
            elif r < c.keep_style or not e.untagged:  # dropped only where a line of the image goes without it
                parts.append(e.styles[0])
        if len(parts) > 1 and rng.random() < c.shuffle_parts:
            rng.shuffle(parts)
        text = ", ".join(parts)
        # 4. surface noise
        if rng.random() < c.case:
            text = rng.choice([str.lower, str.title, str.upper, lambda s: s[:1].upper() + s[1:]])(text)
        if rng.random() < c.punctuation:
            how = rng.randrange(len(c.punctuation_marks) + 2)
            if how < len(c.punctuation_marks):
                text = c.punctuation_marks[how].replace("{}", text)
            else:
                text = text.replace(",", "") if how == len(c.punctuation_marks) else text.replace("-", " ")
        return text
