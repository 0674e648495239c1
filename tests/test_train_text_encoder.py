"""Text-encoder training: a tiny Qwen3.5 from scratch on captions + instruction pairs + image->caption pairs."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from sdxs.train.config import TextEncoderTrainConfig, load_config
from sdxs.train.text_encoder import short_prompt, train_text_encoder

CAPTIONS = [
    "red apple, on a table, 3d render",
    "blue sky, white clouds, photo",
    "green frog, on a leaf, macro",
    "yellow flower, sunny field, painting",
]


def test_short_prompt():
    assert short_prompt("red apple, on a table, 3d render", 3) == "red apple"
    assert short_prompt("a very long single tag with many words", 3) == "a very long"


def test_text_encoder_trains_and_saves(tmp_path):
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    data = tmp_path / "data"
    data.mkdir()
    colours = [(220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20)]
    for i, (caption, rgb) in enumerate(zip(CAPTIONS, colours, strict=True)):
        PIL.Image.new("RGB", (32, 32), rgb).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    cfg = load_config(
        TextEncoderTrainConfig,
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.path={data}",
            "data.batch_size=4",
            "data.image_size=32",
            "run.max_steps=25",
            "run.log_every=1",
            "run.checkpoint_every=0",
            "run.progress_bar=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "model.vocab_size=300",
        ],
    )
    final = train_text_encoder(cfg)
    import json

    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    model = Qwen3_5ForConditionalGeneration.from_pretrained(final / "text_encoder")
    tok = AutoTokenizer.from_pretrained(final / "tokenizer")
    assert tok.chat_template and len(tok) <= model.config.text_config.vocab_size
    ids = tok("red apple", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="fp16"):
        train_text_encoder(load_config(TextEncoderTrainConfig, None, [f"data.path={data}", "run.mixed_precision=fp16"]))
    with pytest.raises(ValueError, match="fp16"):
        train_text_encoder(load_config(TextEncoderTrainConfig, None, [f"data.path={data}", "model.dtype=fp16"]))
    assert torch.isfinite(torch.tensor(losses)).all()
