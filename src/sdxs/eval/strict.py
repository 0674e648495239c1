"""Strict prompt fidelity: does a generated image look like the emoji the prompt names, pixel for pixel?

The retrieval of `sdxs.eval.fidelity` works in a colour-histogram feature space, which is lenient (an orange heart
retrieves a blue one among its five nearest). This measure is strict and plain:

- every render of the dataset (train and validation, 3,375 for Fluent Emoji) is composited on white and box
  downsampled to 32x32; a generation is downsampled the same way;
- the gallery is ranked by L2 distance in that pixel space; a hit at k is the prompted emoji among the k nearest.
  Chance is k / gallery size (0.03% top-1, 0.15% top-5 for 3,375 renders);
- results are split by kind (`KINDS`), so that a large, easy group (skin-toned people) cannot hide the others,
  and prompts are given as the user types them (the bare name) and in the dataset's style (`NAME, 3d render`).

A dataset of several styles (`sdxs data emoji --styles 3d,twemoji,noto`) is scored per style: the groups above
on the default style (the first, whose captions have the bare name) among that style's renders, and the held-out
(emoji, style) pairs (`holdout` "style": the emoji trained in its other styles only) as `NAME, TAG` among the
renders of the asked style, per style and kind. With one style nothing changes.

Two image-quality figures go with it, for every generation:

- nearest-render distance: the RMS per pixel (RGB in [0, 1], 32x32, on white) to the nearest render. Renders are a
  median ~0.17 from their nearest *other* render; a 2x upscale of a 64 px copy is ~0.009;
- edge energy: the mean Sobel gradient magnitude of the generation over that of the render it retrieves (at the
  generation's size). Blur reads below 1, blotchy noise above 1.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image

from sdxs.data.emoji_styles import DEFAULT_STYLE, STYLE_TAGS
from sdxs.eval.dataset import read_splits

THUMB = 32  # side of the pixel space
KINDS = (
    "toned people",
    "other people",
    "objects/animals/food/travel",
    "smileys",
    "symbols",
    "flags",
)
_OBJECT_GROUPS = {"Animals & Nature", "Food & Drink", "Travel & Places", "Objects", "Activities"}


def kind_of(group: str, name: str, skin_tones: Sequence[str]) -> str:
    """The eval's kind of one emoji from its Unicode group (splits.jsonl), its name and its skin tones."""
    if skin_tones:
        return "toned people"
    if group == "Flags" or name.startswith("flag"):
        return "flags"
    if group == "People & Body":
        return "other people"
    if group == "Smileys & Emotion":
        return "smileys"
    if group in _OBJECT_GROUPS:
        return "objects/animals/food/travel"
    return "symbols"  # "Symbols", and what has no group (keycaps and composed names are symbols)


@dataclass
class Render:
    """One row of splits.jsonl; `index` is its position in the gallery (file order)."""

    index: int
    path: Path
    split: str
    holdout: str
    name: str
    skin_tones: list[str]
    kind: str
    style: str = DEFAULT_STYLE  # splits.jsonl's `style` (absent in the 3d-only dataset)
    tags: frozenset[str] = frozenset()  # every comma-separated part of its caption lines, lower case

    @property
    def bare(self) -> str:
        """The prompt as a user types it: "red apple", "woman surfing, medium skin tone"."""
        return ", ".join([self.name, *self.skin_tones])

    @property
    def exact(self) -> str:
        """The prompt in the render's style: "red apple, 3d render", "red apple, flat"."""
        return f"{self.bare}, {STYLE_TAGS.get(self.style, self.style)}"


def load_renders(data_dir: str | os.PathLike) -> list[Render]:
    """Every row of `data_dir/splits.jsonl` (written by `sdxs data emoji`) with its kind, in file order."""
    renders = []
    for _, row in read_splits(data_dir):
        tones = list(row.get("skin_tones") or [])
        name = row.get("name") or row["text"][0].split(",")[0]
        kind = kind_of(row.get("group", ""), name, tones)
        holdout = str(row.get("holdout") or "")
        path = Path(data_dir) / row["file_name"]
        style = row.get("style") or DEFAULT_STYLE
        tags = frozenset(t.strip().lower() for line in row.get("text") or [] for t in line.split(",") if t.strip())
        renders.append(Render(len(renders), path, row.get("split", "train"), holdout, name, tones, kind, style, tags))
    return renders


