"""HTTP API with the tiny pipeline (in-process, no sockets): sizes, seeds, validation, limits, the queue, hostile
inputs, the published schema, bodies that never arrive, cancelled jobs' log lines, memory given back."""

from __future__ import annotations

import asyncio
import base64
import io
import platform
import re
import struct
import threading
import zlib
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxs.server import ServerSettings, create_app

UPLOAD_LIMIT = 16 * 1024  # small, so the 413 tests send little data


@pytest.fixture(scope="module")
def app(tiny_pipe):
    settings = ServerSettings(
        default_steps=2, max_steps=8, max_images=3, max_queue=2, max_upload_bytes=UPLOAD_LIMIT, refine_max_new_tokens=4
    )
    return create_app(tiny_pipe, settings)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ---- generate -----------------------------------------------------------------------------------------------


def test_generate_returns_requested_sizes_and_seeds(client):
    r = client.post("/generate", json={"prompt": "a red apple", "width": 32, "height": 16, "seed": 5, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [5, 6]
    for im in body["images"]:
        assert (im["width"], im["height"]) == (32, 16)
        assert decode(im["image"]).size == (32, 16)
    assert body["seconds"] > 0 and body["queued_seconds"] >= 0 and body["steps"] == 2


def test_seed_reproduces_and_batch_matches_single(client):
    batch = client.post("/generate", json={"prompt": "a cat", "width": 32, "height": 16, "seed": 11, "num_images": 2})
    again = client.post("/generate", json={"prompt": "a cat", "width": 32, "height": 16, "seed": 12})
    first, second = (np.asarray(decode(im["image"])) for im in batch.json()["images"])
    alone = np.asarray(decode(again.json()["images"][0]["image"]))
    assert not np.array_equal(first, second)
    assert np.abs(second.astype(int) - alone.astype(int)).max() <= 1  # image i of a batch == seed + i alone


def test_random_seed_is_reported_and_reusable(client):
    r = client.post("/generate", json={"prompt": "a cat", "width": 32, "height": 16})
    im = r.json()["images"][0]
    assert isinstance(im["seed"], int)
    again = client.post("/generate", json={"prompt": "a cat", "width": 32, "height": 16, "seed": im["seed"]})
    assert again.json()["images"][0]["image"] == im["image"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 50}, "width must be a multiple of 16 (nearest: 48 or 64)"),
        ({"height": 40}, "height must be a multiple of 16"),
        ({"width": 0}, "width: Input should be greater than or equal to 16"),
        ({"width": 4096}, "width: Input should be less than or equal to 128"),
        ({"steps": 9}, "steps: Input should be less than or equal to 8"),
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"num_images": 4}, "num_images: Input should be less than or equal to 3"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"guidance": "lots"}, "guidance: Input should be a valid number"),
        ({"prompt": "   "}, "prompt must not be empty"),
        ({"prompt": None}, "prompt: Input should be a valid string"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"seed": False}, "seed: seed must be a number, not false"),  # pydantic took it as 0 (schemathesis)
        ({"guidance": True}, "guidance: guidance must be a number, not true"),
    ],
)
def test_generate_validation_422(client, change, message):
    payload = {"prompt": "a cat", "width": 32, "height": 32, **change}
    r = client.post("/generate", json=payload)
    assert r.status_code == 422
    assert message in r.json()["detail"], r.json()["detail"]
    assert r.json()["errors"]  # the structured list stays available to programs


def test_pixel_budget_422(tiny_pipe):
    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_pixels=64 * 64))
    r = TestClient(app).post("/generate", json={"prompt": "x", "width": 128, "height": 64})
    assert r.status_code == 422
    assert "8192 pixels is more than the limit of 4096" in r.json()["detail"]


def test_missing_prompt_and_bad_json_422(client):
    assert "prompt: is required" in client.post("/generate", json={}).json()["detail"]
    r = client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]


# ---- uploads ------------------------------------------------------------------------------------------------


