"""The hub contract: plain `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, offline."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "sdxs" / "pipeline.py"
ALLOWED_IMPORTS = {"torch", "numpy", "PIL", "diffusers", "transformers", "__future__"}
STDLIB = set(sys.stdlib_module_names)


def test_root_pipeline_py_is_an_exact_copy_of_the_source():
    assert (ROOT / "pipeline.py").read_bytes() == SOURCE.read_bytes(), (
        "pipeline.py at the repo root differs from src/sdxs/pipeline.py; run `python -m sdxs.model_folder --sync-root`"
    )


def test_pipeline_py_imports_only_allowed_packages():
    tree = ast.parse(SOURCE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break the dynamic module"
            roots.add(node.module.split(".")[0])
    assert "sdxs" not in roots
    assert roots - STDLIB <= ALLOWED_IMPORTS, roots - STDLIB - ALLOWED_IMPORTS


def test_exported_folder_layout(tiny_hub_dir):
    index = json.loads((tiny_hub_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SDXSPipeline"]
    assert (tiny_hub_dir / "pipeline.py").read_bytes() == SOURCE.read_bytes()
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "vision_processor"):
        assert (tiny_hub_dir / name).is_dir(), name
    weights = list(tiny_hub_dir.rglob("*.safetensors"))
    assert len(weights) == 3 and not list(tiny_hub_dir.rglob("*.bin")) and not list(tiny_hub_dir.rglob("*.pt"))


def test_plain_diffusers_loads_it_offline_in_a_fresh_process(tiny_hub_dir, tmp_path):
    """A clean interpreter without `sdxs` importable: only diffusers, trust_remote_code and the folder."""
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, numpy as np\n"
        "sys.path = [p for p in sys.path if 'src' not in p]\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tiny_hub_dir)!r}, trust_remote_code=True)\n"
        "assert type(pipe).__name__ == 'SDXSPipeline', type(pipe)\n"
        "assert 'sdxs' not in sys.modules, 'pipeline.py pulled in the sdxs package'\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "img = pipe('a red apple', num_inference_steps=2, seed=0, output_type='np').images\n"
        f"np.save({str(tmp_path / 'img.npy')!r}, img)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # run from an empty folder so the repo's src/ is not on the path through the cwd
    subprocess.run([sys.executable, "-I", str(script)], check=True, env=env, cwd=tmp_path, timeout=300)
    assert np.load(tmp_path / "img.npy").shape == (1, 64, 64, 3)


def test_hub_loaded_pipeline_gives_identical_images(tiny_pipe, tiny_hub_dir):
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(tiny_hub_dir, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(prompt="girl", num_inference_steps=2, seed=0, output_type="np")
    np.testing.assert_array_equal(tiny_pipe(**kw).images, loaded(**kw).images)
    assert loaded.config.text_recipe == tiny_pipe.config.text_recipe


def test_fp16_variant_export_and_verify(tiny_pipe, tmp_path):
    import torch

    from sdxs.model_folder import save_hub_layout

    save_hub_layout(tiny_pipe, tmp_path, dtype=torch.float16, variant="fp16")  # verify=True reloads it
    assert list((tmp_path / "unet").glob("*.fp16.safetensors"))
    assert tiny_pipe.unet.dtype == torch.float32  # the caller's pipeline is not cast


@pytest.mark.parametrize("folder", ["tiny", "root"])
def test_component_configs_load_without_ignored_keys(folder, tiny_hub_dir, root_model_dir):
    """diffusers' AsymmetricAutoencoderKL saves keys it does not take back (`block_out_channels`, `force_upcast`);
    left in, every load warns that they "will be ignored". The export drops them; the root model has none."""
    import diffusers

    root = tiny_hub_dir if folder == "tiny" else root_model_dir
    for name in ("unet", "vae"):
        config = json.loads((root / name / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"])
        _, unused, _ = cls.extract_init_dict(config)
        assert not {k for k in unused if not k.startswith("_")}, (name, unused)
