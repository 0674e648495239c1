"""Data preparation and the shard loader on generated images with the tiny model (CPU, no network)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

from sdxs.data.buckets import make_buckets, nearest_bucket, resize_and_crop
from sdxs.data.folder import scan_folder
from sdxs.data.loader import LatentShardLoader, pad_text
from sdxs.data.prepare import assign_bucket, merge, prepare
from sdxs.pipeline import encode_text

BUCKET_ARGS = dict(min_side=32, max_side=128, max_area=64 * 64)  # tiny model: step 16


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _write(folder: Path, name: str, image: PIL.Image.Image | bytes, caption: str | None = "a test image", **save):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def make_dataset(folder: Path) -> Path:
    """Good images of several sizes and modes, plus every kind of broken input."""
    for i, (w, h) in enumerate([(64, 64), (70, 66), (128, 64), (120, 60), (64, 128), (48, 80)]):
        _write(folder, f"good/{i}.png", _noise(w, h, i), f"red apple number {i}\nfruit {i}, 3d render")
    rgba = _noise(64, 64, 10, "RGBA")
    rgba.putalpha(0)  # fully transparent: must come out as the white background
    _write(folder, "modes/rgba.png", rgba, "transparent")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 128x64 (landscape), shown 64x128 (portrait)
    _write(folder, "modes/rotated.jpg", _noise(128, 64, 11), "rotated", exif=exif.tobytes())
    _write(folder, "modes/grey.png", _noise(64, 64, 12, "L"), "grey")
    sixteen = PIL.Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    _write(folder, "modes/16bit.png", sixteen, "sixteen bit")
    _write(folder, "modes/cmyk.jpg", _noise(64, 64, 13, "CMYK"), "cmyk")
    png = (folder / "good/0.png").read_bytes()
    _write(folder, "bad/corrupt.png", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    _write(folder, "bad/truncated.png", png[: len(png) // 2])
    _write(folder, "bad/zero.jpg", b"")
    _write(folder, "bad/tiny.png", _noise(8, 8, 14), "too small")
    _write(folder, "bad/notes.md", b"# not an image", caption=None)
    _write(folder, "bad/nocaption.png", _noise(64, 64, 15), caption=None)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cache(dataset, tiny_pipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    prepare(dataset, out, pipe=tiny_pipe, batch_size=4, shard_size=2, progress=False, **BUCKET_ARGS)
    return out


def _shard_tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return tensors, json.loads(f.metadata()["sdxs"])


# ------------------------------------------------------------------------------------------------------------
# Folder scan, buckets
# ------------------------------------------------------------------------------------------------------------


def test_scan_folder_reads_sidecars_and_metadata(tmp_path):
    _write(tmp_path, "a.png", _noise(8, 8, 0), "first\n\nsecond\n")
    _write(tmp_path, "sub/b.png", _noise(8, 8, 1), caption=None)
    _write(tmp_path, "sub/c.jpg", _noise(8, 8, 2), caption=None)
    (tmp_path / "sub/metadata.jsonl").write_text('{"file_name": "b.png", "text": ["one", "two"]}\n')
    (tmp_path / "metadata.csv").write_text('file_name,text\nsub/c.jpg,"from csv"\n')
    (tmp_path / "orphan.txt").write_text("no image")
    items, skipped = scan_folder(tmp_path)
    assert {it.rel: it.captions for it in items} == {
        "a.png": ["first", "second"],
        "sub/b.png": ["one", "two"],
        "sub/c.jpg": ["from csv"],
    }
    assert [(p.name, "without an image" in r) for p, r in skipped] == [("orphan.txt", True)]


@pytest.mark.parametrize(
    "size, expected",
    [
        ((64, 64), (64, 64)),
        ((200, 100), (80, 48)),
        ((100, 200), (48, 80)),
        ((1000, 100), (128, 32)),
        ((33, 31), (64, 64)),
    ],
)
def test_nearest_bucket(size, expected):
    buckets = make_buckets(32, 128, 16, 64 * 64)
    assert nearest_bucket(*size, buckets) == expected


def test_too_small_unless_upscaling_allowed():
    buckets = make_buckets(32, 128, 16, 64 * 64)
    with pytest.raises(ValueError, match="too small"):
        assign_bucket((8, 8), buckets, ratio=2, max_upscale=1.25)
    assert assign_bucket((8, 8), buckets, ratio=2, max_upscale=None) == (64, 64)
    # a 30x30 image fills the 32x32 encoder input of the 64x64 bucket with a tolerated 1.07x upscale
    assert assign_bucket((30, 30), buckets, ratio=2, max_upscale=1.25) == (64, 64)


def test_resize_and_crop_is_exact():
    out = resize_and_crop(_noise(101, 37, 0), (40, 24))
    assert out.size == (40, 24)


# ------------------------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_with_reasons(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {
        "bad/corrupt.png",
        "bad/truncated.png",
        "bad/zero.jpg",
        "bad/tiny.png",
        "bad/notes.md",
        "bad/nocaption.png",
    }
    assert "not a readable image" in reasons["bad/corrupt.png"]
    assert "truncated" in reasons["bad/truncated.png"]
    assert "0 bytes" in reasons["bad/zero.jpg"]
    assert "too small" in reasons["bad/tiny.png"]
    assert "not an image" in reasons["bad/notes.md"]
    assert "no caption" in reasons["bad/nocaption.png"]
    assert manifest["count_in"] == 17 == manifest["count_written"] + manifest["count_skipped"]
    assert manifest["count_written"] == 11 == sum(manifest["counts"].values())


def test_modes_and_exif_handled(cache, dataset):
    files = {}
    for shard in json.loads((cache / "manifest.json").read_text())["shards"]:
        tensors, meta = _shard_tensors(cache / shard["file"])
        assert tensors["latents_mean"].dtype == torch.float16
        assert torch.isfinite(tensors["latents_mean"]).all() and torch.isfinite(tensors["embeds"]).all()
        files.update({f: tuple(meta["bucket"]) for f in meta["files"]})
    for name in ("rgba.png", "grey.png", "16bit.png", "cmyk.jpg"):
        assert files[f"modes/{name}"] == (64, 64)
    assert files["modes/rotated.jpg"] == (48, 80)  # EXIF turns the stored landscape into a portrait
    assert files["good/2.png"] == (80, 48)


def test_shards_match_the_pipeline_encoders(cache, dataset, tiny_pipe):
    """Embeddings equal encode_text of the same caption; latents equal the pipeline's VAE encoding (mean)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["bucket"] == [80, 48])
    tensors, meta = _shard_tensors(cache / shard["file"])
    captions = meta["captions"][0]
    with torch.no_grad():
        ref_embeds, ref_mask = encode_text(
            tiny_pipe.text_encoder, tiny_pipe.tokenizer, captions, tiny_pipe.config.text_recipe, "cpu"
        )
    k = int(tensors["caption_offsets"][1])
    embeds, mask = pad_text(tensors["embeds"][:k].float(), tensors["mask"][:k].long(), ref_embeds.shape[1])
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(embeds, ref_embeds.half().float())

    from sdxs.pipeline import load_rgb_image

    image = resize_and_crop(load_rgb_image(dataset / meta["files"][0]), (40, 24))  # encoder sees bucket / 2
    with torch.no_grad():
        ref = tiny_pipe._vae_encode(tiny_pipe._image_to_tensor(image))
    torch.testing.assert_close(tensors["latents_mean"][:1].float(), ref.half().float())