def test_upscale_returns_png_at_twice_the_size(client):
    r = client.post("/upscale", files={"image": ("in.png", png(24, 16), "image/png")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (48, 32)


def test_upload_too_large_413(client):
    big = png(128, 128)  # ~49 KB of noise: over the 16 KB limit, under limit + form overhead (handler check)
    assert UPLOAD_LIMIT < len(big) < UPLOAD_LIMIT + 64 * 1024
    r = client.post("/upscale", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    huge = b"\0" * (UPLOAD_LIMIT + 128 * 1024)  # refused from Content-Length, before the body is read
    r = client.post("/encode-image", files={"image": ("huge.png", huge, "image/png")})
    assert r.status_code == 413


def test_unreadable_upload_422(client):
    r = client.post("/upscale", files={"image": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]
    r = client.post("/upscale")
    assert r.status_code == 422 and "image: is required" in r.json()["detail"]


def test_encode_image_variation(client):
    form = {"width": "32", "height": "16", "seed": "3", "num_images": "2", "steps": "1"}
    r = client.post("/encode-image", files={"image": ("p.png", png(40, 40), "image/png")}, data=form)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [im["seed"] for im in images] == [3, 4]
    assert all(decode(im["image"]).size == (32, 16) for im in images)
    r = client.post("/encode-image", files={"image": ("p.png", png(40, 40), "image/png")}, data={"width": "33"})
    assert r.status_code == 422 and "width must be a multiple of 16" in r.json()["detail"]


def test_refine_returns_text(client):
    r = client.post("/refine", json={"prompt": "a cat", "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"] == "a cat" and isinstance(r.json()["refined"], str)
    assert client.post("/refine", json={"prompt": ""}).status_code == 422
    assert client.post("/refine", json={"prompt": "a cat", "seed": True}).status_code == 422


# ---- server info, schema, page ------------------------------------------------------------------------------


def test_health_and_config(client, tiny_pipe):
    health = client.get("/health").json()
    assert health["model_loaded"] and health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["busy"] is False and health["waiting"] == 0
    cfg = client.get("/config").json()
    assert cfg["size_step"] == tiny_pipe.size_step == 16
    assert (cfg["default_width"], cfg["default_height"]) == (64, 64)
    assert cfg["max_side"] == 128 and cfg["max_pixels"] == 128 * 128
    assert cfg["sizes"] == list(range(16, 129, 16))
    assert cfg["max_steps"] == 8 and cfg["max_images"] == 3 and cfg["max_queue"] == 2
    assert cfg["features"] == {"refine": True, "encode_image": True, "upscale": True}


def test_openapi_documents_the_limits(client):
    schema = client.get("/openapi.json").json()
    assert {"/generate", "/upscale", "/refine", "/encode-image", "/health", "/config"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["steps"]["maximum"] == 8 and props["width"]["maximum"] == 128
    assert client.get("/docs").status_code == 200


class _Labels(HTMLParser):
    def __init__(self):
        super().__init__()
        self.controls, self.labelled = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "label" and "for" in a:
            self.labelled.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append(a.get("id"))


def test_page_served_and_every_control_labelled(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    parser = _Labels()
    parser.feed(r.text)
    assert len(parser.controls) >= 10
    assert None not in parser.controls
    assert set(parser.controls) <= parser.labelled, set(parser.controls) - parser.labelled
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text):
        assert client.get(asset).status_code == 200, asset
    static = Path(__file__).resolve().parents[1] / "src/sdxs/server/static"
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static.iterdir()}


# ---- one job at a time, bounded queue -------------------------------------------------------------------------


def test_queue_full_429_with_retry_after(tiny_pipe):
    """Hold the device, fill the queue, and the next request is refused at once; the queued ones then finish."""
    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_queue=2))
    gate = app.state.gate
    body = {"prompt": "a cat", "width": 32, "height": 16, "seed": 1}

    async def scenario():
        release = threading.Event()
        running = asyncio.create_task(gate.run(release.wait))  # a job that holds the device until released
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            while not gate.busy:
                await asyncio.sleep(0.01)
            queued = [asyncio.create_task(ac.post("/generate", json=body)) for _ in range(2)]  # = max_queue
            while gate.pending < 3:
                await asyncio.sleep(0.01)
            health = (await ac.get("/health")).json()  # answers while the queue is full
            refused = await ac.post("/generate", json=body)
            release.set()
            await running
            done = await asyncio.gather(*queued)
        return health, refused, done

    health, refused, done = asyncio.run(scenario())
    assert health["busy"] is True and health["waiting"] == 2
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1 and "busy" in refused.json()["detail"]
    assert [r.status_code for r in done] == [200, 200]
    assert gate.pending == 0


def test_pipeline_errors_become_422(tiny_pipe):
    class Refusing:
        """A stand-in whose model calls raise the pipeline's own argument errors."""

        size_step, device, dtype, vision_processor = 16, "cpu", "torch.float32", None
        config = tiny_pipe.config

        def __call__(self, *args, **kwargs):
            raise ValueError("`prompt` has 300 tokens,\n more than max_length=250.")

    r = TestClient(create_app(Refusing(), ServerSettings(default_steps=1))).post("/generate", json={"prompt": "x"})
    assert r.status_code == 422 and r.json()["detail"] == "`prompt` has 300 tokens, more than max_length=250."


# ---- refuse cheaply, tell the truth, stop abandoned work ----------------------------------------------------


async def _asgi(app, method: str, path: str, headers: dict[str, str], receive) -> tuple[int, dict, bytes]:
    """Call the ASGI app directly with our own `receive`, to see whether (and when) the body is read."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_busy_server_refuses_uploads_before_reading_them(tiny_pipe):
    """Queue full: 429 from the headers alone; too large: 413 from Content-Length; no body is parsed or kept.

    Both refusals drop the unread body (read and discard, up to DRAIN_LIMIT_BYTES) before answering: closing with
    the body unread reset the connection of a client still sending, so it never saw its 429
    (`bench/stress_server.py`: 70 of 70 refused uploads got ReadError on an idle machine before this)."""
    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_queue=0, max_upload_bytes=UPLOAD_LIMIT))
    gate = app.state.gate
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"not an image at all", "more_body": False}

    async def receive_big():  # a 413's body is dropped unread (so the client can read the answer), never parsed
        return {"type": "http.request", "body": b"\0" * 4096, "more_body": False}

    form = {"content-type": "multipart/form-data; boundary=x", "content-length": "1000"}

    async def scenario():
        release = threading.Event()
        running = asyncio.create_task(gate.run(release.wait))  # the device is busy, the queue (0) is full
        while not gate.busy:
            await asyncio.sleep(0.01)
        busy = [await _asgi(app, "POST", path, form, receive) for path in ("/upscale", "/encode-image", "/generate")]
        huge = {**form, "content-length": str(UPLOAD_LIMIT + 10 * 2**20)}
        too_large = await _asgi(app, "POST", "/upscale", huge, receive_big)
        chunked = await _asgi(app, "POST", "/upscale", {"content-type": form["content-type"]}, receive)
        health = await _asgi(app, "GET", "/health", {}, receive)
        release.set()
        await running
        return busy, too_large, chunked, health

    busy, too_large, chunked, health = asyncio.run(scenario())
    assert [status for status, _, _ in busy] == [429, 429, 429]  # not 422: the (bad) body was never parsed
    assert all(int(headers["retry-after"]) >= 1 for _, headers, _ in busy)
    assert too_large[0] == 413 and b"larger than the limit" in too_large[2]
    assert chunked[0] == 411
    assert len(reads) == 3  # each 429's body drained once (dropped unparsed); the 411 read nothing
    assert health[0] == 200 and gate.pending == 0


def test_upscale_side_limit_checked_from_the_header(client, monkeypatch):
    """An over-size /upscale input is refused without decoding its pixels."""
    limit = client.app.state.settings.max_upscale_side
    buf = io.BytesIO()
    Image.new("RGB", (limit + 16, 8)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < UPLOAD_LIMIT
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    r = client.post("/upscale", files={"image": ("wide.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422 and f"at most {limit} pixels per side" in r.json()["detail"]
    assert decoded == []


def test_health_reports_what_is_loaded(tiny_pipe):
    class Partial:
        """A pipeline whose UNet failed to load."""

        size_step, vision_processor, unet = 16, None, None
        vae, text_encoder, tokenizer, scheduler = tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer, 1
        config = tiny_pipe.config
        device, dtype = "cpu", "torch.float32"

    r = TestClient(create_app(Partial(), ServerSettings(default_steps=1))).get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["model_loaded"] is False and body["status"] == "unavailable"
    assert body["components"]["unet"] is False and body["components"]["vae"] is True
    full = TestClient(create_app(tiny_pipe, ServerSettings(default_steps=1))).get("/health").json()
    assert full["model_loaded"] is True and all(full["components"].values())
    assert full["busy"] is False and full["running_seconds"] is None and full["jobs_cancelled"] == 0


class _CountingPipe:
    """The tiny pipeline, counting the denoising steps it runs (the server's callback still sees the real pipe)."""

    def __init__(self, pipe):
        self._pipe, self.steps = pipe, 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, callback_on_step_end=None, **kwargs):
        def counting(pipe, i, t, callback_kwargs):
            self.steps += 1
            return callback_on_step_end(pipe, i, t, callback_kwargs) if callback_on_step_end else callback_kwargs

        return self._pipe(*args, callback_on_step_end=counting, **kwargs)


def test_client_disconnect_stops_the_job_at_the_next_step(tiny_pipe):
    counting = _CountingPipe(tiny_pipe)
    app = create_app(counting, ServerSettings(default_steps=1, max_steps=200, max_queue=1))
    gate = app.state.gate
    body = b'{"prompt": "a cat", "steps": 200, "width": 16, "height": 16, "guidance": 1, "seed": 0}'
    sent_body = []

    async def receive():
        if not sent_body:
            sent_body.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        while counting.steps < 2:  # the job is running: now the client goes away
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    headers = {"content-type": "application/json", "content-length": str(len(body))}
    status, _, _ = asyncio.run(_asgi(app, "POST", "/generate", headers, receive))
    assert status == 499
    assert 2 <= counting.steps < 200 and counting.steps <= 40, counting.steps  # stopped, not run to the end
    assert gate.cancelled == 1 and gate.pending == 0 and not gate.busy
    health = TestClient(app).get("/health").json()
    assert health["jobs_cancelled"] == 1 and health["jobs_done"] == 0
    # the interrupted pipeline is clean for the next job
    r = TestClient(app).post("/generate", json={"prompt": "a cat", "steps": 3, "width": 16, "height": 16})
    assert r.status_code == 200 and counting.steps >= 3


def test_queued_job_of_a_departed_client_never_starts(tiny_pipe):
    counting = _CountingPipe(tiny_pipe)
    app = create_app(counting, ServerSettings(default_steps=1, max_queue=1))
    gate = app.state.gate
    body = b'{"prompt": "a cat", "steps": 1, "width": 16, "height": 16}'
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    sent_body = []

    async def receive():
        if not sent_body:
            sent_body.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}  # gone while waiting behind the running job

    async def scenario():
        release = threading.Event()
        running = asyncio.create_task(gate.run(release.wait))
        while not gate.busy:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(_asgi(app, "POST", "/generate", headers, receive))
        await asyncio.sleep(0.2)
        release.set()
        await running
        return await queued

    status, _, _ = asyncio.run(scenario())
    assert status == 499 and counting.steps == 0 and gate.cancelled == 1


def test_long_prompt_is_truncated_not_refused(client, tiny_pipe):
    """docs/server.md: over the text encoder's 250 tokens -> truncated, 200; over 2000 characters -> 422."""
    prompt = " ".join(f"w{i}" for i in range(400))  # ~1900 characters
    assert len(prompt) <= 2000 and len(tiny_pipe.tokenizer(prompt)["input_ids"]) > 250
    r = client.post("/generate", json={"prompt": prompt, "steps": 1, "width": 16, "height": 16, "seed": 0})
    assert r.status_code == 200, r.text
    r = client.post("/generate", json={"prompt": "x" * 2001, "steps": 1, "width": 16, "height": 16})
    assert r.status_code == 422 and "prompt" in r.json()["detail"]


def test_big_image_prompts_are_shrunk_to_the_processor_budget_as_uint8():
    from types import SimpleNamespace

    from sdxs.server.app import shrink_for_vision

    pipe = SimpleNamespace(vision_processor=SimpleNamespace(size={"longest_edge": 1000}))
    small = Image.new("RGB", (40, 25))
    assert shrink_for_vision(small, pipe) is small
    big = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    out = shrink_for_vision(big, pipe)
    assert out.mode == "RGB" and out.width * out.height <= 1000 and out.size == (44, 22)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as encode_image does


def test_image_prompts_are_shrunk_to_what_encode_image_uses(tiny_pipe):
    """The budget is the smaller of the processor's own and encode_image's (max_length - 2 image tokens): the
    server must not hold a bigger picture than the one that is encoded."""
    from sdxs.server.app import shrink_for_vision, vision_pixel_budget

    vp = tiny_pipe.vision_processor
    unit = vp.patch_size * vp.merge_size
    want = min(vp.size["longest_edge"], (tiny_pipe.config.text_recipe["max_length"] - 2) * unit * unit)
    assert vision_pixel_budget(tiny_pipe) == want
    big = Image.new("RGB", (4 * int(want**0.5), 2 * int(want**0.5)), (200, 10, 10))
    out = shrink_for_vision(big, tiny_pipe)
    assert out.width * out.height <= want < big.width * big.height
    assert abs(out.width / out.height - 2) < 0.05


def test_the_loaded_model_is_kept_out_of_garbage_collections(tiny_pipe):
    """A full collection walks every object the model and libraries hold (~0.35 s on the shipped model, with the
    event loop stopped: the one /health stall of the upload storm); the running server freezes them."""
    import gc

    before = gc.get_freeze_count()  # > 0 while the module's `client` app is running
    with TestClient(create_app(tiny_pipe, ServerSettings(default_steps=1))) as c:
        assert gc.get_freeze_count() > max(before, 10_000)  # torch, diffusers, transformers, the pipeline
        assert c.get("/health").status_code == 200
    if before == 0:
        assert gc.get_freeze_count() == 0  # a stopped app leaves the collector as it found it


# ---- hostile and odd inputs: always a 4xx in the documented shape -----------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_bad_chunk_type(width: int = 24, height: int = 16) -> bytes:
    """A PNG whose pixel data is split over two IDAT chunks, the second with an invalid chunk type: the header
    opens, then decoding raises SyntaxError("broken PNG file (chunk ...)") — not an OSError."""
    data = png(width, height)
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at : at + 4])
    pixels, rest = data[at + 8 : at + 8 + length], data[at + 12 + length :]
    half = len(pixels) // 2
    return data[:at] + _chunk(b"IDAT", pixels[:half]) + _chunk(b"ID\0T", pixels[half:]) + rest


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that claims `width` x `height` pixels (its data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_png_with_an_invalid_chunk_type_is_422_not_500(client):
    """Pillow raises SyntaxError for it while decoding (on the worker thread): it was a 500 with a traceback."""
    bad = png_with_bad_chunk_type()
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(bad)).load()
    r = client.post("/upscale", files={"image": ("bad.png", bad, "image/png")})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("image: not a readable image file (broken PNG file")
    form = {"steps": "1", "width": "16", "height": "16"}
    r = client.post("/encode-image", files={"image": ("bad.png", bad, "image/png")}, data=form)
    assert r.status_code == 422 and "not a readable image file" in r.json()["detail"], r.text


