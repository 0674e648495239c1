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

from sdxs.data.cli import register
from sdxs.data.emoji import (
    IMAGES_PACKAGE,
    KEYWORDS_PACKAGE,
    NAMES_PACKAGE,
    STAPLES,
    captions_for,
    emoji_name,
    make_emoji_dataset,
    parse_codepoints,
)
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
    """The emoji-names and keywords npm packages in the cache (`names`: emoji -> {"name", "group"})."""
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
    assert rows["2764-fe0f.webp"]["split"] == "train"  # a staple
    assert (tmp_path / "emoji" / face["file_name"]).with_suffix(".txt").read_text().splitlines() == face["text"]
    with pytest.raises(RuntimeError, match="expected >= 6"):
        make_emoji_dataset(tmp_path / "again", cache_dir=cache, min_images=6)


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
    # every image knows its Unicode group (the eval's kinds), and the staples users type first are trained on
    assert all(r["group"] for r in rows)
    assert "emoji" not in {r["holdout"] for r in rows if r["name"] in STAPLES}  # (one tone of "man" may be)
    assert {"red heart", "hamburger", "airplane"} <= {r["name"] for r in rows}
