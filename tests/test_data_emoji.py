"""`sdxs data emoji` for real (npm + registry; this CI has both) and its caption composition (offline)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from sdxs.data.cli import register
from sdxs.data.emoji import STAPLES, captions_for, emoji_name, parse_codepoints
from sdxs.data.folder import scan_folder


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


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm (Node.js); this CI has it")
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
    assert {r["split"] for r in rows if r["name"] in STAPLES} == {"train"}
    assert {"red heart", "hamburger", "airplane"} <= {r["name"] for r in rows}
