"""Fault injection (issue 18): `sdxs prepare` and `sdxs train unet` are killed with SIGKILL at several random points
(drawn from a seeded RNG: after the k-th shard / checkpoint appears, plus a random delay; one kill lands while a
checkpoint is being written), resumed each time, and the result is compared with an uninterrupted run: shards
byte-identical, weights bit-identical. Tiny models built in the tests, CPU, nothing downloaded.

The killed runs are subprocesses (one thread each); the uninterrupted runs and the final resumes run in-process with
one torch thread, so every run computes with the same kernels. `SDXS_FAULT_SEED=N` draws other kill points.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import slow_prepare_script

from sdxs.model_folder import checkpoint_dirs, find_checkpoint
from sdxs.train.common import read_weights
from sdxs.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SDXS_FAULT_SEED", "18"))


def _env():
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


@contextlib.contextmanager
def one_thread():
    """In-process runs compute with one thread, as the subprocesses do (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def signal_when(cmd, trigger, sig: int, delay: float, what: str, timeout: float = 600) -> tuple[int, str]:
    """Start `cmd`, wait until `trigger()` is true, sleep `delay` s, send `sig`, wait for the end: (exit code, stderr)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and not trigger():
                if time.monotonic() > deadline:
                    pytest.fail(f"{what}: the signal point was not reached in {timeout} s")
                time.sleep(0.002)
            time.sleep(delay)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return proc.returncode, err.read().decode(errors="replace")


def run_until_killed(cmd, trigger, delay: float, what: str, timeout: float = 600) -> None:
    """Start `cmd`, wait until `trigger()` is true, sleep `delay` s, SIGKILL it; fail if it ended by itself."""
    code, log = signal_when(cmd, trigger, signal.SIGKILL, delay, what, timeout)
    assert code == -signal.SIGKILL, f"{what}: the run ended (exit {code}) before it was killed: {log[-2000:]}"


# ------------------------------------------------------------------------------------------------------------
# sdxs prepare
# ------------------------------------------------------------------------------------------------------------

N_IMAGES = 12


def make_images(folder: Path) -> Path:
    """12 captioned noise images in three buckets (one shard each with --shard-size 1)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        w, h = [(64, 64), (128, 64), (64, 128)][i % 3]
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"test image {i}\nimage number {i}, 3d render")
    return folder


# `sdxs prepare` with every shard taking >= 0.1 s longer before it is saved. A tiny image encodes in a few ms, so
# the >= 5 shards left after a kill point took less than the test's 0-50 ms delay on a busy machine and the run
# ended by itself before the kill (a flake seen in CI); with 0.5 s left the kill lands inside the run.
SLOW_SHARDS = slow_prepare_script(0.1)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_prepare_killed_at_random_points_resumes_to_identical_shards(tmp_path, tiny_hub_dir):
    from sdxs.cli import main

    images = make_images(tmp_path / "images")
    args = [str(images), "--model", str(tiny_hub_dir), "--device", "cpu", "--no-progress", "--shard-size", "1"]

    # the uninterrupted run
    ref = tmp_path / "ref"
    with one_thread():
        assert main(["prepare", args[0], str(ref), *args[1:]]) == 0
    assert len(list((ref / "shards").iterdir())) == N_IMAGES

    # killed three times, after k shards exist (k drawn without replacement) plus a random delay of up to 50 ms:
    # while a shard is encoded or written
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", SLOW_SHARDS, "prepare", args[0], str(out), *args[1:]]
    rng = random.Random(SEED)
    points = sorted(rng.sample(range(1, N_IMAGES - 4), 3))
    kept: dict[str, int] = {}  # shard -> mtime_ns: a finished shard is never made again
    for k in points:
        delay = rng.uniform(0, 0.05)

        def enough(k=k):
            return (out / "shards").is_dir() and len(list((out / "shards").glob("*.safetensors"))) >= k

        run_until_killed(cmd, enough, delay, f"prepare killed after {k} shards + {delay * 1000:.0f} ms (seed {SEED})")
        assert not (out / "manifest.json").exists()
        kept |= {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert len(kept) < N_IMAGES
    # temp files as a kill in the middle of a save leaves them (the shard's, the empty prompt's, the manifest's)
    (out / "shards" / ".64x64-000-00011.safetensors.4242.tmp").write_bytes(b"half a shard")
    (out / ".empty_prompt.safetensors.4242.tmp").write_bytes(b"half")
    (out / ".manifest.json.4242.tmp").write_text('{"half')

    with one_thread():
        assert main(["prepare", args[0], str(out), *args[1:]]) == 0
    a, b = _files(ref), _files(out)
    assert sorted(b) == sorted(a), "files differ (temp files left behind, or shards missing)"
    for name in a:
        if name != "manifest.json":
            assert a[name].read_bytes() == b[name].read_bytes(), f"{name} differs after kills at {points}"
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(json.loads(a["manifest.json"].read_text())) == strip(json.loads(b["manifest.json"].read_text()))
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in kept} == kept, "a finished shard was made again"


