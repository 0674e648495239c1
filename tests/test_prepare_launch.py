"""`accelerate launch --num_processes 2 -m sdxs prepare` on CPU (gloo-style torchrun ranks, no GPU): each rank makes
its part, the last one merges; a rank killed with SIGKILL and the same command again give the cache of a
one-process run. Tiny model, nothing downloaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import slow_prepare_script
from safetensors import safe_open

from sdxs.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]

# atomic_save slowed by 0.3 s, so that rank 1 is still working when the test kills it after its first shard
SLOW_SHARDS = slow_prepare_script(0.3)


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # `--multi_gpu` with no visible GPU: torchrun ranks on the CPU
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def _launch(*args: str) -> list[str]:
    # accelerate's `--cpu` means one process; `--multi_gpu` with no visible GPU launches 2 torchrun ranks (MULTI_CPU)
    return [
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
        *args,
    ]


def _per_image(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{image key: its tensors} of a cache prepared with one image per shard (shard names differ by worker)."""
    out = {}
    for shard in json.loads((cache / "manifest.json").read_text())["shards"]:
        with safe_open(str(cache / shard["file"]), framework="pt") as f:
            (key,) = json.loads(f.metadata()["sdxs"])["files"]
            out[key] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return out


def _rank1(proc) -> int | None:
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == "1" and "prepare" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow  # ~40 s on 2 shared cores: two launches of two ranks each
def test_launch_two_ranks_kill_one_and_rerun_equals_one_process(tmp_path, tiny_hub_dir, tiny_pipe):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    from test_faults import make_images, one_thread

    images = make_images(tmp_path / "images")  # 12 images, 3 buckets
    out, single = tmp_path / "cache", tmp_path / "single"
    with one_thread():  # the ranks compute with one thread each
        prepare(images, single, model=tiny_hub_dir, device="cpu", shard_size=1, num_workers=1, progress=False)
    args = [str(images), str(out), "--model", str(tiny_hub_dir), "--shard-size", "1", "--num-workers", "1"]
    args += ["--no-progress"]

    # 1. both ranks start; rank 1 is killed with SIGKILL once its first shard is saved
    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_SHARDS)
    proc = subprocess.Popen(
        _launch(str(script), "prepare", *args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline, killed = time.monotonic() + 120, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any((out / "shards").glob("*-001-*.safetensors")) and (pid := _rank1(proc)) is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        log = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, f"rank 1 was not killed while it worked: {log[-3000:]}"
    assert proc.returncode != 0 and not (out / "manifest.json").exists()
    assert not (out / "manifest.001-of-002.json").exists()

    # 2. the same command again: both parts resume, the last rank merges
    done = subprocess.run(
        _launch("-m", "sdxs", "prepare", *args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "merged all 2 parts" in done.stdout
    merged, one = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    for key in ("count_in", "count_written", "count_skipped", "counts", "skipped", "options", "fingerprint"):
        assert merged[key] == one[key], key
    a, b = _per_image(out), _per_image(single)
    assert sorted(a) == sorted(b) and len(a) == 12
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    assert not [p for p in out.rglob(".*.tmp")], "temp files of the killed rank left behind"


def test_launched_rank_sets_the_split(monkeypatch, tmp_path, capsys):
    from sdxs.cli import main
    from sdxs.data.launch import launched_rank

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launched_rank() == (1, 2, 0)
    assert main(["prepare", str(tmp_path), str(tmp_path / "out"), "--model", ".", "--num-shards", "4"]) == 2
    assert "taken from the launcher (rank 1 of 2)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_rank() is None
