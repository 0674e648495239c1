"""Export of a training run to the hub layout (plain diffusers reload), the model card, and push (mocked HfApi)."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from conftest import TINY_UNET_CONFIG

from sdxs.model_folder import find_checkpoint
from sdxs.train.cli import main
from sdxs.train.common import read_weights


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    tmp = tmp_path_factory.mktemp("export")
    cache = make_colour_cache(tmp, tiny_hub_dir)
    args = [
        f"run.output_dir={tmp / 'run'}",
        f"model.pretrained={tiny_hub_dir}",
        f"data.path={cache}",
        "run.max_steps=4",
        "run.checkpoint_every=2",
        "run.progress_bar=false",
        "ema.enabled=true",
        "ema.decay=0.5",
        "run.log_every=1",
        "sample.steps=2",
        'sample.prompts=["red", "blue"]',
    ]
    assert main(["train", "unet", "--config", TINY_UNET_CONFIG, *args]) == 0
    return tmp / "run"


def test_export_at_end_loads_with_plain_diffusers(unet_run):
    from diffusers import DiffusionPipeline

    out = unet_run / "export"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SDXSPipeline"] and (out / "pipeline.py").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "SDXSPipeline"
    # EMA weights were exported (the run kept an EMA and use_for_export defaults to true)
    ema = read_weights(find_checkpoint(unet_run) / "unet_ema")
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    for line in (
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "license: apache-2.0",
        "datasets:",
        "training_steps: 4",
    ):
        assert line in head
    extra = json.loads((out / "sdxs_export.json").read_text())
    assert extra["step"] == 4 and extra["training_config"]["optim"]["lr"] == 2e-3
    # sample grids went through the real pipeline; loss curve and metrics exist
    assert (unet_run / "samples" / "step-0000004.png").is_file()
    assert (unet_run / "loss.png").is_file() and (unet_run / "metrics.jsonl").is_file()


def test_export_command_raw_fp16(unet_run, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "fp16"
    assert (
        main(
            [
                "export",
                str(unet_run),
                str(out),
                "--weights",
                "raw",
                "--dtype",
                "fp16",
                "--variant",
                "fp16",
                "--dataset",
                "colours/four",
            ]
        )
        == 0
    )
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, variant="fp16", dtype=torch.float16)
    raw = read_weights(find_checkpoint(unet_run) / "unet")
    name = next(iter(raw))
    torch.testing.assert_close(pipe.unet.state_dict()[name], raw[name].half())
    assert "- colours/four" in (out / "README.md").read_text()
    assert main(["export", str(unet_run / "nowhere"), str(tmp_path / "x")]) == 2  # user error: one line, exit 2


def test_push_creates_repo_and_uploads(unet_run):
    from sdxs.model_folder import push_folder

    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.upload_folder.return_value = mock.Mock(commit_url="https://hf.co/u/m/commit/1")
        assert main(["push", str(unet_run / "export"), "u/m", "--private"]) == 0
        api.create_repo.assert_called_once_with("u/m", repo_type="model", private=True, exist_ok=True)
        kwargs = api.upload_folder.call_args.kwargs
        assert kwargs["repo_id"] == "u/m" and kwargs["folder_path"] == str(unet_run / "export")
    with pytest.raises(ValueError, match="user/name"):
        push_folder(unet_run / "export", "no-slash")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        push_folder(unet_run, "u/m")