def test_damaged_images_are_never_a_server_error(client):
    """Seeded random damage to PNG, JPEG and GIF files (flipped bytes, cut short): each answer is 200 or a 4xx
    in the one error shape, never 500."""
    rng = np.random.default_rng(0)
    originals = []
    for fmt in ("PNG", "JPEG", "GIF"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png(24, 16))).save(buf, format=fmt)
        originals.append(buf.getvalue())
    codes = set()
    for i in range(36):
        data = bytearray(originals[i % 3])
        if i % 4 == 3:
            data = data[: rng.integers(8, len(data))]
        else:
            for at in rng.integers(8, len(data), size=int(rng.integers(1, 6))):
                data[at] = int(rng.integers(0, 256))
        r = client.post("/upscale", files={"image": ("x", bytes(data), "application/octet-stream")})
        codes.add(r.status_code)
        ok = r.status_code == 200 or (r.status_code in (413, 422) and isinstance(r.json()["detail"], str))
        assert ok, (i, r.status_code, r.text[:300])
    assert 422 in codes  # (the damage did reach the decoder)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, for the 10000x10000 one
def test_too_many_pixels_is_413_however_many(client):
    """docs/server.md: 413 for an image with more pixels than the server accepts. A 100000x100000 header made
    Pillow refuse the file itself (DecompressionBombError), which answered 422 "not a readable image"."""
    for side in (10_000, 100_000):
        r = client.post("/upscale", files={"image": ("big.png", png_header_only(side, side), "image/png")})
        assert r.status_code == 413, (side, r.text)
        assert "more pixels than this server accepts" in r.json()["detail"]