def test_resumed_prepare_equals_uninterrupted(cache, dataset, tiny_pipe, tmp_path):
    out = tmp_path / "resumed"
    prepare(
        dataset, out, pipe=tiny_pipe, batch_size=4, shard_size=2, progress=False, stop_after_shards=2, **BUCKET_ARGS
    )
    assert not (out / "manifest.json").exists() and len(list((out / "shards").iterdir())) == 2
    (out / "shards" / ".64x64-000-00001.safetensors.123.tmp").write_bytes(b"half")  # a killed save
    prepare(dataset, out, pipe=tiny_pipe, batch_size=4, shard_size=2, progress=False, **BUCKET_ARGS)
    full = sorted(p.name for p in (cache / "shards").iterdir())
    assert sorted(p.name for p in (out / "shards").iterdir()) == full
    for name in full:
        a, meta_a = _shard_tensors(cache / "shards" / name)
        b, meta_b = _shard_tensors(out / "shards" / name)
        assert meta_a == meta_b and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    strip = ("created",)
    m_a, m_b = (json.loads((d / "manifest.json").read_text()) for d in (cache, out))
    assert {k: v for k, v in m_a.items() if k not in strip} == {k: v for k, v in m_b.items() if k not in strip}


def test_split_and_merge_equal_single_run(cache, dataset, tiny_pipe, tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}")
        prepare(
            dataset, parts[i], pipe=tiny_pipe, shard_size=2, num_shards=2, shard_index=i, progress=False, **BUCKET_ARGS
        )
        assert (parts[i] / f"manifest.{i:03d}-of-002.json").is_file()
    with pytest.raises(FileNotFoundError, match="merge"):
        LatentShardLoader(parts[0], batch_size=1)
    merged = merge(tmp_path / "merged", parts)
    single = json.loads((cache / "manifest.json").read_text())
    for key in ("count_in", "count_written", "count_skipped", "counts", "skipped"):
        assert merged[key] == single[key]
    loader = LatentShardLoader(tmp_path / "merged", batch_size=1, shuffle=False)
    assert sorted(k for b in loader for k in b["keys"]) == sorted(
        k for b in LatentShardLoader(cache, batch_size=1, shuffle=False) for k in b["keys"]
    )


