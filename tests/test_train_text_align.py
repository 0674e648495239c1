"""`sdxs train text-align`: the text encoder learns rewritten captions through the frozen UNet, and keeps the rest."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from sdxs.train.config import TextAlignTrainConfig, load_config

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def make_cache(tmp_path, hub_dir, image_embeds=True, title=False):
    from sdxs.data.prepare import prepare

    images = tmp_path / "colours"
    images.mkdir()
    for name, rgb in COLOURS.items():
        PIL.Image.new("RGB", (64, 64), rgb).save(images / f"{name}.png")
        name = name.title() if title else name
        (images / f"{name.lower()}.txt").write_text(f"{name} square\n{name} square, flat colour")
    prepare(images, tmp_path / "cache", model=hub_dir, progress=False, num_workers=0, image_embeds=image_embeds)
    return tmp_path / "cache"


def config(tmp_path, hub_dir, cache, *extra):
    return load_config(
        TextAlignTrainConfig,
        None,
        [
            f"model.pretrained={hub_dir}",
            f"data.path={cache}",
            "data.batch_size=4",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress_bar=false",
            "run.checkpoint_every=0",
            "captions.probability=0.75",
            "captions.template=1.0",
            "align.image_prompts=2",
            *extra,
        ],
    )


def test_rewrites_are_learnt_and_the_rest_is_kept(tmp_path, root_model_dir):
    """Trained with the cheap cross-attention objective, the text encoder lowers the objective that matters: the whole
    UNet's prediction for a rewrite against the exact caption's (a fixed batch); exact captions, the empty prompt and
    image prompts still give the UNet what they gave; the untrained parts are bit for bit the same; the export is
    the base model with the new text encoder."""
    from accelerate import Accelerator
    from conftest import copy_model_folder

    from sdxs.model_folder import load_base_pipeline, load_local_pipeline
    from sdxs.train.common import fit
    from sdxs.train.text_align import text_align_task

    # the shipped model: its UNet follows its text encoder (a random tiny UNet barely reads the text)
    hub = copy_model_folder(root_model_dir, tmp_path / "hub")
    cache = make_cache(tmp_path, hub)
    steps = ("run.max_steps=30", "optim.lr=3e-4", "optim.warmup_steps=0")
    base = load_base_pipeline(str(hub))
    before = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    acc = Accelerator(cpu=True)
    judge = text_align_task(config(tmp_path, hub, cache, *steps), base, acc)  # the UNet objective, same encoder
    with pytest.raises(ValueError, match="align.objective"):
        text_align_task(config(tmp_path, hub, cache, "align.objective=clip"), base, acc)
    cfg = config(tmp_path, hub, cache, *steps, "align.objective=attention", "align.query_draws=2")
    task = text_align_task(cfg, base, acc)
    assert task.model.text_encoder is judge.model.text_encoder
    batch = next(judge.data)
    assert batch["prompts"] != batch["captions"]  # rewrites ("a red square", "red square emoji", ...)
    lm = base.text_encoder.model.language_model
    trained = {n for n, p in base.text_encoder.named_parameters() if p.requires_grad}
    assert "model.language_model.layers.0.mlp.up_proj.weight" in trained
    assert "model.language_model.embed_tokens.weight" not in trained  # the default: decoder layers only
    assert not any(".visual." in n or "layers.3." in n or n.startswith("model.language_model.norm") for n in trained)

    def unet_logs():
        with torch.no_grad():
            return judge.loss_fn(judge.model, batch, torch.Generator().manual_seed(0))[1]

    start = unet_logs()
    assert start["rewrite"] > 0 and "image" in start
    with torch.no_grad():
        _, logs = task.loss_fn(task.model, next(task.data), torch.Generator().manual_seed(0))
    assert logs["rewrite"] > 0 and "image" in logs
    fit(task, cfg, accelerator=acc)
    end = unet_logs()
    # measured with the shipped model: v2.4 at 1e-4 0.131 -> 0.015 (captions 0.022); v3.0 (the three-style UNet, for
    # which these "flat colour" captions name a style) at 3e-4 0.209 -> 0.086 (captions 0.020), at 1e-4 only -> 0.186
    assert end["rewrite"] < 0.6 * start["rewrite"], (start, end)
    assert max(end["caption"], end["image"]) < 0.25 * start["rewrite"], (start, end)

    after = base.text_encoder.state_dict()
    for name, value in after.items():
        if name not in trained:
            assert torch.equal(value, before[name]), name  # frozen: the vision tower, the layers above hidden_layer
    up = "model.language_model.layers.2.mlp.up_proj.weight"  # the highest layer the UNet reads (hidden_layer -2 of 4)
    assert len(lm.layers) == 4 and not torch.equal(after[up], before[up])

    out = load_local_pipeline(tmp_path / "run" / "export", dtype=torch.float32)
    for name, value in out.text_encoder.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0)
    for name, value in out.unet.state_dict().items():
        assert torch.equal(value, base.unet.state_dict()[name])


def test_the_unet_objective_descends(tmp_path, root_model_dir):
    """`align.objective = "unet"` (the default): a few optimiser steps on one batch lower that batch's rewrite loss
    (its gradient reaches the text encoder through the frozen UNet)."""
    from accelerate import Accelerator
    from conftest import copy_model_folder

    from sdxs.model_folder import load_base_pipeline
    from sdxs.train.text_align import text_align_task

    hub = copy_model_folder(root_model_dir, tmp_path / "hub")
    cache = make_cache(tmp_path, hub)
    base = load_base_pipeline(str(hub))
    task = text_align_task(config(tmp_path, hub, cache, "align.image_prompts=0"), base, Accelerator(cpu=True))
    batch = next(task.data)
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-4)
    losses = []
    for _ in range(6):
        loss, logs = task.loss_fn(task.model, batch, torch.Generator().manual_seed(0))
        losses.append(logs["rewrite"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses


def test_recorded_queries_are_read_back_only_when_they_fit(tmp_path, root_model_dir):
    """The attention objective's queries (a UNet pass per image) are saved in the run folder: a resume reads them back
    bit for bit; other settings or another UNet record them anew."""
    from accelerate import Accelerator
    from conftest import copy_model_folder

    from sdxs.model_folder import load_base_pipeline
    from sdxs.train.text_align import CrossAttentionProbe
    from sdxs.train.unet import latent_loader

    hub = copy_model_folder(root_model_dir, tmp_path / "hub")
    cache = make_cache(tmp_path, hub)
    loader = latent_loader(config(tmp_path, hub, cache), Accelerator(cpu=True))
    unet = load_base_pipeline(str(hub)).unet.float().eval().requires_grad_(False)
    saved = tmp_path / "run" / "queries.safetensors"
    first = CrossAttentionProbe(unet, loader, draws=2, min_sigma=0.1, show=False, cache=saved)
    assert saved.is_file()
    again = CrossAttentionProbe(unet, loader, draws=2, min_sigma=0.1, show=False, cache=saved)
    assert again.index == first.index and again.scales == first.scales
    for a, b in zip(again.queries, first.queries, strict=True):
        assert torch.equal(a, b) and a.shape[1] == 2
    other = CrossAttentionProbe(unet, loader, draws=1, min_sigma=0.1, show=False, cache=saved)
    assert other.queries[0].shape[1] == 1  # recorded anew (and saved in place of the old ones)
    with torch.no_grad():
        other.layers[0].to_k.weight.mul_(2)
    changed = CrossAttentionProbe(unet, loader, draws=1, min_sigma=0.1, show=False, cache=saved)
    assert not torch.equal(changed.queries[-1], other.queries[-1])  # another UNet: its own queries


def test_a_normalised_tokenizer_is_learnt_against_the_old_ones_targets(tmp_path, root_model_dir):
    """`model.tokenizer`: the text encoder reads the new tokenizer (here lower-casing), the targets stay the cache's
    (the old tokenizer's): a capitalised caption is a new token sequence with an error to learn, and the checkpoint
    carries the new tokenizer."""
    from accelerate import Accelerator
    from conftest import copy_model_folder
    from transformers import AutoTokenizer

    from sdxs.model_folder import load_base_pipeline
    from sdxs.tokenizer import normalize_tokenizer, tokenizer_normalization
    from sdxs.train.text_align import text_align_task

    hub = copy_model_folder(root_model_dir, tmp_path / "hub")
    plain = normalize_tokenizer(AutoTokenizer.from_pretrained(hub / "tokenizer"), [])  # the shipped one lower-cases
    plain.save_pretrained(hub / "tokenizer")
    cache = make_cache(tmp_path, hub, title=True)  # "Red square": capitals the lower-casing tokenizer reads away
    base = load_base_pipeline(str(hub))
    assert tokenizer_normalization(base.tokenizer) == []

    lower = normalize_tokenizer(AutoTokenizer.from_pretrained(hub / "tokenizer"), ["lowercase"])
    lower.save_pretrained(tmp_path / "lower")
    cfg = config(tmp_path, hub, cache, f"model.tokenizer={tmp_path / 'lower'}", "captions.probability=0.001")
    task = text_align_task(cfg, base, Accelerator(cpu=True))
    assert tokenizer_normalization(base.tokenizer) == ["lowercase"]
    assert base.tokenizer.tokenize("Red square") == base.tokenizer.tokenize("red square")
    batch = next(task.data)
    assert batch["prompts"] == batch["captions"]  # all exact: only the tokenizer differs from the targets'
    with torch.no_grad():
        _, logs = task.loss_fn(task.model, batch, torch.Generator().manual_seed(0))
    assert logs["caption"] > 1e-4  # read without lower-casing, "Red square" gave other targets than "red square"
    task.save_model(task.inner(task.model), tmp_path / "ckpt" / "text_encoder")
    assert tokenizer_normalization(AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "tokenizer")) == ["lowercase"]


def test_trained_embeddings_leave_special_tokens_alone(tiny_pipe):
    """With `model.train_embeddings`, every row but the special tokens' (pad, vision markers) gets gradient."""
    import copy

    from sdxs.pipeline import encode_text
    from sdxs.train.text_align import select_trainable, special_token_ids

    te = copy.deepcopy(tiny_pipe.text_encoder)
    special = special_token_ids(tiny_pipe.tokenizer)
    assert special
    select_trainable(te, -2, -1, special, embeddings=True)
    emb = te.model.language_model.embed_tokens.weight
    assert emb.requires_grad and not any(p.requires_grad for p in te.model.language_model.layers[3].parameters())
    embeds, _ = encode_text(te, tiny_pipe.tokenizer, ["a red apple", "<|vision_start|> two cats"], {})
    (embeds**2).sum().backward()
    assert emb.grad[special].abs().sum() == 0
    assert emb.grad.abs().sum() > 0


def test_bad_recipes_are_refused(tmp_path, tiny_hub_dir, root_model_dir):
    from accelerate import Accelerator

    from sdxs.model_folder import load_base_pipeline
    from sdxs.train.text_align import text_align_task

    cache = make_cache(tmp_path, tiny_hub_dir, image_embeds=False)
    base = load_base_pipeline(str(tiny_hub_dir))
    acc = Accelerator(cpu=True)
    with pytest.raises(ValueError, match="captions.probability"):
        text_align_task(config(tmp_path, tiny_hub_dir, cache, "captions.probability=0"), base, acc)
    with pytest.raises(ValueError, match="--image-embeds"):
        text_align_task(config(tmp_path, tiny_hub_dir, cache), base, acc)
    with pytest.raises(ValueError, match="model.train_layers"):
        text_align_task(
            config(tmp_path, tiny_hub_dir, cache, "align.image_prompts=0", "model.train_layers=9"), base, acc
        )
    with pytest.raises(ValueError, match="nothing to train"):
        text_align_task(
            config(tmp_path, tiny_hub_dir, cache, "align.image_prompts=0", "model.train_layers=0"), base, acc
        )
    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        text_align_task(
            config(tmp_path, tiny_hub_dir, cache, "align.image_prompts=0", "model.tokenizer=/nowhere"), base, acc
        )
    other = f"model.tokenizer={root_model_dir / 'tokenizer'}"  # another model's vocabulary
    with pytest.raises(ValueError, match="another vocabulary"):
        text_align_task(config(tmp_path, tiny_hub_dir, cache, "align.image_prompts=0", other), base, acc)
    make = tmp_path / "with-embeds"
    make.mkdir()
    cache2 = make_cache(make, tiny_hub_dir)
    with pytest.raises(FileNotFoundError, match="align.image_folder"):
        text_align_task(config(tmp_path, tiny_hub_dir, cache2, f"align.image_folder={tmp_path / 'nowhere'}"), base, acc)
