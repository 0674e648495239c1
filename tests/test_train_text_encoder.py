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


def test_the_recipe_pins_how_the_tokenizer_reads_text():
    """`model.tokenizer_normalization`: the preset's by default, none, or a list; a typo is refused by name."""
    from sdxs.train.text_encoder import build_text_model

    def tokenizer(normalization):
        overrides = ["model.preset=emoji", "model.vocab_size=300", f"model.tokenizer_normalization={normalization}"]
        return build_text_model(load_config(TextEncoderTrainConfig, None, overrides), CAPTIONS * 4)[1]

    def same(tok, a, b):
        return tok(a).input_ids == tok(b).input_ids

    assert same(tokenizer("preset"), "Red Apple", "red apple")  # the emoji preset lower-cases
    assert not same(tokenizer("none"), "Red Apple", "red apple")  # the shipped model's tokenizer was trained raw
    assert same(tokenizer("nfkc,lowercase"), "RED APPLE", "red apple")
    with pytest.raises(ValueError, match="tokenizer_normalization.*upper"):
        tokenizer("nfkc,upper")


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

    # a refine fine-tune of that model: only the last decoder layer trains, on first line -> other line pairs; the
    # hidden states the UNet reads (the layer before the last) stay exactly as they were
    for i, caption in enumerate(CAPTIONS):
        name = caption.split(",")[0]
        (data / f"{i}.txt").write_text(f"{name}\n{name}, 3d render\n{caption}\n")
    tuned = train_text_encoder(
        load_config(
            TextEncoderTrainConfig,
            None,
            [
                f"run.output_dir={tmp_path / 'refine'}",
                f"data.path={data}",
                f"model.pretrained={final}",
                "model.train_layers=1",
                "data.short_prompt=first_line",
                "data.instruction_fraction=1",
                "data.image_fraction=0",
                "data.batch_size=4",
                "run.max_steps=15",
                "run.log_every=1",
                "run.checkpoint_every=0",
                "run.progress_bar=false",
                "optim.lr=3e-3",
                "optim.warmup_steps=1",
            ],
        )
    )
    after = Qwen3_5ForConditionalGeneration.from_pretrained(tuned / "text_encoder")
    with torch.no_grad():
        h0 = model(**ids, output_hidden_states=True).hidden_states
        h1 = after(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(h0[-2], h1[-2], rtol=0, atol=0)
    assert not torch.equal(h0[-1], h1[-1])
    refine_losses = [json.loads(ln)["loss"] for ln in (tmp_path / "refine" / "metrics.jsonl").read_text().splitlines()]
    assert sum(refine_losses[-3:]) / 3 < sum(refine_losses[:3]) / 3, refine_losses
    with pytest.raises(ValueError, match="train_layers"):
        train_text_encoder(load_config(TextEncoderTrainConfig, None, [f"data.path={data}", "model.train_layers=9"]))
    with pytest.raises(ValueError, match="short_prompt"):
        train_text_encoder(load_config(TextEncoderTrainConfig, None, [f"data.path={data}", "data.short_prompt=x"]))