def test_prepare_from_model_folder(tiny_hub_dir, tiny_pipe, tmp_path):
    src = tmp_path / "src"
    _write(src, "a.png", _noise(64, 64, 0), "a red apple")
    manifest = prepare(src, tmp_path / "out", model=tiny_hub_dir, device="cpu", progress=False)
    assert manifest["count_written"] == 1 and manifest["options"]["buckets"] == [[48, 64], [64, 64], [64, 48]]
    LatentShardLoader(tmp_path / "out", batch_size=1).check_fingerprint(tiny_pipe)


# ------------------------------------------------------------------------------------------------------------
# Loader
# ------------------------------------------------------------------------------------------------------------


def _run(loader, epochs=1):
    return [(b["bucket"], b["keys"], b["captions"], b["latents"]) for _ in range(epochs) for b in loader]


def test_loader_batches_hold_one_bucket_and_repeat(cache):
    loader = LatentShardLoader(cache, batch_size=2, seed=3)
    batches = _run(loader, epochs=2)
    assert len(batches) == 2 * len(loader)
    for bucket, _, _, latents in batches:
        assert latents.shape == (2, 4, bucket[1] // 16, bucket[0] // 16)
    batch = next(iter(LatentShardLoader(cache, batch_size=2, seed=3)))
    assert batch["embeds"].shape == (2, 251, 32) and batch["embeds"].dtype == torch.float32
    assert batch["mask"].shape == (2, 251) and batch["mask"].dtype == torch.long
    again = _run(LatentShardLoader(cache, batch_size=2, seed=3), epochs=2)
    assert [b[:3] for b in again] == [b[:3] for b in batches]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(again, batches, strict=True))
    other = _run(LatentShardLoader(cache, batch_size=2, seed=4))
    assert [b[:3] for b in other] != [b[:3] for b in batches[: len(other)]]
    # every written image appears in an epoch
    assert len({k for b in batches[: len(loader)] for k in b[1]}) == 11