def test_prepare_worker_leaves_other_workers_temp_files(tmp_path, tiny_pipe):
    """Workers of a --num-shards split write into one folder at the same time: a (re)started worker removes the
    temp files of its own killed saves, never a save that another worker is making right now."""
    from sdxs.data.prepare import prepare

    images = make_images(tmp_path / "images")
    out = tmp_path / "cache"
    (out / "shards").mkdir(parents=True)
    mine = out / "shards" / ".64x64-000-00001.safetensors.4242.tmp"
    theirs = [out / "shards" / ".64x64-001-00000.safetensors.4343.tmp", out / ".manifest.001-of-002.json.4343.tmp"]
    for f in [mine, *theirs]:
        f.write_bytes(b"being written")
    prepare(images, out, pipe=tiny_pipe, shard_size=2, num_shards=2, shard_index=0, progress=False)
    assert not mine.exists()
    assert all(f.read_bytes() == b"being written" for f in theirs)


# ------------------------------------------------------------------------------------------------------------
# sdxs train unet
# ------------------------------------------------------------------------------------------------------------

MAX_STEPS, EVERY = 24, 3


@pytest.fixture(scope="module")
def colour_cache(tmp_path_factory, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    return make_colour_cache(tmp_path_factory.mktemp("cache"), tiny_hub_dir)


def train_args(run_dir, hub, cache, **extra) -> list[str]:
    values = {
        "run.output_dir": run_dir,
        "model.pretrained": hub,
        "data.path": cache,
        "run.max_steps": MAX_STEPS,
        "run.checkpoint_every": EVERY,
        "run.keep_last": 2,  # pruning runs too, so kills also land in deletes
        "run.log_every": 1,
        "run.progress_bar": "false",
        "run.export_at_end": "false",
        "optim.grad_accum": 2,
        "optim.warmup_steps": 3,
        "optim.schedule": "cosine",
        "optim.lr": 1e-3,
        "ema.enabled": "true",
        "ema.decay": 0.9,
        "data.batch_size": 2,
        "data.sample_posterior": "true",  # the noise and posterior draws must continue exactly, too
        "sample.prompts": "[]",
        **extra,
    }
    return ["train", "unet", "--config", "configs/tiny/unet.toml", *(f"{k}={v}" for k, v in values.items())]


def _step(ckpt: Path) -> int:
    return json.loads((ckpt / "state.json").read_text())["step"]


@pytest.mark.slow
def test_train_killed_at_random_points_resumes_to_identical_weights(tmp_path, tiny_hub_dir, colour_cache):
    from sdxs.train.cli import main

    # the uninterrupted run
    ref = tmp_path / "ref"
    with one_thread():
        assert main(train_args(ref, tiny_hub_dir, colour_cache)) == 0

    # killed three times: after the k1-th checkpoint + a random delay (mid-step), while checkpoint k2 is being
    # written (its temp folder exists), after the k3-th checkpoint + a random delay; each restart resumes
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sdxs", *train_args(run, tiny_hub_dir, colour_cache)]
    rng = random.Random(SEED)
    n = MAX_STEPS // EVERY
    k1, k2, k3 = sorted(rng.sample(range(1, n - 1), 3))
    kills = [
        (lambda: _latest_step(run) >= k1 * EVERY, rng.uniform(0, 0.3), f"after checkpoint {k1}"),
        (lambda: _saving_step(run) >= max(k2 * EVERY, _latest_step(run) + 1), rng.uniform(0, 0.01), f"saving {k2}"),
        (lambda: _latest_step(run) >= k3 * EVERY, rng.uniform(0, 0.3), f"after checkpoint {k3}"),
    ]
    resumed_from = []
    for i, (trigger, delay, what) in enumerate(kills):
        resume = ["--resume", "latest"] if i else []
        run_until_killed(cmd + resume, trigger, delay, f"train killed {what} (seed {SEED})")
        dirs = checkpoint_dirs(run)
        assert dirs, f"no complete checkpoint after the kill {what}"
        for d in dirs:  # every listed checkpoint is whole
            assert {"unet", "unet_ema", "training_state", "config.json"} <= {p.name for p in d.iterdir()}, d
        resumed_from.append(_step(dirs[-1]))
    assert resumed_from[-1] < MAX_STEPS

    with one_thread():
        assert main([*train_args(run, tiny_hub_dir, colour_cache), "--resume", "latest"]) == 0
    fa, fb = find_checkpoint(ref), find_checkpoint(run)
    assert fa.name == fb.name == f"step-{MAX_STEPS:07d}"
    for folder in ("unet", "unet_ema"):
        wa, wb = read_weights(fa / folder), read_weights(fb / folder)
        assert wa.keys() == wb.keys()
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{folder}: {len(differ)} tensors differ after kills resumed at steps {resumed_from}"
    sa, sb = (json.loads((f / "state.json").read_text()) for f in (fa, fb))
    assert sa["samples_seen"] == sb["samples_seen"]
    la = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert lb == la  # every step logged once, with the same loss
    # keep_last = 2 periodic checkpoints (+ the final one); no temp folder of an interrupted save or delete is left
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert [d.name for d in checkpoint_dirs(run)] == [d.name for d in checkpoint_dirs(ref)]


def _logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r), default=0)
    except (OSError, ValueError):  # not written yet, or a line half-written
        return 0