def styles_of(renders: Sequence[Render]) -> list[str]:
    """The styles of the renders in file order; the first is the dataset's default style."""
    return list(dict.fromkeys(r.style for r in renders))


def in_style(renders: Sequence[Render], style: str) -> list[Render]:
    """The renders of one `style`, re-indexed as a gallery of their own (the identity for a one-style dataset)."""
    return [replace(r, index=i) for i, r in enumerate(r for r in renders if r.style == style)]


def load_caption_lines(data_dir: str | os.PathLike, split: str = "train") -> list[list[str]]:
    """The caption lines of every image of `split` (splits.jsonl's `text`), in file order."""
    return [list(row["text"]) for _, row in read_splits(data_dir) if row.get("split", "train") == split]


def to_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB on white (transparent pixels become white), as the pipeline's `load_rgb_image`."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def thumbnail(image: PIL.Image.Image, side: int = THUMB) -> np.ndarray:
    """(side * side * 3,) float32 in [0, 1]: composited on white, box downsampled."""
    small = to_white(image).resize((side, side), PIL.Image.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) / 255.0).reshape(-1)


def sobel_energy(image: PIL.Image.Image) -> float:
    """Mean Sobel gradient magnitude of the grey image in [0, 1]."""
    g = np.asarray(to_white(image).convert("L"), dtype=np.float32) / 255.0
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return float(np.sqrt(gx**2 + gy**2).mean())


