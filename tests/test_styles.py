"""A model's styles (`style_tags` in model_index.json): `__call__(style=...)` / `apply_style`, `sdxs init --style`,
`sdxs generate --style`, and the server's `style` field and /config list, on the tiny model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxs import cli
from sdxs.pipeline import check_style_tags, styled_prompt
from sdxs.server import ServerSettings, create_app

TAGS = {"3d": "3d render", "twemoji": "flat", "noto": "cartoon"}


@pytest.fixture(scope="module")
def styled_dir(tiny_hub_dir, tmp_path_factory):
    """The tiny hub folder with three styles declared by `sdxs init --style`."""
    out = tmp_path_factory.mktemp("styled") / "model"
    flags = [f"--style={name}={tag}" for name, tag in TAGS.items()]
    assert cli.main(["init", str(out), "--base", str(tiny_hub_dir), "--no-verify", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def styled_pipe(styled_dir):
    from sdxs.model_folder import load_local_pipeline

    pipe = load_local_pipeline(styled_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("red apple", "red apple, flat"),
        ("red apple, 3d render", "red apple, flat"),  # a style tag at the end is replaced
        ("Red Apple, 3D Render ", "Red Apple, flat"),  # any case and spacing; the subject is kept as typed
        ("red apple, cartoon, flat,", "red apple, flat"),  # several, and a trailing comma
        ("flat", "flat"),  # only a tag: the tag
        ("flat tire, red", "flat tire, red, flat"),  # a tag word inside a part is the subject's
    ],
)
def test_styled_prompt_replaces_or_adds_the_tag(prompt, expected):
    assert styled_prompt(prompt, "flat", TAGS.values()) == expected


def test_style_tags_are_checked():
    assert check_style_tags(None) == {}
    assert list(check_style_tags(TAGS)) == ["3d", "twemoji", "noto"]  # in memory; a saved config sorts its keys
    for bad in ({"a": ""}, {"a": "x, y"}, {"a": "x", "b": "x"}, {"a": "x", "x": "y"}):
        with pytest.raises(ValueError, match="style_tags"):
            check_style_tags(bad)
    with pytest.raises(TypeError, match="style_tags"):
        check_style_tags(["3d render"])


def test_init_writes_the_styles_and_a_hub_load_keeps_them(styled_dir):
    from diffusers import DiffusionPipeline

    assert json.loads((styled_dir / "model_index.json").read_text())["style_tags"] == TAGS
    pipe = DiffusionPipeline.from_pretrained(styled_dir, trust_remote_code=True)
    assert dict(pipe.config.style_tags) == TAGS
    assert pipe.apply_style(["a cat", "a dog, cartoon"], "Twemoji") == ["a cat, flat", "a dog, flat"]


def test_call_with_style_is_the_prompt_with_its_tag(styled_pipe):
    kw = dict(num_inference_steps=2, width=32, height=32, seed=0, output_type="np")
    by_style = styled_pipe("red apple", style="noto", **kw).images
    by_name = styled_pipe("red apple, cartoon", **kw).images
    by_tag = styled_pipe("red apple, 3d render", style="cartoon", **kw).images
    other = styled_pipe("red apple", style="twemoji", **kw).images
    np.testing.assert_array_equal(by_style, by_name)
    np.testing.assert_array_equal(by_tag, by_name)
    assert not np.array_equal(other, by_name)


def test_bad_style_is_a_clear_error(styled_pipe, tiny_pipe):
    with pytest.raises(ValueError, match=r"style='watercolor' is not one of .*'twemoji' \(flat\)"):
        styled_pipe("red apple", style="watercolor", num_inference_steps=1)
    with pytest.raises(ValueError, match="declares no styles"):
        tiny_pipe("red apple", style="flat", num_inference_steps=1)
    embeds, mask, _, _ = styled_pipe.encode_prompt("red apple", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="style needs a `prompt`"):
        styled_pipe(prompt_embeds=embeds, prompt_attention_mask=mask, style="flat", num_inference_steps=1)


def test_cli_generate_style(styled_dir, tmp_path, capsys, monkeypatch):
    common = ["--model", styled_dir, "--steps", "2", "--width", "32", "--height", "32", "--seed", "1"]
    assert (
        cli.main(["generate", "red apple", "--style", "twemoji", *map(str, common), "-o", str(tmp_path / "a.png")]) == 0
    )
    assert cli.main(["generate", "red apple, flat", *map(str, common), "-o", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    np.testing.assert_array_equal(a, b)
    capsys.readouterr()

    def refuse(args):
        raise AssertionError("the model was loaded before --style was checked")

    monkeypatch.setattr(cli, "load_pipeline", refuse)
    assert cli.main(["generate", "x", "--style", "oil", "--model", str(styled_dir), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "--style oil" in err and "twemoji (flat)" in err


def test_init_style_flag_errors_and_clearing(styled_dir, tmp_path, capsys):
    assert cli.main(["init", str(tmp_path / "x"), "--base", str(styled_dir), "--style", "flat", "--no-verify"]) == 2
    assert "NAME=TAG" in capsys.readouterr().err
    assert cli.main(["init", str(tmp_path / "y"), "--base", str(styled_dir), "--style=", "--no-verify"]) == 0
    assert json.loads((tmp_path / "y" / "model_index.json").read_text())["style_tags"] == {}


def _image(body: dict) -> np.ndarray:
    uri = body["images"][0]["image"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_server_style_field_and_config(styled_pipe, tiny_pipe):
    settings = ServerSettings(default_steps=2, max_steps=4)
    with TestClient(create_app(styled_pipe, settings)) as client:
        assert client.get("/config").json()["styles"] == TAGS
        req = {"prompt": "red apple", "width": 32, "height": 32, "seed": 3}
        styled = client.post("/generate", json={**req, "style": "noto"})
        tagged = client.post("/generate", json={**req, "prompt": "red apple, cartoon"})
        assert styled.status_code == 200 and tagged.status_code == 200, styled.text
        np.testing.assert_array_equal(_image(styled.json()), _image(tagged.json()))
        bad = client.post("/generate", json={**req, "style": "oil"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "style"]
        schema = client.get("/openapi.json").text
        assert "twemoji" in schema
    with TestClient(create_app(tiny_pipe, settings)) as client:  # a model without styles: no field, no select
        assert client.get("/config").json()["styles"] == {}
        r = client.post("/generate", json={"prompt": "red apple", "width": 32, "height": 32, "style": "flat"})
        assert r.status_code == 422 and "style" in r.text


def test_styled_examples_are_found_with_their_style(tmp_path):
    from sdxs.eval.examples import find_examples

    (tmp_path / "README.md").write_text(
        'image = pipe("red apple", style="twemoji").images[0]\n'
        'plain = pipe("grinning face, 3d render").images[0]\n'
        '    sdxs generate "rocket" --style noto -o rocket.png\n'
    )
    found = {(e.prompt, e.style) for e in find_examples(tmp_path)}
    assert found == {("red apple", "twemoji"), ("grinning face, 3d render", None), ("rocket", "noto")}
    assert {e.key for e in find_examples(tmp_path)} >= {"red apple (style twemoji)", "grinning face, 3d render"}
