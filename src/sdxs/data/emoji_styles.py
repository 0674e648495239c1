"""The styles of `sdxs data emoji --styles 3d,twemoji,noto`: the same emoji as Fluent 3D renders, Twemoji and Noto
Color Emoji, one caption tag per style, and the held-out (emoji, style) pairs.

    style     source (npm, pinned)                         licence of the images       caption tag
    3d        @lobehub/fluent-emoji-3d  256 px webp        MIT (Microsoft)             "3d render"
    twemoji   emoji-datasource-twitter   64 px png         CC-BY 4.0 (attribution)     "flat"
    noto      emoji-datasource-google    64 px png         Apache-2.0                  "cartoon"

The emoji-datasource packages (MIT for their data; each image set under its own licence, README "Image Sources")
also exist for Apple and Facebook: those images are not openly licensed and are never read. 64 px is the largest
single-image size the two packages ship (the larger files are sprite sheets of the same 64 px images), so each
image is upscaled 4x to the 3d renders' 256 x 256 with Lanczos (`Image.resize` resamples RGBA with premultiplied
alpha, so transparent edges do not darken) and stored as lossless WebP; a later box downsample to the model's 64 px
encoder input gives back the source within rounding. Emoji are matched across sources by codepoints (`unified` in
the package's `emoji.json`; only images with `has_img_<set>` true, i.e. no fallback from another set).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

DEFAULT_STYLE = "3d"
# style -> the tag that ends its captions ("red apple, flat"); the 3d tag is the one the shipped model learned
STYLE_TAGS = {"3d": "3d render", "twemoji": "flat", "noto": "cartoon"}
# style -> (npm package, emoji-datasource image set); the 3d style is read by `sdxs.data.emoji` itself
DATASOURCE_PACKAGES = {
    "twemoji": ("emoji-datasource-twitter@16.0.0", "twitter"),
    "noto": ("emoji-datasource-google@16.0.0", "google"),
}
IMAGE_SIZE = 256  # side of every image of the dataset: the 3d renders' size
SOURCE_SIZE = 64  # emoji-datasource's single images
HOLDOUT_STYLE_PERCENT = 10  # of the emoji left in training (all styles): one style held out
LICENSE_DIR = Path(__file__).parent / "licenses"

TWEMOJI_ATTRIBUTION = """Twemoji graphics (style "twemoji" of this dataset)

Copyright 2019 Twitter, Inc and other contributors.
Graphics from Twemoji (the maintained fork https://github.com/jdecked/twemoji, v16.0.1, via the npm package
{package}),
licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/ (full text below).
Changes: upscaled from 64 x 64 to 256 x 256 px (Lanczos) and stored as lossless WebP.

"""

NOTO_NOTICE = """Noto Color Emoji images (style "noto" of this dataset)

Images by Google from Noto Emoji (https://github.com/googlefonts/noto-emoji, v2.048, via the npm
package {package}), licensed under the Apache License, Version 2.0 (full text below).
Changes: upscaled from 64 x 64 to 256 x 256 px (Lanczos) and stored as lossless WebP.

"""


def parse_styles(text: str) -> tuple[str, ...]:
    """`--styles` ("3d,twemoji,noto") -> ("3d", "twemoji", "noto"); the first is the default style."""
    styles = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    unknown = [s for s in styles if s not in STYLE_TAGS]
    if not styles or unknown:
        raise ValueError(
            f"`--styles` takes a comma-separated list of {', '.join(STYLE_TAGS)}, got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            + "; e.g. `--styles 3d,twemoji,noto`."
        )
    return styles


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def read_datasource(tgz: Path, image_set: str) -> tuple[dict[tuple[int, ...], str], dict[str, str], str]:
    """One emoji-datasource tarball: ({codepoints: member name of its 64 px png}, {codepoints string:
    Unicode category}, the package's licence). Only images the set has itself (`has_img_<set>`)."""
    images, categories = {}, {}
    with tarfile.open(tgz) as tar:
        table = json.load(tar.extractfile("package/emoji.json"))
        license_text = tar.extractfile("package/LICENSE").read().decode()
        names = set(tar.getnames())
    for entry in table:
        for variant in [entry, *(entry.get("skin_variations") or {}).values()]:
            member = f"package/img/{image_set}/{SOURCE_SIZE}/{variant['image']}"
            if not variant.get(f"has_img_{image_set}") or member not in names:
                continue
            cps = tuple(int(part, 16) for part in variant["unified"].split("-"))
            images[cps] = member
            categories[variant["unified"]] = entry.get("category", "")
    return images, categories, license_text


def to_dataset_image(png: bytes) -> bytes:
    """A 64 px emoji png -> 256 x 256 lossless WebP (RGBA, Lanczos on premultiplied alpha)."""
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "WEBP", lossless=True, method=2)  # method 2: 16 ms an image, 4% larger than the default 4
    return buf.getvalue()


