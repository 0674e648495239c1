"""Stress `sdxs serve` on 127.0.0.1 (only) with bounded loops that stop by themselves; report what happened.

    python bench/stress_server.py                       # the model at the repo root, ~1-2 min on 2 CPU cores
    python bench/stress_server.py --uploads 60 --generate 8 --disconnects 4 --json out.json
    python bench/stress_server.py --workload mixed      # memory: RSS after sequential mixed image work

One storm, all at once: N concurrent /generate requests, M concurrent 4096x4096 uploads to /encode-image (a
small PNG that decodes to 48 MB of pixels each), oversized bodies (413 from Content-Length), malformed uploads,
and clients that disconnect mid-job. Meanwhile /health is polled every 50 ms and the server's RSS sampled. It
reports peak RSS growth, /health latency p50/p99, the status counts, and whether every request got an answer
(a deliberately abandoned request counts as answered when the server counted it in `jobs_cancelled`).

`--workload mixed` instead sends image work one request at a time, `--rounds` times over: /generate at several
sizes and batch sizes, /upscale of 128..1024-pixel inputs, /encode-image of small and 4096x4096 images. It reports
the server's RSS at the start (idle, model loaded), after each round (idle again) and its peak: memory a server
keeps after its work is done (a high-water mark) shows as `rss_after_mb` - `rss_start_mb`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # never anything else


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def big_png(side: int = 4096) -> bytes:
    """A side x side gradient: a few hundred KB as PNG, side*side*3 bytes once decoded."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side))], -1)
    pixels = np.concatenate([pixels, np.full((side, side, 1), 128, np.uint8)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def poll_health(url: str, stop, send) -> None:
    """In a process of its own: GET /health every 50 ms until `stop`; send back the latencies (inf = failed)."""
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                client.get("/health")
                latencies.append(time.perf_counter() - t)
            except httpx.HTTPError:
                latencies.append(float("inf"))
            time.sleep(0.05)
    send.send(latencies)


async def storm(url: str, server: psutil.Process, args) -> dict:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.timeout)
    statuses: Counter = Counter()
    unanswered: list[str] = []
    rss: list[float] = []
    upload = big_png()
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        before = (await client.get("/health")).json()

        async def call(kind: str, method: str, path: str, **kw) -> None:
            try:
                r = await client.request(method, path, **kw)
                statuses[(kind, r.status_code)] += 1
            except httpx.HTTPError as e:
                unanswered.append(f"{kind}: {type(e).__name__}")

        async def abandon(i: int) -> None:  # starts a long job and goes away mid-way
            body = {"prompt": f"a cat {i}", "steps": 100, "seed": i}
            try:
                await asyncio.wait_for(client.post("/generate", json=body), timeout=args.disconnect_after)
                statuses[("disconnect", "finished")] += 1
            except (asyncio.TimeoutError, httpx.HTTPError):
                statuses[("disconnect", "abandoned")] += 1

        async def sample_rss() -> None:
            while not stop.is_set():
                rss.append(rss_mb(server))
                await asyncio.sleep(0.05)

        # /health is polled from its own process: polling from this event loop would also time the client's own
        # stalls (60 multipart bodies and 110 MB of oversized ones go through it), not only the server's answer.
        ctx = mp.get_context("spawn")
        poll_stop, (poll_recv, poll_send) = ctx.Event(), ctx.Pipe(duplex=False)
        poller_proc = ctx.Process(target=poll_health, args=(url, poll_stop, poll_send), daemon=True)
        poller_proc.start()
        sampler = asyncio.create_task(sample_rss())
        await asyncio.sleep(1.0)
        base_rss = min(rss)
        jobs = [call("generate", "POST", "/generate", json={"prompt": f"apple {i}", "steps": 2, "seed": i})
                for i in range(args.generate)]  # fmt: skip
        files = {"image": ("big.png", upload, "image/png")}
        jobs += [
            call("upload-4096", "POST", "/encode-image", files=files, data={"steps": "1"}) for _ in range(args.uploads)
        ]
        oversized = b"\0" * (11 * 2**20)
        jobs += [call("oversized", "POST", "/upscale", files={"image": ("x.png", oversized, "image/png")})
                 for _ in range(args.oversized)]  # fmt: skip
        jobs += [call("malformed", "POST", "/upscale", files={"image": ("x.png", os.urandom(4096), "image/png")})
                 for _ in range(args.malformed)]  # fmt: skip
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*jobs), timeout=args.deadline)
        storm_seconds = time.perf_counter() - started
        for i in range(args.disconnects):  # then, one at a time: long jobs whose clients leave mid-way
            await abandon(i)
        # let abandoned jobs be noticed, then stop polling
        for _ in range(100):
            h = (await client.get("/health")).json()
            if not h["busy"] and h["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
        stop.set()
        poll_stop.set()
        await sampler
        latencies = await asyncio.to_thread(poll_recv.recv)
        poller_proc.join(timeout=10)
        after = (await client.get("/health")).json()

    finite = sorted(x for x in latencies if x != float("inf"))
    cancelled = after["jobs_cancelled"] - before["jobs_cancelled"]
    abandoned = statuses[("disconnect", "abandoned")]
    return {
        "storm_seconds": round(storm_seconds, 1),
        "requests": {f"{k} {s}": n for (k, s), n in sorted(statuses.items(), key=str)},
        "unanswered": unanswered,
        "abandoned_and_cancelled_by_server": f"{cancelled} of {abandoned}",
        "health_polls": len(latencies),
        "health_failed": len(latencies) - len(finite),
        "health_p50_ms": round(1000 * statistics.median(finite), 1) if finite else None,
        "health_p99_ms": round(1000 * finite[min(len(finite) - 1, int(0.99 * len(finite)))], 1) if finite else None,
        "health_max_ms": round(1000 * finite[-1], 1) if finite else None,
        "rss_base_mb": round(base_rss, 1),
        "rss_peak_mb": round(max(rss), 1),
        "rss_growth_mb": round(max(rss) - base_rss, 1),
        "jobs_done": after["jobs_done"] - before["jobs_done"],
        "server_healthy_after": after["status"] == "ok" and not after["busy"] and after["waiting"] == 0,
    }


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """Random pixels: an upload that compresses badly (the worst case for its byte size)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def mixed_requests(cfg: dict) -> list[tuple[str, str, dict]]:
    """One round of image work at the sizes the server allows (`cfg` is its /config): (label, path, httpx kwargs)."""
    step, top = cfg["size_step"], cfg["max_side"]
    half = max(step, top // 2 // step * step)
    jobs: list[tuple[str, str, dict]] = []
    for w, h, n in [
        (half, half, 1),
        (top, top, 1),
        (step * 4, step * 4, 4),
        (top, half, 2),
        (half, top, 4),
        (top, top, 4),
    ]:
        if w * h <= cfg["max_pixels"] and n <= cfg["max_images"]:
            body = {"prompt": f"a red apple {w}x{h}", "width": w, "height": h, "num_images": n, "steps": 2, "seed": 1}
            jobs.append((f"generate {w}x{h} x{n}", "/generate", {"json": body}))
    for w, h in [(128, 128), (256, 256), (512, 384), (1024, 1024), (1024, 512)]:
        if max(w, h) <= cfg["max_upscale_side"]:
            files = {"image": ("in.png", noise_png(w, h, w + h), "image/png")}
            jobs.append((f"upscale {w}x{h}", "/upscale", {"files": files}))
    if cfg["features"].get("encode_image"):
        for label, picture in [("256x256", noise_png(256, 256)), ("4096x4096", big_png())]:
            form = {"steps": "2", "seed": "2", "width": str(half), "height": str(half), "num_images": "2"}
            files = {"image": ("in.png", picture, "image/png")}
            jobs.append((f"encode-image {label}", "/encode-image", {"files": files, "data": form}))
    return jobs


async def mixed(url: str, server: psutil.Process, args) -> dict:
    """Sequential mixed image work, `args.rounds` times: the server's RSS at the start, after each round, peak."""
    rss: list[float] = []
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while not stop.is_set():
            rss.append(rss_mb(server))
            await asyncio.sleep(0.05)

    # one request at a time: a 1024x1024 upscale of the shipped model takes tens of seconds on 2 busy cores
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(max(args.timeout, 600.0))) as client:
        cfg = (await client.get("/config")).json()
        jobs = mixed_requests(cfg)
        await asyncio.sleep(1.0)  # settle after start-up
        start_mb = rss_mb(server)
        sampler = asyncio.create_task(sample_rss())
        statuses: Counter = Counter()
        after_rounds, seconds = [], Counter()
        for _ in range(args.rounds):
            for label, path, kw in jobs:
                t = time.perf_counter()
                r = await client.post(path, **kw)
                seconds[label] += time.perf_counter() - t
                print(f"{label}: {r.status_code} in {time.perf_counter() - t:.1f} s, RSS {rss_mb(server):.0f} MB",
                      file=sys.stderr)  # fmt: skip
                statuses[f"{label} {r.status_code}"] += 1
            await asyncio.sleep(0.5)  # idle: what the server keeps between jobs
            after_rounds.append(round(rss_mb(server), 1))
        stop.set()
        await sampler
    return {
        "requests": dict(sorted(statuses.items())),
        "seconds_per_round": {k: round(v / max(1, args.rounds), 2) for k, v in seconds.items()},
        "rss_start_mb": round(start_mb, 1),
        "rss_after_each_round_mb": after_rounds,
        "rss_after_mb": after_rounds[-1] if after_rounds else None,
        "rss_peak_mb": round(max(rss, default=start_mb), 1),
        "rss_kept_mb": round(after_rounds[-1] - start_mb, 1) if after_rounds else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT), help="model folder (default: the repo root)")
    p.add_argument("--generate", type=int, default=8, help="concurrent /generate requests (2 steps)")
    p.add_argument("--uploads", type=int, default=60, help="concurrent 4096x4096 uploads to /encode-image")
    p.add_argument("--oversized", type=int, default=10, help="11 MB bodies (over the 10 MB limit)")
    p.add_argument("--malformed", type=int, default=10, help="random-byte 'images'")
    p.add_argument("--disconnects", type=int, default=4, help="100-step jobs abandoned after --disconnect-after s")
    p.add_argument("--disconnect-after", type=float, default=1.0)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0, help="per request, seconds (--workload mixed: 600)")
    p.add_argument("--deadline", type=float, default=90.0, help="the whole storm, seconds")
    p.add_argument("--workload", choices=("storm", "mixed"), default="storm", help="what to send (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--workload mixed: rounds of the mixed image work")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "sdxs", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
           "--steps", "2", "--max-queue", str(args.max_queue), "--log-level", "warning", "-q"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(server.stderr.read().decode()[-2000:], file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server did not start within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.25)
        workload = storm if args.workload == "storm" else mixed
        report = asyncio.run(workload(url, psutil.Process(server.pid), args))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    report = {"command": " ".join(["python", "bench/stress_server.py", *(argv or sys.argv[1:])]), **report}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.workload == "mixed":
        return 0 if all(k.endswith(" 200") for k in report["requests"]) else 1
    return 0 if not report["unanswered"] and report["server_healthy_after"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