def test_unparseable_bodies_are_400_in_the_error_shape(client):
    """Not UTF-8, or nested deeper than the JSON parser goes: 400 saying which, as {"detail": "..."} (FastAPI's
    own words were "There was an error parsing the body"); broken JSON stays FastAPI's 422, with its position."""
    json_headers = {"Content-Type": "application/json"}
    latin1 = client.post("/generate", content='{"prompt": "café"}'.encode("latin-1"), headers=json_headers)
    assert latin1.status_code == 400
    assert latin1.json() == {"detail": "body: not UTF-8 (byte 0xe9 at position 15); send JSON as UTF-8"}
    deep = client.post("/generate", content=b"[" * 20_000 + b"]" * 20_000, headers=json_headers)
    assert deep.status_code == 400 and deep.json() == {"detail": "body: the JSON is nested too deeply to parse"}
    nested = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert client.post("/refine", content=nested, headers=json_headers).status_code == 400
    broken = client.post("/generate", content=b'{"prompt": "x",}', headers=json_headers)
    assert broken.status_code == 422 and broken.json()["detail"].startswith("body: not valid JSON")
    multipart = client.post("/upscale", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert multipart.status_code == 400 and multipart.json()["detail"].startswith("body: not a readable multipart")


# ---- the schema tells the truth -------------------------------------------------------------------------------


def _response_schema(schema: dict, path: str, code: int) -> dict:
    """The JSON schema /openapi.json declares for `code` on POST `path`, with its $refs resolvable."""
    response = schema["paths"][path]["post"]["responses"][str(code)]
    return {**response["content"]["application/json"]["schema"], "components": schema["components"]}


def test_error_answers_match_the_published_schema(client):
    """Every 422 said `detail` was a list (FastAPI's HTTPValidationError) while the server sent a string: now the
    schema declares the shape the server sends, and each answer below is checked against it."""
    import jsonschema

    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    answers = [
        ("/generate", client.post("/generate", json={"prompt": "x", "width": 50})),
        ("/generate", client.post("/generate", json={})),
        ("/generate", client.post("/generate", content=b"{", headers={"Content-Type": "application/json"})),
        ("/generate", client.post("/generate", content=b"\xff", headers={"Content-Type": "application/json"})),
        ("/refine", client.post("/refine", json={"prompt": ""})),
        ("/upscale", client.post("/upscale", files={"image": ("x.txt", b"hello", "text/plain")})),
        ("/upscale", client.post("/upscale", files={"image": ("b.png", png_header_only(5000, 5000), "image/png")})),
        ("/encode-image", client.post("/encode-image", files={"image": ("p.png", png(8, 8))}, data={"steps": "x"})),
    ]
    for path, r in answers:
        assert 400 <= r.status_code < 500, (path, r.status_code)
        jsonschema.validate(r.json(), _response_schema(schema, path, r.status_code))
        assert isinstance(r.json()["detail"], str)
    validation = answers[0][1].json()
    assert validation["errors"][0]["loc"] == ["body", "width"]


def test_openapi_lists_every_answer_and_the_real_bounds(client, tiny_pipe):
    schema = client.get("/openapi.json").json()
    for path in ("/generate", "/encode-image", "/upscale", "/refine"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "408", "411", "413", "422", "429", "499"} <= set(responses), (path, sorted(responses))
        assert "Retry-After" in responses["429"]["headers"]
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    models = schema["components"]["schemas"]
    form = models["Body_encode_image_encode_image_post"]["properties"]
    cfg = client.get("/config").json()
    for props in (models["GenerateRequest"]["properties"], form):
        for side in ("width", "height"):
            assert props[side]["multipleOf"] == tiny_pipe.size_step
            assert (props[side]["minimum"], props[side]["maximum"]) == (cfg["min_side"], cfg["max_side"])
        assert (props["steps"]["minimum"], props["steps"]["maximum"]) == (1, cfg["max_steps"])
        assert (props["num_images"]["minimum"], props["num_images"]["maximum"]) == (1, cfg["max_images"])
        assert (props["guidance"]["minimum"], props["guidance"]["maximum"]) == (0, cfg["max_guidance"])
    assert form["seed"] == {**form["seed"], "type": "integer", "minimum": 0, "maximum": cfg["max_seed"]}
    refine = models["RefineRequest"]["properties"]["seed"]["anyOf"][0]
    assert (refine["minimum"], refine["maximum"]) == (0, cfg["max_seed"])


# ---- seeds ------------------------------------------------------------------------------------------------------


def test_every_reported_seed_can_be_sent_back(client):
    """Seed MAX_SEED with 2 images reported 2**32 for the second one, which the server then refused: image i uses
    (seed + i) mod 2**32, and each reported seed redoes its image alone."""
    max_seed = client.get("/config").json()["max_seed"]
    assert max_seed == 2**32 - 1
    body = {"prompt": "a cat", "width": 32, "height": 16, "steps": 1}
    batch = client.post("/generate", json={**body, "seed": max_seed - 1, "num_images": 3})
    assert batch.status_code == 200, batch.text
    images = batch.json()["images"]
    assert [im["seed"] for im in images] == [max_seed - 1, max_seed, 0]
    for im in images:
        alone = client.post("/generate", json={**body, "seed": im["seed"]})
        assert alone.status_code == 200, alone.text
        a, b = (np.asarray(decode(x)).astype(int) for x in (im["image"], alone.json()["images"][0]["image"]))
        assert np.abs(a - b).max() <= 1, im["seed"]  # as test_seed_reproduces_and_batch_matches_single
    form = {"steps": "1", "width": "16", "height": "16", "seed": str(max_seed), "num_images": "2"}
    r = client.post("/encode-image", files={"image": ("p.png", png(16, 16), "image/png")}, data=form)
    assert [im["seed"] for im in r.json()["images"]] == [max_seed, 0]


# ---- bodies that never arrive ----------------------------------------------------------------------------------


def test_an_idle_body_gets_408_and_holds_no_queue_place(tiny_pipe):
    """A job request that sends its headers and then nothing: before, it took a queue place from its headers and
    kept it while the socket stayed open (five of them locked every job endpoint out with 429s). Now its body is
    read before it joins the queue, within `body_timeout_seconds` (408 after)."""
    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_queue=0, body_timeout_seconds=1.0))
    gate = app.state.gate
    headers = {"content-type": "application/json", "content-length": "1000"}

    async def never():  # the client's body never comes
        await asyncio.Event().wait()

    async def scenario():
        idle = [asyncio.create_task(_asgi(app, "POST", path, headers, never)) for path in ("/generate", "/upscale")]
        while gate.receiving < 2:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            health = (await ac.get("/health")).json()
            normal = await ac.post("/generate", json={"prompt": "a cat", "width": 16, "height": 16})
        return health, normal, await asyncio.gather(*idle)

    health, normal, idle = asyncio.run(scenario())
    assert health["receiving"] == 2 and health["waiting"] == 0 and not health["busy"]
    assert normal.status_code == 200, normal.text  # max_queue=0: one idle client used to be enough for a 429
    for status, headers_sent, body in idle:
        assert status == 408 and headers_sent["connection"] == "close"
        assert b"did not arrive within 1 s" in body
    assert gate.pending == 0 and gate.receiving == 0 and gate.receiving_bytes == 0


