"""The README's training sequence runs as written (issue 18), in a smoke mode: every `sdxs ...` line of its training
block, in order, through the `sdxs` CLI, in a fresh folder, on emoji data that `sdxs data emoji` makes from fake npm
tarballs in its cache (npm is never called, nothing is downloaded). The smoke mode adds only overrides to the train
line (2 steps, no samples) and lets `sdxs data emoji` accept a small package; every other argument is the README's."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# the smoke mode: only these are added to the README's `sdxs train unet` line
SMOKE_TRAIN = [
    "run.max_steps=2",
    "run.checkpoint_every=0",
    "run.log_every=1",
    "run.progress_bar=false",
    "data.batch_size=2",
    "sample.prompts=[]",
]
# (codepoints, name, Unicode group, colour): enough emoji that the split leaves several in train/
EMOJI = [
    ("1f600", "grinning face", "Smileys & Emotion", (250, 200, 0)),
    ("1f603", "grinning face with big eyes", "Smileys & Emotion", (240, 190, 10)),
    ("1f60d", "smiling face with heart-eyes", "Smileys & Emotion", (250, 170, 30)),
    ("2764-fe0f", "red heart", "Smileys & Emotion", (220, 20, 40)),
    ("1f34e", "red apple", "Food & Drink", (200, 30, 30)),
    ("1f34c", "banana", "Food & Drink", (250, 230, 80)),
    ("1f436", "dog face", "Animals & Nature", (160, 110, 60)),
    ("1f431", "cat face", "Animals & Nature", (230, 160, 70)),
    ("1f697", "automobile", "Travel & Places", (210, 40, 50)),
    ("1f44d", "thumbs up", "People & Body", (250, 200, 60)),
]


def readme_training_commands() -> list[list[str]]:
    """The `sdxs` lines of the README's bash block that holds `sdxs train unet`, comments removed."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "sdxs train unet" in b)
    lines = [shlex.split(ln, comments=True) for ln in block.splitlines()]
    return [ln for ln in lines if ln]


def fake_npm_cache(cache: Path) -> None:
    """The three npm packages `sdxs data emoji` reads, as `npm pack` would have left them in its cache."""
    from test_data_emoji import _name_and_keyword_tarballs, _tarball

    from sdxs.data.emoji import IMAGES_PACKAGE

    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for stem, _, _, colour in EMOJI:
        pixels = np.zeros((128, 128, 4), np.uint8)
        pixels[24:104, 24:104, :3] = np.clip(np.array(colour) + rng.integers(-20, 20, (80, 80, 3)), 0, 255)
        pixels[24:104, 24:104, 3] = 255  # an object on a transparent background, as the renders are
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buf, "WEBP", lossless=True)
        images[f"package/assets/{stem}.webp"] = buf.getvalue()
    _tarball(cache, IMAGES_PACKAGE, images)
    names = {
        "".join(chr(int(c, 16)) for c in stem.split("-")): {"name": name, "group": group}
        for stem, name, group, _ in EMOJI
    }
    _name_and_keyword_tarballs(cache, names)


def test_readme_training_sequence_runs_as_written(tmp_path, monkeypatch, capsys):
    import torch
    from diffusers import DiffusionPipeline

    import sdxs.data.emoji as emoji
    from sdxs.cli import main
    from sdxs.train.config import read_recipe
    from sdxs.train.metrics import read_metrics

    commands = readme_training_commands()
    assert all(c[0] == "sdxs" for c in commands) and ["sdxs", "train", "unet"] in [c[:3] for c in commands]
    by = {c[1]: c for c in commands}

    # a fresh working folder holding what a checkout has there (the recipes); everything else the commands make
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDXS_CACHE", str(tmp_path / "sdxs-cache"))  # where `sdxs data emoji` finds npm tarballs
    fake_npm_cache(tmp_path / "sdxs-cache" / "npm")
    monkeypatch.setattr(emoji, "make_emoji_dataset", partial(emoji.make_emoji_dataset, min_images=len(EMOJI)))
    real_which = shutil.which  # npm is never run: a missing tarball fails the test instead of downloading
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "npm" else real_which(name, *a, **k))

    for argv in commands:
        extra = SMOKE_TRAIN if argv[1:3] == ["train", "unet"] else []
        code = main([*argv[1:], *extra])
        out, err = capsys.readouterr()
        assert code == 0, f"`{shlex.join(argv + extra)}` failed ({code}): {err[-3000:]}"

    # what each step made, where the next one read it
    data_dir = Path(by["data"][3])
    assert (data_dir / "splits.jsonl").is_file() and any((data_dir / "train").glob("*.webp"))
    cache = Path(by["prepare"][3])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count_written"] == len(list((data_dir / "train").glob("*.webp"))) > 2
    config = by["train"]
    run_dir = Path(read_recipe(config[config.index("--config") + 1])["run"]["output_dir"])
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2]
    if "export" in by:  # the README's last step: a hub folder that plain diffusers loads and runs
        out_dir = Path(by["export"][3])
        pipe = DiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("red apple, 3d render", num_inference_steps=2, seed=0).images[0]
        assert min(image.size) >= 32 and np.asarray(image).std() > 0
