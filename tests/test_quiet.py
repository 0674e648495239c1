"""Quiet by default, noisy only when something is wrong: scripts/install-browser.sh (run by `make test`), with
stub installers on PATH (nothing is installed or downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts/install-browser.sh"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _run(tmp_path: Path, apt_fails: bool) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    noise = 'for i in $(seq 1 120); do echo "Unpacking package-$i ..."; done\n'
    install = (
        f'if [ "$1" = "install" ] || [ "$2" = "install" ]; then {"echo E: broken >&2; exit 100" if apt_fails else ""}\n'
        f'  printf "#!/usr/bin/env bash\\necho Chromium 1.0\\n" > {bin_dir}/chromium; chmod +x {bin_dir}/chromium\n'
        f'  printf "#!/usr/bin/env bash\\necho ChromeDriver 1.0 x\\n" > {bin_dir}/chromedriver\n'
        f"  chmod +x {bin_dir}/chromedriver\nfi\n"
    )
    _stub(bin_dir, "apt-get", noise + install)
    _stub(bin_dir, "fakepython", 'if [ "$1" = "-c" ]; then case "$2" in *print*) echo 4.99;; esac; exit 0; fi\n')
    for tool in ("bash", "env", "id", "mktemp", "rm", "tail", "head", "cut", "seq", "chmod", "printf"):
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "PYTHON": "fakepython", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    bash = shutil.which("bash")
    return subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the script uses sudo when not root; the stubs cover the root path")
def test_install_browser_is_one_line_when_it_works(tmp_path):
    result = _run(tmp_path, apt_fails=False)
    assert result.returncode == 0, result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == ["browser test: Chromium 1.0, ChromeDriver 1.0, selenium 4.99"], lines


@pytest.mark.skipif(os.geteuid() != 0, reason="the script uses sudo when not root; the stubs cover the root path")
def test_install_browser_shows_the_output_when_it_fails(tmp_path):
    result = _run(tmp_path, apt_fails=True)
    assert result.returncode == 1
    assert "install-browser: failed:" in result.stderr and "E: broken" in result.stderr
    assert "Unpacking package-120" in result.stderr  # the installer's own output, shown because it failed


def test_loading_a_model_folder_for_training_logs_no_warnings(root_model_dir, capfd):
    """Training, prepare and eval load the model folder in float32: no library warning on a correct folder
    (diffusers 0.42 logs 'modules that should be kept in float32: []' for every `.to(dtype)` of a model)."""
    import diffusers
    import torch

    from sdxs.model_folder import load_local_pipeline
    from sdxs.model_folder.read import load_component

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_warning()  # a fresh process's default (other tests may have quietened it)
    try:
        capfd.readouterr()
        pipe = load_local_pipeline(root_model_dir, dtype=torch.float32)  # fp16 weights
        load_component(root_model_dir, "vae", torch_dtype=torch.float32)
        out, err = capfd.readouterr()
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert "float32" not in out + err and "warn" not in (out + err).lower(), out + err


def test_init_hides_library_warnings_unless_verbose(tmp_path, capfd):
    """`sdxs init` (like train and export) prints what it did, not the libraries' notes, unless -v."""
    from sdxs.cli import main

    assert main(["init", str(tmp_path / "quiet"), "--preset", "tiny", "--no-verify"]) == 0
    err = capfd.readouterr().err
    assert "[transformers]" not in err and "Warning" not in err, err[-2000:]