def test_uploads_arriving_at_once_are_bounded_in_memory(tiny_pipe):
    """Bodies are read before they take a queue place, so those being read at once are bounded instead: large ones
    up to what a full queue of uploads would hold ((max_queue + 1) x the body limit), then 429 from the headers;
    small (JSON) ones are always read."""
    app = create_app(tiny_pipe, ServerSettings(default_steps=1, max_queue=1, max_upload_bytes=UPLOAD_LIMIT))
    gate = app.state.gate
    big = str(UPLOAD_LIMIT + 60 * 1024)  # within the limit plus form overhead: two fit in the budget, not three
    upload = {"content-type": "multipart/form-data; boundary=x", "content-length": big}

    async def never():
        await asyncio.Event().wait()

    async def drained():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def scenario():
        slow = [asyncio.create_task(_asgi(app, "POST", "/upscale", upload, never)) for _ in range(2)]
        while gate.receiving < 2:
            await asyncio.sleep(0.01)
        third = await _asgi(app, "POST", "/upscale", upload, drained)
        small = {"content-type": "application/json", "content-length": "2"}
        json_body = await _asgi(app, "POST", "/generate", small, lambda: _once(b"{}"))
        for task in slow:
            task.cancel()
        return third, json_body

    third, json_body = asyncio.run(scenario())
    assert third[0] == 429 and b"too many uploads arriving at once" in third[2]
    assert json_body[0] == 422  # read and validated: small bodies are not held back by the uploads