@pytest.mark.slow
def test_train_stopped_by_sigterm_or_ctrl_c_checkpoints_the_step_it_reached(tmp_path, tiny_hub_dir, colour_cache):
    """SIGTERM (a scheduler, `kill PID`) and SIGINT (Ctrl-C) end training after the current step with a checkpoint of
    that step, exit 143 / 130 and say how to resume; resumed, the run ends bit-identical to an uninterrupted one.
    No periodic checkpoints here, so every checkpoint comes from a stop."""
    from sdxs.train.cli import main

    no_periodic = {"run.checkpoint_every": 0}
    ref = tmp_path / "ref"
    with one_thread():
        assert main(train_args(ref, tiny_hub_dir, colour_cache, **no_periodic)) == 0

    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "sdxs", *train_args(run, tiny_hub_dir, colour_cache, **no_periodic)]
    stops = []
    for i, sig in enumerate([signal.SIGTERM, signal.SIGINT]):
        after = 5 if i == 0 else stops[-1] + 5
        name = signal.Signals(sig).name
        resume = ["--resume", "latest"] if i else []
        code, log = signal_when(cmd + resume, lambda n=after: _logged_step(run) >= n, sig, 0, name)
        assert code == 128 + sig, f"{name}: exit {code} (the shell's code for it is {128 + sig}): {log[-2000:]}"
        assert f"stopped by {name} at step" in log and "--resume latest" in log, log[-2000:]
        dirs = checkpoint_dirs(run)
        state = json.loads((dirs[-1] / "state.json").read_text())
        assert after <= state["step"] < MAX_STEPS and state["final"] is False
        stops.append(state["step"])
        assert [d.name for d in dirs] == [f"step-{s:07d}" for s in stops][-2:]  # keep_last 2, nothing else
        assert {"unet", "unet_ema", "training_state", "config.json"} <= {p.name for p in dirs[-1].iterdir()}
    with one_thread():
        assert main([*train_args(run, tiny_hub_dir, colour_cache, **no_periodic), "--resume", "latest"]) == 0
    fa, fb = find_checkpoint(ref), find_checkpoint(run)
    assert fa.name == fb.name == f"step-{MAX_STEPS:07d}"
    for folder in ("unet", "unet_ema"):
        wa, wb = read_weights(fa / folder), read_weights(fb / folder)
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{folder}: {len(differ)} tensors differ after stops at steps {stops}"
    la = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert lb == la


def _latest_step(run: Path) -> int:
    dirs = checkpoint_dirs(run)
    try:
        return _step(dirs[-1]) if dirs else 0
    except (OSError, ValueError):  # pruned or replaced while it was read
        return 0


def _saving_step(run: Path) -> int:
    """The step of a checkpoint being written now (its temp folder exists), else 0."""
    steps = [int(p.name.rsplit("-", 1)[1]) for p in (run / "checkpoints").glob(".tmp-step-*")]
    return max(steps, default=0)


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a delete."""


def _fake_checkpoint(folder: Path, step: int, final: bool = False) -> None:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights %d" % step)
    (folder / "state.json").write_text(json.dumps({"trainer": "unet", "step": step, "final": final}))


def test_a_kill_during_a_checkpoint_delete_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    """Replacing checkpoint N (the final save at a periodic step) and pruning old ones delete folders; a kill in the
    middle of such a delete must not leave a `step-N` folder that has state.json but lacks weights (it would be
    listed, and resumed from)."""
    import shutil
    from types import SimpleNamespace

    import sdxs.train.checkpoint as checkpoint

    real_rmtree = shutil.rmtree

    def dying_rmtree(path, ignore_errors=False):  # deletes the weights first, then the process dies
        real_rmtree(Path(path) / "unet", ignore_errors=True)
        raise Killed

    accelerator = SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None)
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        _fake_checkpoint(root / f"step-{step:07d}", step)

    def write_main(folder: Path) -> None:
        (folder / "training_state").mkdir(exist_ok=True)
        real_rmtree(folder)
        _fake_checkpoint(folder, 6, final=True)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):  # the final save of step 6 replaces the periodic step 6
        checkpoint.save_checkpoint(accelerator, tmp_path, 6, write_main, {}, final=True, keep_last=5)
    for d in checkpoint_dirs(tmp_path):
        assert (d / "unet").is_dir(), f"{d.name} is listed as a checkpoint but has no weights"
    assert find_checkpoint(tmp_path).name == "step-0000006"

    with pytest.raises(Killed):  # pruning to the newest periodic checkpoint deletes step 3
        checkpoint.prune_checkpoints(tmp_path, keep_last=0)
    for d in checkpoint_dirs(tmp_path):
        assert (d / "unet").is_dir(), f"{d.name} is listed as a checkpoint but has no weights"

    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    checkpoint.prune_checkpoints(tmp_path, keep_last=0)  # the next save's prune removes what the kills left
    assert sorted(p.name for p in root.iterdir()) == ["step-0000006"]
