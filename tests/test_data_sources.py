"""`sdxs prepare` from WebDataset tar shards and local Hugging Face datasets: the same images and captions as a
folder make the same cache (tiny model, CPU; the tars and datasets are built here from the folder of
test_data_prepare, nothing downloaded)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from sdxs.data.prepare import prepare
from sdxs.data.sources import detect_format, scan_source

pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from test_data_prepare import BUCKET_ARGS, _noise, _shard_tensors, _write, make_dataset  # noqa: E402

ARGS = dict(batch_size=4, shard_size=2, progress=False, **BUCKET_ARGS)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def folder_to_tars(folder: Path, out: Path) -> Path:
    """One tar per top-level subfolder (`good/0.png` -> `good.tar` member `0.png`), members in sorted order."""
    out.mkdir(parents=True)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        with tarfile.open(out / f"{sub.name}.tar", "w") as tar:
            for f in _files(sub):
                tar.add(f, arcname=f.relative_to(sub).as_posix())
    return out


def folder_rows(folder: Path) -> tuple[list[str], dict]:
    """The folder's images as dataset columns, in sorted path order: (their paths, {"image": ..., "text": ...})."""
    rels, images, texts = [], [], []
    for f in _files(folder):
        if f.suffix in (".png", ".jpg"):
            caption = f.with_suffix(".txt")
            rels.append(f.relative_to(folder).as_posix())
            images.append({"bytes": f.read_bytes(), "path": f.name})
            texts.append(caption.read_text() if caption.is_file() else None)
    return rels, {"image": images, "text": texts}


def make_hf_dataset(folder: Path, out: Path, image_column="image", text_column="text") -> list[str]:
    rels, columns = folder_rows(folder)
    features = datasets.Features({image_column: datasets.Image(), text_column: datasets.Value("string")})
    data = {image_column: columns["image"], text_column: columns["text"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(out))
    return rels


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def folder_cache(folder, tiny_pipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    prepare(folder, out, pipe=tiny_pipe, **ARGS)
    return out


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_webdataset_prepares_like_the_folder(folder, folder_cache, tiny_pipe, tmp_path):
    tars = folder_to_tars(folder, tmp_path / "tars")
    assert detect_format(tars) == "webdataset" and detect_format(folder) == "folder"
    out = tmp_path / "cache"
    prepare(tars, out, pipe=tiny_pipe, **ARGS)
    a, b = _manifest(folder_cache), _manifest(out)
    for key in ("count_in", "count_written", "count_skipped", "counts", "shards", "options", "fingerprint"):
        assert a[key] == b[key], key
    assert [s["path"] for s in a["skipped"]] == [s["path"] for s in b["skipped"]]
    reasons = {s["path"]: s["reason"] for s in b["skipped"]}
    assert "no caption" in reasons["bad/nocaption.png"] and "0 bytes" in reasons["bad/zero.jpg"]
    assert "not an image" in reasons["bad/notes.md"] and "truncated" in reasons["bad/truncated.png"]
    for name in [s["file"] for s in a["shards"]] + ["empty_prompt.safetensors"]:
        assert (folder_cache / name).read_bytes() == (out / name).read_bytes(), name  # byte-identical shards


def test_webdataset_brace_pattern_resume_and_split(folder, folder_cache, tiny_pipe, tmp_path):
    tars = folder_to_tars(folder, tmp_path / "tars")
    pattern = str(tars / "{bad,good,modes}.tar")
    _, items, skipped = scan_source(pattern)
    _, ref_items, ref_skipped = scan_source(tars)
    assert [(it.rel, it.captions) for it in items] == [(it.rel, it.captions) for it in ref_items]
    assert skipped == ref_skipped
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_source(str(tars / "{good,other}.tar"))
    out = tmp_path / "cache"
    prepare(pattern, out, pipe=tiny_pipe, stop_after_shards=2, **ARGS)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert len(kept) == 2 and not (out / "manifest.json").exists()
    prepare(pattern, out, pipe=tiny_pipe, **ARGS)
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in kept} == kept  # finished shards are kept
    assert _manifest(out)["counts"] == _manifest(folder_cache)["counts"]


def test_hf_dataset_prepares_like_the_folder(folder, folder_cache, tiny_pipe, tmp_path):
    rels = make_hf_dataset(folder, tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    out = tmp_path / "cache"
    manifest = prepare(tmp_path / "hf", out, pipe=tiny_pipe, **ARGS)
    a = _manifest(folder_cache)
    # a row's key is its number; rows are in the folder's path order, so the shards hold the same images
    key = {f"{i:02d}": rel for i, rel in enumerate(rels)}
    for k in ("count_written", "counts", "shards", "fingerprint"):
        assert a[k] == manifest[k], k
    assert manifest["options"] == {**a["options"], "image_column": "image"}
    folder_only = {"bad/notes.md"}  # not an image: no row holds it
    assert [s["path"] for s in a["skipped"] if s["path"] not in folder_only] == [
        key[s["path"]] for s in manifest["skipped"]
    ]
    for shard in a["shards"]:
        (ta, ma), (tb, mb) = _shard_tensors(folder_cache / shard["file"]), _shard_tensors(out / shard["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # byte-identical tensors
        assert ma["files"] == [key[f] for f in mb["files"]] and ma["captions"] == mb["captions"]


def test_hf_parquet_and_arrow_files_with_named_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # parquet -> Arrow cache
    src = tmp_path / "images"
    _write(src, "a.png", _noise(64, 64, 0), "a red apple\nan apple")
    _write(src, "b.png", _noise(64, 48, 1), "a green pear")
    make_hf_dataset(src, tmp_path / "saved", image_column="jpg", text_column="caption")
    ds = datasets.load_from_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    ref = scan_source(tmp_path / "saved", caption_column="caption", image_column="jpg")
    for src in (tmp_path / "pq", arrow):
        fmt, items, skipped = scan_source(src, caption_column="caption", image_column="jpg")
        assert fmt == "hf" and skipped == []
        assert [(it.rel, it.captions, it.blob.read()) for it in items] == [
            (it.rel, it.captions, it.blob.read()) for it in ref[1]
        ]
    assert ref[1][0].captions == ["a red apple", "an apple"]
    with pytest.raises(ValueError, match="--image-column NAME"):
        scan_source(tmp_path / "saved", caption_column="caption")
    with pytest.raises(ValueError, match="source_format"):
        scan_source(tmp_path / "saved", source_format="tfrecord")