async def _once(body: bytes):
    return {"type": "http.request", "body": body, "more_body": False}


# ---- cancelled jobs are logged -----------------------------------------------------------------------------------


def test_a_cancelled_job_is_logged_as_499(tiny_pipe, caplog):
    """docs/server.md promises a 499 line for a job whose client went away; uvicorn logs nothing for a response
    it cannot send, so the server writes it, in uvicorn's access-log format."""
    import logging

    from uvicorn.logging import AccessFormatter

    counting = _CountingPipe(tiny_pipe)
    app = create_app(counting, ServerSettings(default_steps=1, max_steps=200, max_queue=1))
    body = b'{"prompt": "a cat", "steps": 200, "width": 16, "height": 16, "guidance": 1, "seed": 0}'
    sent_body = []

    async def receive():
        if not sent_body:
            sent_body.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        while counting.steps < 2:
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    headers = {"content-type": "application/json", "content-length": str(len(body))}
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        status, _, _ = asyncio.run(_asgi(app, "POST", "/generate", headers, receive))
    assert status == 499
    lines = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    line = '127.0.0.1:1234 - "POST /generate HTTP/1.1" 499'
    assert lines[0].getMessage() == line
    # `sdxs serve` prints it with uvicorn's access formatter, as it prints its own lines
    uvicorn_format = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False)
    assert uvicorn_format.format(lines[0]).rstrip() == line


