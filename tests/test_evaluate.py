"""`sdxs eval` (`sdxs.eval`): metric functions on known inputs, the retrieval feature space, and a tiny end-to-end
run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs import cli
from sdxs import eval as ev
from sdxs.eval.report import _interleave
from sdxs.grid import make_grid

# A dozen distinct emoji stand-ins: (caption name, colour, shape, split, holdout)
FAKE_EMOJI = [
    ("red circle", (220, 30, 30), "circle", "train", ""),
    ("green circle", (30, 180, 60), "circle", "train", ""),
    ("blue square", (30, 60, 220), "square", "train", ""),
    ("yellow square", (240, 210, 20), "square", "train", ""),
    ("purple triangle", (140, 40, 170), "triangle", "train", ""),
    ("orange triangle", (250, 140, 20), "triangle", "train", ""),
    ("black ring", (20, 20, 20), "ring", "train", ""),
    ("cyan ring", (20, 200, 210), "ring", "train", ""),
    ("pink bar", (240, 100, 170), "bar", "validation", "emoji"),
    ("brown bar", (120, 70, 30), "bar", "validation", "emoji"),
    ("hand, light skin tone", (250, 220, 190), "circle", "validation", "skin tone"),
    ("hand, dark skin tone", (100, 60, 40), "circle", "validation", "skin tone"),
]
SIDE = 64  # sides must be multiples of 16 (the 16x decoder): 64 -> 32 px into the encoder -> 64 px out


def draw_shape(colour, shape: str) -> Image.Image:
    """An RGBA image: a coloured shape on a transparent background, like the emoji renders."""
    im = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    box = (10, 10, SIDE - 10, SIDE - 10)
    if shape == "circle":
        d.ellipse(box, fill=colour + (255,))
    elif shape == "square":
        d.rectangle(box, fill=colour + (255,))
    elif shape == "triangle":
        d.polygon([(SIDE // 2, 8), (SIDE - 8, SIDE - 8), (8, SIDE - 8)], fill=colour + (255,))
    elif shape == "ring":
        d.ellipse(box, outline=colour + (255,), width=8)
    else:
        d.rectangle((8, SIDE // 2 - 8, SIDE - 8, SIDE // 2 + 8), fill=colour + (255,))
    return im


@pytest.fixture(scope="module")
def fake_emoji(tmp_path_factory):
    """An emoji-format folder: train/ validation/ with NAME.webp + NAME.txt, and splits.jsonl."""
    root = tmp_path_factory.mktemp("emoji")
    rows = []
    for i, (name, colour, shape, split, holdout) in enumerate(FAKE_EMOJI):
        stem = f"{split}/{i:04x}"
        (root / split).mkdir(exist_ok=True)
        draw_shape(colour, shape).save(root / f"{stem}.webp", lossless=True)
        text = [f"{name}, 3d render", f"{name}, {shape}, 3d render"]
        (root / f"{stem}.txt").write_text("\n".join(text) + "\n")
        rows.append(
            dict(file_name=f"{stem}.webp", split=split, holdout=holdout, emoji="?", name=name, skin_tones=[], text=text)
        )
    (root / "splits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ------------------------------------------------------------------------------------------------------------------
# Metrics on known inputs
# ------------------------------------------------------------------------------------------------------------------


def test_mse_and_psnr_known_values():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.5)
    assert ev.mse_per_image(a, b).tolist() == [0.25, 0.25]
    psnr = ev.psnr_from_mse(torch.tensor([0.01, 0.0]))
    assert psnr[0].item() == pytest.approx(20.0)
    assert math.isinf(psnr[1].item())  # identical images: inf, documented in docs/eval-method.md
    assert math.isinf(ev.psnr_from_mse(ev.mse_per_image(b, b))[0].item())


def test_edge_error_zero_for_identical_and_positive_for_a_shifted_edge():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0  # a vertical step edge
    assert ev.edge_error_per_image(x, x).item() == 0.0
    assert ev.edge_error_per_image(x, torch.roll(x, 2, dims=-1)).item() > 0
    # Sobel magnitude of a unit step: 4 on the two columns either side of it (kernel weights 1+2+1), 0 elsewhere
    mag = ev.sobel_magnitude(x)[0, 0]
    assert mag[5, 7].item() == pytest.approx(4.0) and mag[5, 8].item() == pytest.approx(4.0)
    assert mag[5, 0].item() == 0.0 and mag[5, 15].item() == 0.0  # replicated borders: no false edge


def test_edge_energy_ratio_one_for_identical_and_below_one_when_blurred():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8] = 1.0  # a one-pixel line (a blurred single step keeps its mean gradient: only detail loses energy)
    assert ev.edge_energy_ratio_per_image(x, x).item() == pytest.approx(1.0)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert 0 < ev.edge_energy_ratio_per_image(blurred, x).item() < 1
    assert ev.edge_energy_ratio_per_image(x, blurred).item() > 1


def test_kl_to_standard_normal():
    zeros = torch.zeros(1, 4, 2, 2)
    assert ev.kl_per_image(zeros, zeros).item() == 0.0  # the posterior is N(0, 1) itself
    assert ev.kl_per_image(torch.ones(1, 4, 2, 2), zeros).item() == pytest.approx(0.5)  # 0.5 * mean^2


def test_downsample_and_bicubic_shapes_and_range():
    x = torch.rand(1, 3, 32, 32)
    small = ev.downsample2x(x)
    assert small.shape == (1, 3, 16, 16)
    assert small[0, 0, 0, 0].item() == pytest.approx(x[0, 0, :2, :2].mean().item())
    up = ev.bicubic_upscale2x(small)
    assert up.shape == x.shape and up.min() >= 0 and up.max() <= 1


def test_srgb_to_lab_reference_colours():
    np.testing.assert_allclose(ev.srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(ev.srgb_to_lab(np.array([0.0, 0.0, 0.0])), [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(ev.srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.05)


# ------------------------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------------------------


def test_exact_copy_retrieves_itself_at_rank_one(fake_emoji):
    items = ev.load_emoji_dataset(fake_emoji)
    assert len(items) == 12 and [it.index for it in items] == list(range(12))
    assert {it.holdout for it in items} == {"", "emoji", "skin tone"}
    index = ev.RetrievalIndex(ev.gallery_features([it.path for it in items]))
    # copies as decoded PIL images (not the files), so the query goes through the in-memory path
    copies = np.stack([ev.thumbnail_features(Image.open(it.path)) for it in items])
    ranks = index.ranks(copies, [it.index for it in items])
    assert ranks.tolist() == [0] * 12
    assert ev.topk_percent(ranks, 1) == 100.0
    # a query for the wrong target: that target is not the nearest
    assert index.ranks(copies[:1], [1])[0] > 0
    assert ev.chance_percent(1, 12) == pytest.approx(100 / 12) and ev.chance_percent(5, 3) == 100.0


def test_pick_subset_is_fixed_by_seed():
    items = list(range(50))
    a, b = ev.pick_subset(items, 10, seed=3), ev.pick_subset(items, 10, seed=3)
    assert a == b and len(a) == 10 and a == sorted(a)
    assert ev.pick_subset(items, 10, seed=4) != a
    assert ev.pick_subset(items, None, seed=0) == items


def test_missing_splits_file_is_a_user_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="splits.jsonl"):
        ev.load_emoji_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# End to end with the tiny random model
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_writes_every_section(tiny_pipe, fake_emoji, tmp_path):
    out_md, grid = tmp_path / "docs" / "eval.md", tmp_path / "media" / "grid.png"
    result = ev.evaluate(
        tiny_pipe,
        fake_emoji,
        out_md=out_md,
        grid_path=grid,
        steps=2,
        seed=5,
        batch_size=4,
        train_captions=3,
        vae_train_images=2,
        image_prompts=2,
        limit=2,
        refine_prompts=["a cat", "a red apple"],
        refine_max_new_tokens=4,
        progress=False,
    )
    text = out_md.read_text()
    for heading in ("# SDXS evaluation", "## VAE", "## Prompt fidelity", "## Image prompts", "## refine_prompts"):
        assert heading in text
    for line in ("- date:", "- hardware:", "- command:", "- model:", "2 steps, guidance 4.0"):
        assert line in text
    for group in ("training captions", "held-out emoji", "held-out skin-tone variants", "validation images"):
        assert group in text

    # VAE table in the card's format, both splits, finite numbers
    vae_lines = re.findall(r"^(VAE|bicubic) \| MSE=(\S+) PSNR=(\S+) Edge=(\S+)(?: KL=(\S+))?$", text, re.M)
    assert [name for name, *_ in vae_lines] == ["VAE", "bicubic", "VAE", "bicubic"]
    for name, mse, psnr, edge, kl in vae_lines:
        assert 0 <= float(mse) <= 1 and math.isfinite(float(psnr)) and float(edge) >= 0
        assert (kl != "") == (name == "VAE") and (kl == "" or float(kl) >= 0)
    wins = re.findall(r"^The VAE's PSNR is the higher of the two on (\d+) of the (\d+) images\.$", text, re.M)
    assert len(wins) == 2 and all(0 <= int(w) <= int(n) for w, n in wins)

    # Retrieval tables: every top-k a percentage, chance stated as k / 12 gallery images
    rows = re.findall(r"^\| [^|]+ \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% / ([\d.]+)% \|$", text, re.M)
    # prompt groups, the training captions by kind (all 'other' here), ceiling (2 splits x VAE/bicubic), image prompts
    assert len(rows) == 3 + 1 + 4 + 2
    assert "| training captions: other | 2 |" in text and [r.label for r in result.prompt_kinds] == [
        "training captions: other"
    ]
    for n, top1, top5, chance1, chance5 in rows:
        assert int(n) >= 1 and 0 <= float(top1) <= float(top5) <= 100
        assert float(chance1) == pytest.approx(100 / 12, abs=0.01) and float(chance5) == pytest.approx(
            500 / 12, abs=0.01
        )
    assert [r.count for r in result.prompts] == [2, 2, 2]  # --limit caps every group
    assert all(r.gallery_size == 12 for r in result.prompts + result.image_prompts + result.oracle)

    # refine table and grid
    assert "| a cat |" in text and "| a red apple |" in text and len(result.refine) == 2
    assert grid.is_file() and grid.stat().st_size < ev.GRID_MAX_BYTES
    assert "](../media/grid.png)" in text
    assert Image.open(grid).width == 4 * ev.GRID_THUMB

    # strict section: per-kind rows for bare names and exact captions, the refine check and its bare-name grid
    assert "## Strict prompt fidelity, per kind" in text
    labels = [s.label for s in result.strict.scores]
    assert (
        labels[:2] == ["training, bare name", "training, exact caption"] and "image prompts, training images" in labels
    )
    assert all(s.count <= 2 * len(es_kinds(result)) for s in result.strict.scores)
    assert "| training, bare name | all |" in text and "keeps the named emoji in" in text
    assert result.strict_grid_path.is_file() and "](../media/grid-strict.png)" in text


def styled_copy(src, dst, styles: dict[str, str | None]):
    """`src` (the fake emoji set) as a multi-style dataset: style -> image folder under the split (None: the split's
    own folder, as the 3d renders); other styles draw the shape with a dark outline (flat-art stand-in)."""
    rows = []
    for style, sub in styles.items():
        for row in map(json.loads, (src / "splits.jsonl").read_text().splitlines()):
            split, stem = row["file_name"].split("/")
            name = f"{split}/{sub}/{stem}" if sub else row["file_name"]
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(src / row["file_name"])
            if sub:
                ImageDraw.Draw(image).rectangle((4, 4, SIDE - 5, SIDE - 5), outline=(0, 0, 0, 255), width=3)
            image.save(dst / name, lossless=True)
            rows.append({**row, "file_name": name, "style": style})
    (dst / "splits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_vae_table_per_style_on_a_multi_style_dataset(tiny_pipe, fake_emoji, tmp_path):
    from sdxs.eval.report import vae_style_table

    # one style, tagged or not: the same sets, labels and numbers as before styles existed
    plain = ev.plan_subsets(ev.load_emoji_dataset(fake_emoji), 0, 3, 3, 2, None)
    tagged = ev.load_emoji_dataset(styled_copy(fake_emoji, tmp_path / "one", {"3d": None}))
    one = ev.plan_subsets(tagged, 0, 3, 3, 2, None)
    assert list(plain.vae_sets) == list(one.vae_sets) == ["validation", "training"] and one.vae_styles == {}
    for label in plain.vae_sets:
        assert [it.path.name for it in plain.vae_sets[label]] == [it.path.name for it in one.vae_sets[label]]
    a = ev.evaluate_vae(tiny_pipe, plain.vae_sets["training"], "training", 2)
    b = ev.evaluate_vae(tiny_pipe, one.vae_sets["training"], "training", 2, style="3d")
    assert a.rows == b.rows and a.psnr_wins == b.psnr_wins and (a.style, b.style) == ("", "3d")

    # two styles: each set within one style, the training sets drawn per style with the same seed
    items = ev.load_emoji_dataset(styled_copy(fake_emoji, tmp_path / "two", {"3d": None, "flat": "flat"}))
    assert ev.styles_of(items) == ["3d", "flat"] and len(items) == 24
    plan = ev.plan_subsets(items, 0, 3, 3, 2, None)
    assert list(plan.vae_sets) == ["3d validation", "flat validation", "3d training", "flat training"]
    for label, subset in plan.vae_sets.items():
        assert {it.style for it in subset} == {plan.vae_styles[label]} == {label.split()[0]}
    assert [len(s) for s in plan.vae_sets.values()] == [4, 4, 3, 3]
    names = {label: [it.path.name for it in s] for label, s in plan.vae_sets.items()}
    assert names["3d training"] == names["flat training"]  # same emoji in each style: the comparison is paired

    # the style filter: all items in, one style's numbers out (the same as that style's items alone)
    train = [it for it in items if it.split == "train"]
    flat = ev.evaluate_vae(tiny_pipe, train, "flat training", 4, style="flat", keep=6)
    alone = ev.evaluate_vae(tiny_pipe, [it for it in train if it.style == "flat"], "flat training", 4)
    assert flat.count == 8 and flat.rows == alone.rows and flat.style == "flat" and alone.samples == {}
    assert [len(v) for v in flat.samples.values()] == [6, 6, 6] and flat.samples["VAE"][5].shape == (SIDE, SIDE, 3)
    assert all(r["EdgeEnergy"] > 0 for r in flat.rows.values())
    with pytest.raises(ValueError, match="no images"):
        ev.evaluate_vae(tiny_pipe, train, "x", 4, style="noto")

    table = vae_style_table([a, flat])
    assert table[2].startswith("| set | n | PSNR VAE | PSNR bicubic |") and len(table) == 4 + 2 + 1
    assert table[5].startswith("| flat training | 8 | ") and table[5].count("|") == 8


def es_kinds(result) -> set[str]:
    return {k for s in result.strict.scores for k in s.kinds}


def test_grid_labels_and_interleave():
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    grid = make_grid(images, ["a", "a long caption " * 5, ""], columns=2, cell=64)
    assert grid.width == 128 and grid.height > 2 * 64
    assert _interleave([[1, 2, 3], [10], [20, 21]], 5) == [1, 10, 20, 2, 21]


def test_cli_eval_help_and_user_errors(tmp_path, capfd):
    assert cli.main(["eval", "--help"]) == 0
    out = capfd.readouterr().out
    for flag in ("--model", "--data", "--out", "--grid", "--steps", "--guidance", "--limit", "--device", "--seed"):
        assert flag in out
    assert cli.main(["eval", "--data", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdxs eval: error:") and "splits.jsonl" in err[0]


def test_log_progress_writes_plain_lines_for_logs():
    import io

    out = io.StringIO()
    bar = ev.LogProgress(10, "eval", "img", every=0.0, file=out)
    bar.set_postfix_str("gallery")
    bar.update(4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert lines[0].startswith("eval: 4/10 img (40%) gallery")


def test_split_by_kind_separates_skin_tones_flags_and_the_rest():
    items = [
        ev.EmojiItem(i, None, "train", "", "", caption)
        for i, caption in enumerate(
            ["waving hand, light skin tone, 3d render", "flag: France, 3d render", "red apple, 3d render", "cat"]
        )
    ]
    result = ev.RetrievalResult("training captions (random 4 of 9)", np.array([0, 3, 9, 0]), 100)
    parts = {r.label: r for r in ev.split_by_kind(result, items)}
    assert list(parts) == [
        "training captions: people with skin tones",
        "training captions: flags",
        "training captions: other",
    ]
    assert [parts[k].count for k in parts] == [1, 1, 2]
    assert parts["training captions: flags"].top(1) == 0 and parts["training captions: flags"].top(5) == 100
    assert parts["training captions: other"].top(1) == 50 and parts["training captions: other"].gallery_size == 100
