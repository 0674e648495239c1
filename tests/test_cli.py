"""The `sdxs` command: help, generate on the tiny hub folder, one-line errors, the interactive loop, the others."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sdxs import cli


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def stderr_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


def test_help_lists_commands_and_examples(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    for command in ("generate", "upscale", "refine", "encode-image", "serve", "info"):
        assert command in out
    assert "examples:" in out and 'sdxs generate "' in out
    assert run_cli("generate", "--help") == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--device", "--dtype", "--steps", "--guidance", "--width", "--height", "--seed"):
        assert flag in out
    assert "--num-images" in out and "--negative" in out and "--output" in out and "-i, --interactive" in out


def test_generate_writes_png_of_the_asked_size(tiny_hub_dir, tmp_path, capsys):
    out = tmp_path / "apple.png"
    code = run_cli(
        "generate", "a red apple", "--model", tiny_hub_dir, "--steps", "2", "--width", "48", "--height", "32",
        "--seed", "3", "--num-images", "2", "--negative", "blurry", "-o", out,
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    paths = [tmp_path / "apple-1.png", tmp_path / "apple-2.png"]
    assert [line.split()[0] for line in lines] == [str(p) for p in paths]
    assert "seed 3" in lines[0] and "seed 4" in lines[1] and lines[0].endswith(" s")
    for p in paths:
        assert Image.open(p).size == (48, 32)


def test_bad_width_is_one_line_exit_2(tiny_hub_dir, tmp_path, capfd):
    code = run_cli("generate", "x", "--model", tiny_hub_dir, "--steps", "1", "--width", "50", "-o", tmp_path / "x.png")
    assert code == 2
    err = stderr_lines(capfd.readouterr())
    assert len(err) == 1, err
    assert err[0].startswith("sdxs generate: error:") and "multiple of 16" in err[0] and "[48, 64]" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_argparse_errors_are_one_line(capsys):
    assert run_cli("generate", "x", "--steps", "many") == 2
    err = stderr_lines(capsys.readouterr())
    assert err == [
        "sdxs generate: error: argument --steps: expected a whole number, got 'many' (see `sdxs generate --help`)"
    ]
    assert run_cli("paint") == 2
    assert len(stderr_lines(capsys.readouterr())) == 1


def test_missing_model_folder_is_one_clear_line(tmp_path):
    """Through the real entry point (python -m sdxs): no traceback, exit code 2, the folder to pass."""
    missing = tmp_path / "nowhere"
    env = {**os.environ, "SDXS_DEBUG": "0"}
    r = subprocess.run(
        [sys.executable, "-m", "sdxs", "generate", "a cat", "--model", str(missing)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"sdxs generate: error: --model {missing}: no such folder; pass a folder holding model_index.json"
    )


def test_default_model_is_the_repo_root_or_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.delenv("SDXS_MODEL", raising=False)
    root = cli.default_model_dir()
    assert (root / "pyproject.toml").is_file()
    if (root / "model_index.json").is_file():
        assert cli.resolve_model(None) == str(root)
    else:
        with pytest.raises(cli.UserError, match="pass --model FOLDER"):
            cli.resolve_model(None)
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setenv("SDXS_MODEL", str(tmp_path))
    assert cli.resolve_model(None) == str(tmp_path)
    with pytest.raises(cli.UserError, match="has no model_index.json"):
        cli.resolve_model(str(tmp_path.parent))
    assert cli.resolve_model("someone/sdxs-1b") == "someone/sdxs-1b"  # a hub id goes to diffusers as is


def test_debug_env_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("SDXS_DEBUG", "1")
    with pytest.raises(cli.UserError):
        run_cli("generate", "x", "--model", tmp_path / "nowhere")


def test_device_and_dtype_are_chosen_automatically():
    import torch

    assert cli.pick_dtype("auto", "cpu") == torch.float32
    assert cli.pick_dtype("fp16", "cpu") == torch.float16
    assert cli.pick_dtype("auto", "cuda") in (torch.bfloat16, torch.float16)
    assert cli.pick_device("auto") in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(cli.UserError, match="CUDA is not available"):
            cli.pick_device("cuda")


def test_interactive_loop_two_prompts(tiny_hub_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red apple\na cat\nquit\nnever read\n"))
    out = tmp_path / "loop" / "img.png"
    code = run_cli(
        "generate", "-i", "--model", tiny_hub_dir, "--steps", "1", "--width", "32", "--height", "32", "-o", out
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for n, line in enumerate(lines, start=1):
        path, size, *_ = line.split()
        assert path == str(tmp_path / "loop" / f"img-{n:03d}.png") and size == "32x32"
        assert line.endswith(" s")
        assert Image.open(path).size == (32, 32)


def test_interactive_loop_refuses_bad_flags_first_and_stops_at_eof(tiny_hub_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\n"))
    out = tmp_path / "img.png"
    (tmp_path / "img-001.png").write_bytes(b"earlier result")  # never overwritten
    code = run_cli("generate", "-i", "--model", tiny_hub_dir, "--steps", "1", "--width", "40", "-o", out)
    assert code == 2  # a size the model refuses is refused before the loop starts, not after every prompt
    captured = capsys.readouterr()
    assert captured.out == "" and "multiple of 16" in captured.err
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat"))  # EOF without a newline
    assert run_cli("generate", "-i", "--model", tiny_hub_dir, "--steps", "1", "--width", "32", "-o", out) == 0
    assert capsys.readouterr().out.split()[0] == str(tmp_path / "img-002.png")
    assert (tmp_path / "img-001.png").read_bytes() == b"earlier result"


def test_upscale_refine_encode_image(tiny_hub_dir, tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(src)
    assert run_cli("upscale", src, "--model", tiny_hub_dir) == 0
    assert Image.open(tmp_path / "in-2x.png").size == (48, 32)
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'in-2x.png'}  48x32  ")
    assert run_cli("refine", "a cat", "a dog", "--model", tiny_hub_dir, "--max-new-tokens", "4", "--seed", "0") == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert run_cli("refine", "cat", "--model", tiny_hub_dir, "--max-new-tokens", "4", "--min-token-prob", "0") == 0
    assert capsys.readouterr().out.startswith("cat")
    assert run_cli("refine", "cat", "--model", tiny_hub_dir, "--max-new-tokens", "4", "--no-cut-after-unlikely") == 0
    assert capsys.readouterr().out.startswith("cat")
    assert run_cli("refine", "cat", "--model", tiny_hub_dir, "--min-token-prob", "1") == 2
    assert "--min-token-prob" in capsys.readouterr().err
    code = run_cli(
        "encode-image", src, "--model", tiny_hub_dir, "--steps", "1", "--width", "32", "--height", "32",
        "-o", tmp_path / "var.png", "--save-embeds", tmp_path / "e.safetensors",
    )  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "var.png").size == (32, 32)
    assert (tmp_path / "e.safetensors").stat().st_size > 0


def test_upscale_missing_file_one_line(tiny_hub_dir, tmp_path, capsys):
    assert run_cli("upscale", tmp_path / "nope.png", "--model", tiny_hub_dir) == 2
    assert stderr_lines(capsys.readouterr()) == [f"sdxs upscale: error: no such image file: {tmp_path / 'nope.png'}"]


def test_info_counts_parameters_without_loading(tiny_hub_dir, capsys):
    assert run_cli("info", "--model", tiny_hub_dir, "--preset", "tiny", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    params = info["model"]["parameters"]
    assert {"unet", "vae", "text_encoder"} <= set(params) and params["unet"] > 100_000
    assert info["presets"]["tiny"]["parameters"]["unet"] == params["unet"]
    assert run_cli("info", "--model", tiny_hub_dir, "--preset", "tiny") == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and "tiny" in out


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = ("generate", "upscale", "refine", "encode-image", "serve", "info", "init", "prepare", "data", "train")
    for name in (*commands, "export", "push", "eval"):
        assert f"\n    {name}" in out, f"`sdxs {name}` is missing from `sdxs --help`"


# ---- every argument checked before the model loads ------------------------------------------------------------


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def test_bad_output_paths_fail_before_loading(tiny_hub_dir, tmp_path, capsys, no_model_load):
    (tmp_path / "a-file").write_text("x")
    cases = [
        (("generate", "x", "-o", tmp_path / "out.xyz"), "--output", "unknown file extension '.xyz'"),
        (("generate", "x", "-o", tmp_path / "a-file" / "out.png"), "--output", "is a file, not a folder"),
        (("generate", "x", "-o", tmp_path), "--output", "is a folder"),
        (("encode-image", tmp_path / "a-file", "-o", tmp_path / "v.gifx"), "--output", "unknown file extension"),
        (("encode-image", tmp_path / "a-file", "--save-embeds", tmp_path / "e.pt"), "--save-embeds", ".safetensors"),
        (("upscale", tmp_path / "a-file", "-o", tmp_path / "up.txt"), "--output", "unknown file extension"),
    ]
    for argv, flag, reason in cases:
        assert run_cli(*argv, "--model", tiny_hub_dir) == 2, argv
        err = stderr_lines(capsys.readouterr())
        assert len(err) == 1 and flag in err[0] and reason in err[0], (argv, err)
        assert (
            "use one of" in err[0]
            or "pick another" in err[0]
            or "give a file name" in err[0]
            or flag == "--save-embeds"
        )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: permissions cannot be tested")
def test_unwritable_output_folder_fails_before_loading(tiny_hub_dir, tmp_path, capsys, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert run_cli("generate", "x", "--model", tiny_hub_dir, "-o", locked / "out.png") == 2
    assert "cannot write in" in capsys.readouterr().err


def test_upscale_pixel_limit_before_loading(tiny_hub_dir, tmp_path, capsys, no_model_load):
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 30)).save(src)
    assert run_cli("upscale", src, "--model", tiny_hub_dir, "--max-pixels", "1000") == 2
    err = stderr_lines(capsys.readouterr())
    assert len(err) == 1 and "40x30 = 1200 pixels, more than --max-pixels 1000" in err[0]
    assert "pass --max-pixels 1200 (or 0 for no limit)" in err[0]
    assert not (tmp_path / "in-2x.png").exists()


def test_upscale_max_pixels_override(tiny_hub_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (40, 30)).save(src)
    assert run_cli("upscale", src, "--model", tiny_hub_dir, "--max-pixels", "1200", "-q") == 0
    assert Image.open(tmp_path / "in-2x.png").size == (80, 60)


def test_size_and_output_errors_come_before_the_model_loads(tiny_hub_dir, tmp_path, capfd, monkeypatch):
    """A request the model would refuse, or one that would run for an hour, is refused before the 15 s load."""

    def no_load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    out = tmp_path / "x.png"
    assert run_cli("generate", "x", "--model", tiny_hub_dir, "--width", "50", "-o", out) == 2
    err = stderr_lines(capfd.readouterr())
    assert len(err) == 1 and "--width 50" in err[0] and "multiple of 16" in err[0] and "[48, 64]" in err[0]
    # the size limit (default: twice the default side, squared) says how long it would take and how to allow it
    assert run_cli("generate", "x", "--model", tiny_hub_dir, "--width", "4096", "--height", "4096", "-o", out) == 2
    err = stderr_lines(capfd.readouterr())
    assert len(err) == 1 and "--max-pixels" in err[0] and " min " in err[0] and "0 for no limit" in err[0]
    # an output folder that cannot be made: named with the flag, before any work
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_cli("generate", "x", "--model", tiny_hub_dir, "-o", blocker / "sub" / "x.png") == 2
    assert "--output" in stderr_lines(capfd.readouterr())[0]
    if os.path.isdir("/proc/self"):  # a folder os.access calls writable for root, where nothing can be made
        assert run_cli("generate", "x", "--model", tiny_hub_dir, "-o", "/proc/sdxs-test/x.png") == 2
        assert "cannot write there" in stderr_lines(capfd.readouterr())[0]
    assert not out.exists() and not list(tmp_path.glob(".sdxs-write-test*"))


def test_max_pixels_allows_a_large_image(tiny_hub_dir, tmp_path):
    out = tmp_path / "big.png"
    args = ("generate", "x", "--model", tiny_hub_dir, "--steps", "1", "--width", "128", "--height", "144")
    assert run_cli(*args, "-o", out) == 2  # 128x144 > (2 x 64)^2 for the tiny model
    assert run_cli(*args, "--max-pixels", "0", "-o", out) == 0
    assert Image.open(out).size == (128, 144)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left
