"""The strict pixel-space retrieval of `sdxs.eval.strict`: kinds, ranks, distances, edge energy, refine check."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdxs.eval import strict as es

# (name, skin tones, Unicode group, colour, split, holdout)
ROWS = [
    ("red apple", [], "Food & Drink", (220, 30, 30), "train", ""),
    ("green apple", [], "Food & Drink", (30, 180, 60), "train", ""),
    ("blue heart", [], "Smileys & Emotion", (30, 60, 220), "train", ""),
    ("flag of JP", [], "Flags", (200, 200, 250), "train", ""),
    ("keycap 1", [], "", (20, 20, 20), "train", ""),
    ("waving hand", ["light skin tone"], "People & Body", (250, 220, 190), "train", ""),
    ("waving hand", ["dark skin tone"], "People & Body", (100, 60, 40), "validation", "skin tone"),
    ("ear", [], "People & Body", (200, 150, 120), "validation", "emoji"),
]


def disc(colour, side=64, offset=0) -> Image.Image:
    im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((8 + offset, 8, side - 8 + offset, side - 8), fill=colour + (255,))
    return im


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    rows = []
    for i, (name, tones, group, colour, split, holdout) in enumerate(ROWS):
        (root / split).mkdir(exist_ok=True)
        disc(colour).save(root / split / f"{i:04x}.webp", lossless=True)
        text = [", ".join([name, *tones]), ", ".join([name, *tones, "3d render"])]
        row = dict(file_name=f"{split}/{i:04x}.webp", split=split, holdout=holdout, name=name, skin_tones=tones)
        rows.append(dict(row, group=group, text=text))
    (root / "splits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_kinds_and_prompts(data):
    renders = es.load_renders(data)
    assert [r.kind for r in renders] == [
        "objects/animals/food/travel",
        "objects/animals/food/travel",
        "smileys",
        "flags",
        "symbols",
        "toned people",
        "toned people",
        "other people",
    ]
    assert renders[5].bare == "waving hand, light skin tone"
    assert renders[5].exact == "waving hand, light skin tone, 3d render"


def test_a_copy_of_the_render_is_a_hit_and_a_wrong_colour_is_not(data):
    renders = es.load_renders(data)
    gallery = es.PixelGallery(renders)
    exact = [Image.open(r.path).convert("RGBA").resize((128, 128)) for r in renders]
    scores = es.score_images(gallery, exact, renders, "copies")
    assert scores.top(1) == 100.0 and (scores.nearest < 0.02).all()
    np.testing.assert_allclose(scores.edge_ratio, 1.0, atol=0.05)
    # the blue heart drawn red retrieves the red apple: a miss at top-1 for the blue heart
    wrong = es.score_images(gallery, [exact[0]], [renders[2]], "wrong colour")
    assert wrong.ranks[0] >= 1 and wrong.top(1) == 0.0
    # each record names what the generation drew instead: the render nearest to it
    assert [r["drawn"] for r in scores.per_prompt()] == [r.bare for r in renders]
    assert wrong.per_prompt()[0]["drawn"] == renders[0].bare != renders[2].bare
    # blur lowers the edge energy, noise raises it
    blurred = exact[0].convert("RGB").filter(ImageFilter.GaussianBlur(4))
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(
        np.clip(
            np.asarray(exact[0].convert("RGB"), dtype=np.float32) + rng.normal(0, 40, (128, 128, 3)), 0, 255
        ).astype(np.uint8)
    )
    edges = es.score_images(gallery, [blurred, noisy], [renders[0]] * 2, "quality").edge_ratio
    assert edges[0] < 0.75 < 1.25 < edges[1]
    rows = {r["kind"]: r for r in scores.rows()}
    assert rows["all"]["n"] == len(renders) and rows["toned people"]["n"] == 2


def test_strict_eval_groups_and_refine_check(data):
    renders = es.load_renders(data)
    by_prompt = {r.bare: r for r in renders} | {r.exact: r for r in renders}

    def generate(prompts):  # a perfect model: draws exactly the named emoji (a blank for anything else)
        blank = Image.new("RGB", (64, 64), "white")
        return [
            Image.open(by_prompt[p.split(", +")[0]].path) if p in by_prompt or ", +" in p else blank for p in prompts
        ]

    def refine(prompts):  # keeps the first, loses the second
        return [p if i % 2 == 0 else "something else" for i, p in enumerate(prompts)]

    result = es.strict_eval(renders, generate, refine=lambda ps: [p + ", +" for p in ps], per_kind=2, seed=0)
    labels = [s.label for s in result.scores]
    assert labels[:4] == [
        "training, bare name",
        "training, exact caption",
        "held-out emoji, bare name",
        "held-out skin tones, bare name",
    ]
    assert all(s.top(1) == 100.0 for s in result.scores)
    assert result.refine_kept == 100.0 and len(result.grid) == result.find("training, bare name").count
    assert result.refine_tags == (0, len(result.refine_examples))  # "+" is no emoji's caption tag
    # added tags: after the name, style tags and skin tones aside; a tag of the emoji's own captions is "own"
    apple = renders[0]
    assert apple.tags == {apple.name.lower(), "3d render"}
    added = es.added_tags(f"{apple.bare}, 3d render, Zebra, medium skin tone, {apple.name}", apple, ["3d render"])
    assert added == ["zebra", apple.name.lower()] and [t in apple.tags for t in added] == [False, True]
    lossy = es.strict_eval(renders, generate, refine=refine, per_kind=2, seed=0, image_prompts=0)
    assert lossy.refine_kept == pytest.approx(50.0)
    assert lossy.find("refine set, refined").top(1) < lossy.find("refine set, bare name").top(1)
    assert not es.names_the_emoji("waving hand", renders[5]) and es.names_the_emoji(
        "waving hand, light skin tone, 3d render", renders[5]
    )
    # a longer name that contains the asked one, or an added skin tone, is another emoji
    assert es.names_the_emoji("red apple, fruit, 3d render", renders[0])
    assert not es.names_the_emoji("red apple tree, 3d render", renders[0])
    assert not es.names_the_emoji("red apple, medium skin tone, 3d render", renders[0])


def test_paired_changes_counts_prompts_gained_and_lost_and_tests_them(data):
    renders = es.load_renders(data)
    gallery = es.PixelGallery(renders)
    copies = [Image.open(r.path).convert("RGBA") for r in renders]
    blank = Image.new("RGB", (64, 64), "white")
    good = es.score_images(gallery, copies, renders, "g")
    worse = es.score_images(gallery, [blank, blank, *copies[2:]], renders, "g")  # loses the two apples at top-1
    records = good.per_prompt()
    assert [r["prompt"] for r in records] == [r.bare for r in renders] and records[0]["rank"] == 0
    rows = {r["kind"]: r for r in es.paired_changes({"g": records}, {"g": worse.per_prompt()}, k=1)}
    assert rows["all"]["n"] == len(renders) and (rows["all"]["gained"], rows["all"]["lost"]) == (0, 2)
    assert rows["all"]["before"] == 100.0 and rows["all"]["after"] == 75.0
    assert rows["all"]["p"] == 0.5  # two prompts lost is what chance gives half the time
    assert rows["flags"]["lost"] == 0 and rows["flags"]["p"] == 1.0
    # eight of eight lost is not chance (p = 2 / 2**8); the same records against themselves change nothing
    many = [dict(r, prompt=f"{r['prompt']} {i}") for i in range(4) for r in records[:2]]
    lost = [dict(r, rank=99) for r in many]
    assert es.paired_changes({"g": many}, {"g": lost}, k=1)[0]["p"] == pytest.approx(2 / 2**8, abs=1e-3)
    assert all(r["p"] == 1.0 for r in es.paired_changes({"g": records}, {"g": records}))


def test_compare_strict_pairs_the_typed_prompt_classes_too(tmp_path):
    """scripts/compare_strict.py: the typed-prompt classes of two `--json` files, per class and pooled."""
    import subprocess
    import sys
    from pathlib import Path

    def rec(prompt, rank):
        return {"prompt": prompt, "text": prompt, "kind": "smileys", "rank": rank}

    def payload(ranks):
        typed = {"case": [rec("RED APPLE", ranks[0])], "plurals": [rec("two red apples", ranks[1])]}
        return {"prompts": {"training, bare name": [rec("red apple", 0)]}, "robust_prompts": typed}

    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(payload([0, 9])))
    after.write_text(json.dumps(payload([9, 0])))
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_strict.py"
    out = subprocess.run([sys.executable, str(script), str(before), str(after)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| typed: case | all | 1 | 100.0% | 0.0% | 0 | 1 |" in out.stdout
    assert "| typed: plurals | all | 1 | 0.0% | 100.0% | 1 | 0 |" in out.stdout
    assert "| typed: all classes | all | 2 | 50.0% | 50.0% | 1 | 1 |" in out.stdout
    # a `strict_eval.py --robust-only` file has the typed classes only: compared against a full one, those
    robust_only = tmp_path / "robust-only.json"
    robust_only.write_text(json.dumps({"robust_prompts": payload([9, 0])["robust_prompts"]}))
    out = subprocess.run([sys.executable, str(script), str(before), str(robust_only)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| typed: plurals | all | 1 | 0.0% | 100.0% | 1 | 0 |" in out.stdout and "bare name" not in out.stdout


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    """Two styles: 3d discs and flat squares of the same colours; the flat blue heart is a held-out pair."""
    root = tmp_path_factory.mktemp("styled")
    rows = []
    for style, shape in (("3d", "disc"), ("twemoji", "square")):
        for i, (name, tones, group, colour, split, holdout) in enumerate(ROWS[:6]):
            if style == "twemoji" and name == "blue heart":
                split, holdout = "validation", "style"
            folder = root / split / ("" if style == "3d" else style)
            folder.mkdir(parents=True, exist_ok=True)
            im = disc(colour)
            if shape == "square":
                im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
                im.paste(colour + (255,), (4, 4, 60, 60))
            im.save(folder / f"{i:04x}.webp", lossless=True)
            tag = "3d render" if style == "3d" else "flat"
            text = [", ".join([name, *tones]), ", ".join([name, *tones, tag])]
            row = dict(file_name=(folder / f"{i:04x}.webp").relative_to(root).as_posix(), split=split, holdout=holdout)
            rows.append(dict(row, name=name, skin_tones=tones, group=group, text=text, style=style))
    (root / "splits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_held_out_style_pairs_are_scored_among_their_styles_renders(data, styled):
    renders = es.load_renders(styled)
    assert es.styles_of(renders) == ["3d", "twemoji"] and renders[8].exact == "blue heart, flat"
    flat = es.in_style(renders, "twemoji")
    assert [r.index for r in flat] == list(range(6)) and flat[2].holdout == "style"
    paths = {r.exact: r.path for r in renders} | {r.bare: r.path for r in renders if r.style == "3d"}
    asked = []

    def generate(prompts):  # a perfect model
        asked.extend(prompts)
        return [Image.open(paths[p]) for p in prompts]

    scores = es.style_pair_scores(renders, generate)
    assert [s.label for s in scores] == ["held-out style pairs, twemoji"] and asked == ["blue heart, flat"]
    assert scores[0].gallery_size == 6 and scores[0].top(1) == 100.0 and scores[0].prompts == ["blue heart, flat"]
    assert scores[0].rows()[1]["kind"] == "smileys"
    # strict_eval: the other groups on the default style's renders only, then the pairs; one style: no pair rows
    result = es.strict_eval(renders, generate, per_kind=2, seed=0, image_prompts=0)
    labels = [s.label for s in result.scores]
    assert labels[-2:] == ["training, exact caption, twemoji", "held-out style pairs, twemoji"]
    assert all(s.top(1) == 100.0 for s in result.scores)
    flat_exact = result.scores[-2]  # the other style's own captions, among its own renders, its training emoji only
    assert all(p.endswith(", flat") for p in flat_exact.prompts) and "blue heart, flat" not in flat_exact.prompts
    assert all(s.gallery_size == 6 for s in result.scores)
    single = es.strict_eval(es.load_renders(data), lambda ps: [Image.new("RGB", (8, 8))] * len(ps), image_prompts=0)
    assert not any("style pairs" in s.label for s in single.scores)
    # two styles with pairs: one group each and one for all, whose chance level uses the mean gallery size
    both = [
        replace(r, split="validation", holdout="style") if (r.style, r.name) == ("3d", "red apple") else r
        for r in renders
    ]
    scores = es.style_pair_scores(both, generate)
    assert [s.label.split(", ")[1] for s in scores] == ["3d", "twemoji", "all styles"]
    assert scores[-1].count == 2 and scores[-1].top(1) == 100.0 and scores[-1].gallery_size == 6


def test_robust_eval_scores_each_class_and_grids_its_first_prompts(data):
    """`sdxs.eval.robust`: every class of phrasing is scored on training emoji, and the grid shows each class's first
    prompt per kind with its result (a model that always draws the red apple hits only the apple's prompts)."""
    from sdxs.eval import robust as er

    renders = es.load_renders(data)
    apple = Image.open(renders[0].path)
    lines = [[r.bare, r.exact] for r in renders]
    result = er.robust_eval(renders, lines, lambda prompts: [apple] * len(prompts), per_kind=1, seed=0)
    summary = result.summary()
    assert {s.label for s in result.scores} <= set(er.CLASSES) and "case" in summary
    assert 0 < summary["mean over classes"] < 100
    firsts = [row for s in result.scores for row in s.per_prompt() if row["rank"] == 0]
    assert firsts and all(row["kind"] == renders[0].kind for row in firsts)  # only the apple can be a top-1 hit
    labels = [label for _, label in result.grid]
    assert len(labels) == sum(len(set(s.kinds)) for s in result.scores)
    assert all(label.split(": ", 1)[0] in ("hit", "miss") for label in labels)