def test_loader_resumes_and_splits_ranks(cache):
    full = _run(LatentShardLoader(cache, batch_size=1, seed=0), epochs=2)
    loader = LatentShardLoader(cache, batch_size=1, seed=0)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    resumed = LatentShardLoader(cache, batch_size=1, seed=0)
    resumed.load_state_dict(state)
    rest = _run(resumed) + _run(resumed)
    assert [b[:3] for b in rest] == [b[:3] for b in full[3:]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(rest, full[3:], strict=True))

    ranks = [LatentShardLoader(cache, batch_size=2, seed=0, rank=r, world_size=2, drop_last=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    for b0, b1 in zip(ranks[0], ranks[1], strict=True):
        assert b0["bucket"] == b1["bucket"] and not set(b0["keys"]) & set(b1["keys"])


def test_loader_trims_and_exposes_empty_prompt(cache, tiny_pipe):
    batch = next(iter(LatentShardLoader(cache, batch_size=2, pad_to_max_length=False, sample_posterior=False)))
    assert batch["embeds"].shape[1] == int(batch["mask"].sum(1).max()) < 251
    embeds, mask = LatentShardLoader(cache, batch_size=1).empty_prompt()
    with torch.no_grad():
        ref, ref_mask = encode_text(tiny_pipe.text_encoder, tiny_pipe.tokenizer, [""], tiny_pipe.config.text_recipe)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(embeds, ref.half().float())


def test_cache_with_another_fingerprint_is_refused(cache, dataset, tiny_pipe, tmp_path):
    loader = LatentShardLoader(cache, batch_size=1)
    loader.check_fingerprint(tiny_pipe)
    with pytest.raises(ValueError, match="text_recipe"):
        loader.check_fingerprint(text_recipe={**tiny_pipe.config.text_recipe, "hidden_layer": -1})
    vae = copy.deepcopy(tiny_pipe.vae)
    with torch.no_grad():
        next(vae.encoder.parameters()).add_(0.1)
    with pytest.raises(ValueError, match="different vae"):
        loader.check_fingerprint(vae=vae)
    # the decoder does not make latents: changing it keeps the cache valid
    with torch.no_grad():
        next(vae.decoder.parameters()).add_(0.1)
        next(vae.encoder.parameters()).sub_(0.1)
    loader.check_fingerprint(vae=vae)
    # another tokenizer normalisation gives other ids, hence other caption embeddings
    from sdxs.tokenizer import normalize_tokenizer

    tok = copy.deepcopy(tiny_pipe.tokenizer)
    normalize_tokenizer(tok, ["nfkc"])
    with pytest.raises(ValueError, match="different tokenizer"):
        loader.check_fingerprint(tokenizer=tok)
    # a cache made before tokenizers were fingerprinted is not refused for lacking one
    del loader.manifest["fingerprint"]["tokenizer"]
    loader.check_fingerprint(tiny_pipe)

    # prepare refuses to resume into a cache made with another model
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    other = copy.copy(tiny_pipe)
    other.register_to_config(text_recipe={**tiny_pipe.config.text_recipe, "hidden_layer": -1})
    with pytest.raises(ValueError, match="text_recipe"):
        prepare(dataset, out, pipe=other, shard_size=2, progress=False, **BUCKET_ARGS)


def test_loader_balances_groups_of_images(cache):
    """`balance_pattern`: images whose names match once the pattern is deleted share one image's weight."""
    from collections import Counter

    def draws(**kw):
        loader = LatentShardLoader(cache, batch_size=1, seed=0, **kw)
        return loader, Counter(k for _ in range(60) for b in loader for k in b["keys"])

    plain_loader, plain = draws()
    # "good/0.png" ... "good/5.png": deleting the digit makes them one group; the others stay singletons
    loader, balanced = draws(balance_pattern=r"^\d$", balance_power=1.0)
    assert len(loader) == len(plain_loader) and sum(balanced.values()) == sum(plain.values())
    good = lambda c: sum(v for k, v in c.items() if k.startswith("good/"))  # noqa: E731
    assert good(balanced) < 0.85 * good(plain)  # within each bucket, so less than 6x
    assert draws(balance_pattern=r"^\d$")[1] == balanced  # deterministic for a seed
    assert draws(balance_pattern=r"^\d$", balance_power=0.0)[1] != balanced
    # a checkpoint of a balanced run does not resume into an unbalanced loader, and bad settings are named
    with pytest.raises(ValueError, match="balance"):
        plain_loader.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="balance_pattern"):
        LatentShardLoader(cache, batch_size=1, balance_pattern="(")
    with pytest.raises(ValueError, match="balance_power"):
        LatentShardLoader(cache, batch_size=1, balance_pattern="x", balance_power=2.0)


def test_loader_sample_weights_draw_listed_images_more_often(cache, tmp_path):
    """`sample_weights`: a file_name,weight table multiplies into the draws; 0 leaves an image out; bad tables are named."""
    from collections import Counter

    def draws(**kw):
        loader = LatentShardLoader(cache, batch_size=1, seed=0, **kw)
        return loader, Counter(k for _ in range(60) for b in loader for k in b["keys"])

    plain_loader, plain = draws()
    keys = sorted(plain)
    heavy, dropped = keys[0], keys[1]
    table = tmp_path / "weights.csv"
    table.write_text(f"file_name,weight\n{heavy},3\n{dropped},0\n")
    loader, weighted = draws(sample_weights=table)
    assert len(loader) == len(plain_loader) and sum(weighted.values()) == sum(plain.values())
    assert weighted[dropped] == 0 and weighted[heavy] > 1.5 * plain[heavy]
    jsonl = tmp_path / "weights.jsonl"
    jsonl.write_text(f'{{"file_name": "{heavy}", "weight": 3}}\n{{"file_name": "{dropped}", "weight": 0}}\n')
    assert draws(sample_weights=jsonl)[1] == weighted == draws(sample_weights={heavy: 3, dropped: 0})[1]
    # with a balance pattern the two multiply; a resume with other weights is refused
    both, _ = draws(sample_weights=table, balance_pattern=r"^\d$")
    with pytest.raises(ValueError, match="balance"):
        plain_loader.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="replan_data"):
        both.load_state_dict(loader.state_dict())
    # ...or, with replan, resumed at the start of the next epoch, drawn the new way from its first batch
    mid = LatentShardLoader(cache, batch_size=1, seed=0)
    next(iter(mid))
    state = mid.state_dict()
    both.load_state_dict(state, replan=True)
    assert (both.epoch, both.state_dict()["step"]) == (state["epoch"] + 1, 0)
    fresh = LatentShardLoader(cache, batch_size=1, seed=0, sample_weights=table, balance_pattern=r"^\d$")
    fresh.epoch = state["epoch"] + 1
    assert [b["keys"] for b in both] == [b["keys"] for b in fresh]
    # bad tables: named with the row and the fix
    with pytest.raises(FileNotFoundError, match="sample_weights"):
        LatentShardLoader(cache, batch_size=1, sample_weights=tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"file_name,weight\n{heavy},-1\n")
    with pytest.raises(ValueError, match="row 1.*>= 0"):
        LatentShardLoader(cache, batch_size=1, sample_weights=bad)
    bad.write_text("file_name,weight\nnot/in/the/cache.png,2\n")
    with pytest.raises(ValueError, match="names none of the cache"):
        LatentShardLoader(cache, batch_size=1, sample_weights=bad)
    with pytest.raises(ValueError, match="every image of bucket"):  # a bucket cannot be weighted away
        LatentShardLoader(cache, batch_size=1, sample_weights=dict.fromkeys(keys, 0.0))