def assign_style_holdouts(emoji: list, styles: tuple[str, ...], staples: frozenset[str]) -> None:
    """Deterministic held-out (emoji, style) pairs: ~`HOLDOUT_STYLE_PERCENT`% of the emoji that train are drawn
    (by a hash of their codepoints without skin tones) and one of their styles picked; where that is not the 3d
    style, its images are left out of training in all their tone variants and `held_style` names it. The 3d style
    is never held out: its split stays exactly the 3d-only dataset's, whose every training image the shipped model
    learnt (a fine-tune on three styles that held some out would forget them, and measure memory, not
    generalisation). The choice does not depend on the order of `--styles`. No-op for one style."""
    if len(styles) < 2:
        return
    order = [s for s in STYLE_TAGS if s in styles]
    groups: dict[str, list] = {}
    for e in emoji:
        if e.split == "train":
            groups.setdefault(e.base, []).append(e)
    for base, group in groups.items():
        if _hash("style:" + base) % 100 >= HOLDOUT_STYLE_PERCENT or group[0].name in staples:
            continue
        present = [s for s in order if any(s in e.images for e in group)]
        if len(present) < 2:
            continue
        held = present[_hash("which style:" + base) % len(present)]
        if held == DEFAULT_STYLE:  # drawn, but the 3d images stay in training (the draw itself keeps the other pairs)
            continue
        for e in group:
            # only where the emoji keeps another style in training: a pair, not a held-out emoji
            if held in e.images and len(e.images) >= 2:
                e.held_style = held


def write_style_licenses(folder: Path, styles: tuple[str, ...], datasource_licenses: dict[str, str]) -> None:
    """LICENSES/ for the emoji-datasource styles: the image licence with its attribution, and the package's own."""
    for style in styles:
        if style not in DATASOURCE_PACKAGES:
            continue
        package = DATASOURCE_PACKAGES[style][0]
        if style == "twemoji":
            text = TWEMOJI_ATTRIBUTION.format(package=package) + (LICENSE_DIR / "CC-BY-4.0.txt").read_text()
            (folder / "twemoji-graphics-CC-BY-4.0.txt").write_text(text, encoding="utf-8")
        else:
            text = NOTO_NOTICE.format(package=package) + (LICENSE_DIR / "Apache-2.0.txt").read_text()
            (folder / "noto-emoji-Apache-2.0.txt").write_text(text, encoding="utf-8")
        name = package.rsplit("@", 1)[0]
        (folder / f"{name}-MIT.txt").write_text(datasource_licenses[style], encoding="utf-8")


def styles_readme(summary: dict) -> str:
    """The README section of a dataset of several styles: counts per style and split, tags, sources, licences."""
    lines = [
        "## Styles",
        "",
        "| style | caption tag | source (npm) | images | train | validation | held-out pairs | licence |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    licences = {"3d": "MIT", "twemoji": "CC-BY 4.0 (attribution below)", "noto": "Apache-2.0"}
    for style, c in summary["per_style"].items():
        source = DATASOURCE_PACKAGES[style][0] if style in DATASOURCE_PACKAGES else c["package"]
        lines.append(
            f"| {style} | `{STYLE_TAGS[style]}` | `{source}` | {c['images']} | {c['train']} | {c['validation']} | "
            f"{c['held_out_pairs']} | {licences[style]} |"
        )
    first = next(iter(summary["per_style"]))
    lines += [
        "",
        f"Every caption line ends in its style's tag (`red apple, {STYLE_TAGS[first]}`), except the bare name "
        f"(`red apple`), which only the first style, {first}, has: a prompt without a tag asks for that style.",
        "The split is per emoji, the same in every style: a held-out emoji or skin tone is held out in all styles.",
        f'Held-out (emoji, style) pairs ({summary["held_out_pairs"]} images, `holdout` "style" in splits.jsonl): '
        f"of ~{HOLDOUT_STYLE_PERCENT}% of the training emoji one style is picked, and where it is a flat one "
        "the emoji trains in its other styles only; the image of the missing style is in validation/, for the eval "
        "to ask for that style (`red apple, flat`). The 3d style is never held out: its split is the 3d-only "
        "dataset's.",
        "Images of the 3d style are at train/<codepoints>.webp as in the 3d-only dataset; the others at "
        "train/<style>/<codepoints>.webp (and the same under validation/). Twemoji and Noto images are the "
        f"packages' {SOURCE_SIZE} px PNGs upscaled to {IMAGE_SIZE} px with Lanczos, stored as lossless WebP.",
        "",
    ]
    if "twemoji" in summary["per_style"]:
        lines += [
            "Attribution: Twemoji graphics by Twitter, Inc and other contributors (https://github.com/jdecked/twemoji),",
            "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); upscaled and re-encoded.",
            "",
        ]
    if "noto" in summary["per_style"]:
        lines += [
            "Noto Color Emoji images by Google (https://github.com/googlefonts/noto-emoji), Apache License 2.0;",
            "upscaled and re-encoded.",
            "",
        ]
    return "\n".join(lines)