class PixelGallery:
    """All renders as 32x32 thumbnails on white: L2 ranking, nearest distance, and the renders' edge energies."""

    def __init__(self, renders: Sequence[Render]):
        self.renders = list(renders)
        self.thumbs = np.stack([thumbnail(PIL.Image.open(r.path)) for r in self.renders])  # (N, 32*32*3)
        self._sq = (self.thumbs**2).sum(1)
        self._edges: dict[tuple[int, int], float] = {}

    def __len__(self) -> int:
        return len(self.renders)

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) L2 distances of (Q, 32*32*3) thumbnails to every render."""
        d2 = (queries**2).sum(1)[:, None] + self._sq[None, :] - 2.0 * queries @ self.thumbs.T
        return np.sqrt(np.maximum(d2, 0.0))

    def edge_energy(self, index: int, size: tuple[int, int]) -> float:
        """Sobel energy of render `index` box-resized to `size` (cached)."""
        key = (index, size[0] * 100000 + size[1])
        if key not in self._edges:
            image = to_white(PIL.Image.open(self.renders[index].path))
            self._edges[key] = sobel_energy(image.resize(size, PIL.Image.Resampling.BOX))
        return self._edges[key]


@dataclass
class StrictScores:
    """Per-generation results of one group of prompts."""

    label: str
    ranks: np.ndarray  # 0-based rank of the prompted emoji
    nearest: np.ndarray  # RMS per pixel to the nearest render
    edge_ratio: np.ndarray  # generation's Sobel energy / the retrieved render's
    kinds: list[str]
    gallery_size: int
    extra: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # what each generation was asked for (bare name of its target)
    drawn: list[str] = field(default_factory=list)  # bare name of the render nearest to each generation

    @property
    def count(self) -> int:
        return len(self.ranks)

    def top(self, k: int, kind: str | None = None) -> float:
        sel = self._select(kind)
        return 100.0 * float((self.ranks[sel] < k).mean()) if sel.any() else float("nan")

    def median_nearest(self, kind: str | None = None) -> float:
        sel = self._select(kind)
        return float(np.median(self.nearest[sel])) if sel.any() else float("nan")

    def median_edge(self, kind: str | None = None) -> float:
        sel = self._select(kind)
        return float(np.median(self.edge_ratio[sel])) if sel.any() else float("nan")

    def n(self, kind: str | None = None) -> int:
        return int(self._select(kind).sum())

    def _select(self, kind: str | None) -> np.ndarray:
        return np.array([kind is None or k == kind for k in self.kinds], dtype=bool)

    def rows(self) -> list[dict]:
        """One dict per kind present (and "all"), for tables and JSON."""
        out = []
        for kind in [None, *[k for k in KINDS if k in self.kinds]]:
            out.append(
                {
                    "group": self.label,
                    "kind": kind or "all",
                    "n": self.n(kind),
                    "top1": round(self.top(1, kind), 1),
                    "top5": round(self.top(5, kind), 1),
                    "nearest": round(self.median_nearest(kind), 3),
                    "edge": round(self.median_edge(kind), 2),
                }
            )
        return out

    def per_prompt(self) -> list[dict]:
        """One dict per generation (target, kind, rank, nearest, edge, and the render it is nearest to: what a miss
        drew instead): what `paired_changes` compares."""
        drawn = self.drawn or [None] * len(self.prompts)
        return [
            {
                "prompt": p,
                "kind": k,
                "rank": int(r),
                "nearest": round(float(n), 4),
                "edge": round(float(e), 3),
                "drawn": d,
            }
            for p, k, r, n, e, d in zip(
                self.prompts, self.kinds, self.ranks, self.nearest, self.edge_ratio, drawn, strict=True
            )
        ]


def paired_changes(before: dict[str, list[dict]], after: dict[str, list[dict]], k: int = 5) -> list[dict]:
    """What: which prompts two models' strict evals disagree on, per group and kind, and whether the change is more
    than chance: gained = hits at top-`k` only `after` has, lost = only `before`; `p` is the two-sided exact sign
    test (McNemar) on those discordant prompts.

    On: the `per_prompt()` records of both evals, group label -> records (the `prompts` of a `strict_eval.py
    --json`); only prompts present in both, so both evals must use the same emoji (same --per-kind, --held-out,
    seed).

    Chance level: with no real difference, gained and lost are equally likely; p < 0.05 says the change is unlikely
    to be that. A difference of a few prompts in a group of 24 or 60 is usually not.
    """
    from math import comb

    out = []
    for label, rows_a in before.items():
        rows_b = {r["prompt"]: r for r in after.get(label, [])}
        pairs = [(a, rows_b[a["prompt"]]) for a in rows_a if a["prompt"] in rows_b]
        if not pairs:
            continue
        for kind in [None, *[kd for kd in KINDS if any(a["kind"] == kd for a, _ in pairs)]]:
            sel = [(a["rank"] < k, b["rank"] < k) for a, b in pairs if kind is None or a["kind"] == kind]
            gained = sum(1 for a, b in sel if b and not a)
            lost = sum(1 for a, b in sel if a and not b)
            m = gained + lost
            tail = sum(comb(m, i) for i in range(min(gained, lost) + 1)) / 2**m if m else 1.0
            out.append(
                {
                    "group": label,
                    "kind": kind or "all",
                    "n": len(sel),
                    "before": round(100.0 * sum(a for a, _ in sel) / len(sel), 1),
                    "after": round(100.0 * sum(b for _, b in sel) / len(sel), 1),
                    "gained": gained,
                    "lost": lost,
                    "p": round(min(1.0, 2 * tail), 3),
                }
            )
    return out


def score_images(gallery: PixelGallery, images: Sequence, targets: Sequence[Render], label: str) -> StrictScores:
    """What: strict retrieval of generated `images`: the rank of `targets[i]` (what image i was asked to show) among
    all renders by L2 distance at 32x32 on white, the RMS distance to the nearest render, and the edge energy over
    that render's (blur < 1 < blotchy), and that render's name (`drawn`: what a miss drew instead).

    On: `images` against every render of `gallery`.

    Chance level: a random ranking hits top-k with probability k / gallery size.
    """
    queries = np.stack([thumbnail(im) for im in images])
    dist = gallery.distances(queries)  # (Q, N)
    target_idx = np.array([t.index for t in targets])
    target_d = dist[np.arange(len(targets)), target_idx]
    ranks = (dist < target_d[:, None]).sum(1)  # renders strictly nearer than the target
    nearest_i = dist.argmin(1)
    pixels = queries.shape[1]
    nearest = dist[np.arange(len(targets)), nearest_i] / np.sqrt(pixels)  # RMS per pixel value
    edges = []
    for im, j in zip(images, nearest_i, strict=True):
        ref = gallery.edge_energy(int(j), im.size)
        edges.append(sobel_energy(im) / max(ref, 1e-6))
    kinds = [t.kind for t in targets]
    return StrictScores(
        label,
        ranks,
        nearest,
        np.array(edges),
        kinds,
        len(gallery),
        prompts=[t.bare for t in targets],
        drawn=[gallery.renders[int(j)].bare for j in nearest_i],
    )


def pick_per_kind(renders: Sequence[Render], per_kind: int, seed: int) -> list[Render]:
    """Up to `per_kind` renders of each kind, a fixed random choice, kept in gallery order."""
    rng = random.Random(seed)
    chosen = []
    for kind in KINDS:
        pool = [r for r in renders if r.kind == kind]
        chosen += rng.sample(pool, min(per_kind, len(pool)))
    return sorted(chosen, key=lambda r: r.index)


def names_the_emoji(refined: str, render: Render) -> bool:
    """Does a refined prompt name the emoji it was asked to refine: its name as the first tag (not a longer name
    that contains it: "rock" -> "rocket", "skull" -> "skull and crossbones" do not count) and exactly its skin tones
    (an added tone names another emoji: "woman cook" -> "woman cook, medium skin tone" does not count)?"""
    tags = [t.strip().lower() for t in refined.split(",")]
    tones = {t for t in tags if t.endswith("skin tone")}
    return tags[0] == render.name.lower() and tones == {t.lower() for t in render.skin_tones}


def added_tags(refined: str, render: Render, style_tags: Sequence[str] = ()) -> list[str]:
    """The tags a refinement of `render.bare` added after it, lower case, without style tags (`style_tags`) and
    skin tones (`names_the_emoji` judges those)."""
    skip = {t.lower() for t in style_tags}
    tags = [t.strip().lower() for t in refined.split(",")][len(render.bare.split(",")) :]
    return [t for t in tags if t and t not in skip and not t.endswith("skin tone")]


def markdown_table(scores: Sequence[StrictScores]) -> str:
    lines = [
        "| prompts | kind | n | top-1 | top-5 | nearest-render distance (median) | edge energy (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        for row in s.rows():
            lines.append(
                f"| {row['group']} | {row['kind']} | {row['n']} | {row['top1']:.1f}% | {row['top5']:.1f}% | "
                f"{row['nearest']:.3f} | {row['edge']:.2f} |"
            )
    return "\n".join(lines)


@dataclass
class StrictResult:
    """Every group of the strict section, and the refine_prompts check."""

    scores: list[StrictScores]
    refine_kept: float | None = None  # % of refined bare names that still name their emoji
    refine_examples: list[tuple[str, str]] = field(default_factory=list)
    # tags the refinements added (`added_tags`): among the emoji's own caption tags, and not (a drifted refine
    # head writes other emoji's keywords while still keeping the name: v2.4-v2.8, 68 own / 32 foreign on 144 names)
    refine_tags: tuple[int, int] | None = None
    grid: list[tuple[PIL.Image.Image, str]] = field(default_factory=list)  # bare-name generations across kinds

    def find(self, label: str) -> StrictScores | None:
        return next((s for s in self.scores if s.label == label), None)


def strict_eval(
    renders: Sequence[Render],
    generate_prompts,
    generate_images=None,
    refine=None,
    per_kind: int = 24,
    held_out: int = 60,
    image_prompts: int = 48,
    refine_per_kind: int = 8,
    grid_images: int = 24,
    seed: int = 0,
    progress=None,
) -> StrictResult:
    r"""
    What: strict prompt fidelity, per kind of emoji: does a generation look like the prompted emoji pixel for
    pixel (L2 at 32x32 on white, `score_images`), with the nearest-render distance and edge energy of each.

    On: training emoji per kind as bare names and exact captions (the same emoji), held-out emoji and skin tones
    (bare names), refined bare names (with the share of refined prompts that still name their emoji), and image
    prompts of training images. The gallery is every render (train and validation). A dataset of several styles:
    all that on its default style (the gallery is that style's renders), each other style's training emoji as exact
    captions ("red apple, flat") among that style's renders, and held-out (emoji, style) pairs the same way, per
    style and all together.

    Chance level: k / gallery size (0.03% top-1, 0.15% top-5 for 3,375 renders); the refine share has no chance
    level (a refined prompt that keeps the user's words names the emoji: 100%).

    Args:
        renders: `load_renders(data_dir)`; every one is in the gallery.
        generate_prompts: fn(list of prompts) -> list of PIL images (seeded by position, as `sdxs eval` does).
        generate_images: fn(list of image paths) -> images generated from their `encode_image`; `None` skips it.
        refine: fn(list of prompts) -> refined prompts (`pipe.refine_prompts`); `None` skips the refine rows.
        per_kind: training emoji per kind (the same emoji for bare names and exact captions).
        held_out, image_prompts, refine_per_kind: sizes of the other groups (`held_out`: per style for pairs).
        grid_images: bare-name generations kept for a labelled grid (taken across kinds).
        seed: the choice of emoji (generation seeds are the callables').
        progress: an object with `set_postfix_str(text)`, or `None`.

    Returns:
        [`StrictResult`].
    """
    styles = styles_of(renders)
    every_style, renders = renders, in_style(renders, styles[0])
    gallery = PixelGallery(renders)
    train = [r for r in renders if r.split == "train"]
    rng = random.Random(seed + 1)
    result = StrictResult([])
    for label, targets, prompts in _prompt_groups(renders, train, per_kind, held_out, seed, rng):
        _stage(progress, f"strict: {label}")
        images = generate_prompts(prompts)
        result.scores.append(score_images(gallery, images, targets, label))
        if label == "training, bare name":
            result.grid = _across_kinds(images, prompts, targets, grid_images)
    if len(styles) > 1:
        _stage(progress, "strict: the other styles")
        galleries = {styles[0]: gallery}
        result.scores += style_exact_scores(every_style, generate_prompts, per_kind, seed, galleries)
        result.scores += style_pair_scores(every_style, generate_prompts, held_out, seed, galleries)
    if refine is not None:
        _stage(progress, "strict: refine")
        _refine_rows(result, gallery, train, refine, generate_prompts, refine_per_kind, seed)
    if generate_images is not None and image_prompts:
        _stage(progress, "strict: image prompts")
        pick = sorted(rng.sample(train, min(image_prompts, len(train))), key=lambda r: r.index)
        images = generate_images([r.path for r in pick])
        result.scores.append(score_images(gallery, images, pick, "image prompts, training images"))
    return result


def style_exact_scores(
    renders: Sequence[Render], generate_prompts, per_kind: int = 24, seed: int = 0, galleries: dict | None = None
) -> list[StrictScores]:
    """What: does each style other than the default answer its own captions? Training emoji of that style per kind
    as exact captions ("red apple, flat"), each scored among the renders of that style (L2 at 32x32 on white,
    `score_images`): one group per style, "training, exact caption, STYLE". The default style's exact captions are
    `strict_eval`'s "training, exact caption".

    On: `per_kind` training renders of each kind and style (`pick_per_kind`, `seed`); `generate_prompts` as in
    `strict_eval`; `galleries` (style -> `PixelGallery`) as in `style_pair_scores`, filled in here.

    Chance level: k / the style's render count; no groups when the dataset has one style.
    """
    styles = styles_of(renders)
    galleries = galleries if galleries is not None else {}
    out = []
    for style in styles[1:]:
        own = in_style(renders, style)
        pick = pick_per_kind([r for r in own if r.split == "train"], per_kind, seed)
        if not pick:
            continue
        out.append(_exact_in_style(galleries, style, own, pick, generate_prompts, f"training, exact caption, {style}"))
    return out


def style_pair_scores(
    renders: Sequence[Render], generate_prompts, held_out: int = 60, seed: int = 0, galleries: dict | None = None
) -> list[StrictScores]:
    """What: concept x style generalisation: for held-out (emoji, style) pairs (the emoji trained in its other
    styles only), does the exact caption of the missing style ("red apple, flat") retrieve that render among the
    renders of that style (L2 at 32x32 on white, `score_images`)? One group per style ("held-out style pairs,
    STYLE", per kind in its rows), and one of all styles together.

    On: up to `held_out` pairs per style (fixed random choice, `seed`); `generate_prompts` as in `strict_eval`;
    `galleries` (style -> `PixelGallery` of `in_style(renders, style)`) reuses galleries already built.

    Chance level: k / the style's render count (the "all styles" group: the mean over its prompts); no groups when
    the dataset has one style.
    """
    styles = styles_of(renders)
    if len(styles) < 2:
        return []
    galleries = dict(galleries or {})
    rng = random.Random(seed + 3)  # its own stream: the other groups' choice is the same with or without pairs
    out = []
    for style in styles:
        own = in_style(renders, style)
        pool = [r for r in own if r.holdout == "style"]
        if not pool:
            continue
        pick = sorted(rng.sample(pool, min(held_out, len(pool))), key=lambda r: r.index)
        out.append(_exact_in_style(galleries, style, own, pick, generate_prompts, f"held-out style pairs, {style}"))
    if len(out) > 1:
        out.append(_merged("held-out style pairs, all styles", out))
    return out


def _exact_in_style(galleries: dict, style: str, own, pick, generate_prompts, label: str) -> StrictScores:
    """`pick`'s exact captions generated and ranked among `own` (the style's renders; gallery cached per style)."""
    if style not in galleries:
        galleries[style] = PixelGallery(own)
    prompts = [r.exact for r in pick]
    scores = score_images(galleries[style], generate_prompts(prompts), pick, label)
    scores.prompts = prompts
    return scores


def _merged(label: str, scores: Sequence[StrictScores]) -> StrictScores:
    """Several groups as one (gallery size: the mean over the prompts, for the chance level)."""
    n = sum(s.count for s in scores)
    return StrictScores(
        label,
        np.concatenate([s.ranks for s in scores]),
        np.concatenate([s.nearest for s in scores]),
        np.concatenate([s.edge_ratio for s in scores]),
        [k for s in scores for k in s.kinds],
        round(sum(s.gallery_size * s.count for s in scores) / max(n, 1)),
        prompts=[p for s in scores for p in s.prompts],
        drawn=[d for s in scores for d in (s.drawn or [None] * s.count)],
    )


def _stage(progress, text: str) -> None:
    if progress is not None:
        progress.set_postfix_str(text)


def _prompt_groups(renders, train, per_kind: int, held_out: int, seed: int, rng: random.Random):
    """(label, target renders, prompts) of the text groups; `rng` then picks the image-prompt sources."""
    chosen = pick_per_kind(train, per_kind, seed)
    groups: list[tuple[str, list[Render], list[str]]] = [
        ("training, bare name", chosen, [r.bare for r in chosen]),
        ("training, exact caption", chosen, [r.exact for r in chosen]),
    ]
    for label, holdout in (("held-out emoji, bare name", "emoji"), ("held-out skin tones, bare name", "skin tone")):
        pool = [r for r in renders if r.holdout == holdout]
        pick = sorted(rng.sample(pool, min(held_out, len(pool))), key=lambda r: r.index)
        groups.append((label, pick, [r.bare for r in pick]))
    return [g for g in groups if g[1]]


def _across_kinds(images, prompts, targets, n: int) -> list[tuple[PIL.Image.Image, str]]:
    """Up to `n` (image, prompt) pairs taken from the kinds in turn, so the grid shows every kind."""
    by_kind = {k: [(im, p) for im, p, t in zip(images, prompts, targets, strict=True) if t.kind == k] for k in KINDS}
    taken = []
    while len(taken) < n and any(by_kind.values()):
        for k in KINDS:
            if by_kind[k] and len(taken) < n:
                taken.append(by_kind[k].pop(0))
    return taken


def _refine_rows(result: StrictResult, gallery, train, refine, generate_prompts, per_kind: int, seed: int) -> None:
    """The refine check: refined bare names that still name their emoji, and strict rows for both prompt sets."""
    targets = pick_per_kind(train, per_kind, seed + 2)
    refined = refine([r.bare for r in targets])
    kept = [names_the_emoji(text, r) for text, r in zip(refined, targets, strict=True)]
    result.refine_kept = 100.0 * sum(kept) / len(kept)
    result.refine_examples = list(zip([r.bare for r in targets], refined, strict=True))
    styles = list(STYLE_TAGS.values())
    added = [(t, t in r.tags) for text, r in zip(refined, targets, strict=True) for t in added_tags(text, r, styles)]
    result.refine_tags = (sum(own for _, own in added), sum(not own for _, own in added))
    for label, prompts in (("refine set, bare name", [r.bare for r in targets]), ("refine set, refined", refined)):
        images = generate_prompts(list(prompts))
        result.scores.append(score_images(gallery, images, targets, label))