# ------------------------------------------------------------------------------------------------------------
# A cache that another model or other options made is never touched
# ------------------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prepare_refuses_a_foreign_cache_and_deletes_nothing(cache, dataset, tiny_pipe, tmp_path):
    out = tmp_path / "theirs"
    shutil.copytree(cache, out)
    (out / "notes.txt").write_text("someone's notes")
    before = _snapshot(out)
    # other buckets (the shard names differ, so a fingerprint check per shard never runs)
    other_buckets = dict(min_side=64, max_side=64, max_area=64 * 64)
    with pytest.raises(ValueError, match="did not make.*buckets.*--overwrite.*another output folder"):
        prepare(dataset, out, pipe=tiny_pipe, shard_size=2, progress=False, **other_buckets)
    assert _snapshot(out) == before
    # another model: the manifest's fingerprint differs
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["vae"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"different vae\. Nothing was changed.*--overwrite"):
        prepare(dataset, out, pipe=tiny_pipe, batch_size=4, shard_size=2, progress=False, **BUCKET_ARGS)
    assert _snapshot(out) == before
    # --overwrite replaces the cache's own files and leaves everything else
    manifest = prepare(dataset, out, pipe=tiny_pipe, shard_size=2, progress=False, overwrite=True, **other_buckets)
    assert manifest["options"]["buckets"] == [[64, 64]]
    assert (out / "notes.txt").read_text() == "someone's notes"
    assert {p.name.split("-")[0] for p in (out / "shards").iterdir()} == {"64x64"}


def test_prepare_cli_refuses_a_foreign_cache(cache, tiny_hub_dir, dataset, tmp_path, capsys):
    from sdxs.cli import main

    out = tmp_path / "theirs"
    shutil.copytree(cache, out)
    before = _snapshot(out)
    code = main(["prepare", str(dataset), str(out), "--model", str(tiny_hub_dir), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before