# ---- memory goes back to the OS after each job -------------------------------------------------------------------


def test_each_job_gives_freed_memory_back(tiny_pipe, monkeypatch):
    """The device thread calls `release_free_memory` (glibc's malloc_trim) after every job, done or failed, so
    the server's RSS does not stay at the high-water mark of its largest job (docs/reliability.md)."""
    from sdxs.server import jobs

    calls = []
    monkeypatch.setattr(jobs, "release_free_memory", lambda: calls.append(threading.current_thread().name))
    app = create_app(tiny_pipe, ServerSettings(default_steps=1))
    c = TestClient(app)
    assert c.post("/generate", json={"prompt": "x", "width": 16, "height": 16}).status_code == 200
    assert c.post("/upscale", files={"image": ("bad.png", png_with_bad_chunk_type(), "image/png")}).status_code == 422
    app.state.gate.shutdown()  # waits for the queued releases
    assert len(calls) == 2 and all(name.startswith("sdxs-device") for name in calls)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_returns_a_freed_heap_to_the_os():
    """The mechanism, in a process of its own: a thread's freed small allocations stay in RSS until malloc_trim."""
    import os
    import subprocess
    import sys

    script = """
import ctypes, threading, psutil
from sdxs.server.memory import release_free_memory
proc = psutil.Process()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def work():  # 200 MB in 64 KB blocks (below the mmap threshold: in the thread's heap), all freed but the last
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[:-1]:
        libc.free(b)
before = proc.memory_info().rss
t = threading.Thread(target=work); t.start(); t.join()
kept = proc.memory_info().rss
print(release_free_memory(), (kept - before) >> 20, (proc.memory_info().rss - before) >> 20)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    trimmed, kept_mb, after_mb = out.split()
    assert trimmed == "True"
    assert int(kept_mb) > 150 and int(after_mb) < 50, out
