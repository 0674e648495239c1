"""refine_prompts and encode_image with a tiny random Qwen3.5 VLM; clear errors with a text-only encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "girl.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_refine_prompts_returns_one_string_per_prompt_and_is_seedable(pipe):
    a = pipe.refine_prompts(["girl", "a red apple"], max_new_tokens=6, seed=0)
    b = pipe.refine_prompts(["girl", "a red apple"], max_new_tokens=6, seed=0)
    assert isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) for x in a)
    assert a == b
    assert isinstance(pipe.refine_prompts("girl", instruction="Be brief.", max_new_tokens=3, seed=1)[0], str)


def test_refine_prompts_keeps_what_the_user_named(pipe):
    # a random tiny LM writes anything; with keep_prompt (the default) the answer still opens with the prompt
    kept = pipe.refine_prompts(["penguin", "red apple, 3d render"], max_new_tokens=5, seed=0)
    assert kept[0].startswith("penguin") and kept[1].startswith("red apple, 3d render")
    free = pipe.refine_prompts(["penguin"], max_new_tokens=5, seed=0, keep_prompt=False)
    assert not free[0].startswith("penguin")


def test_refine_prompts_closes_the_name_and_adds_no_skin_tone(pipe):
    from sdxs.pipeline import _tidy_refined

    # the name is closed by a comma before the model writes: "rock" cannot grow into "rocket"
    rock, girl = pipe.refine_prompts(["rock", "girl, medium skin tone,"], max_new_tokens=8, seed=0)
    assert rock.split(",")[0] == "rock" and girl.startswith("girl, medium skin tone")
    # a tone the prompt did not name would make another emoji: dropped unless asked for
    answer = "woman cook, medium-light skin tone, chef, , 3d render"
    assert _tidy_refined(answer, "woman cook", add_skin_tone=False) == "woman cook, chef, 3d render"
    assert _tidy_refined(answer, "woman cook", add_skin_tone=True).startswith("woman cook, medium-light skin tone")
    assert _tidy_refined("woman cook, dark skin tone, chef", "woman cook, dark skin tone", False).count("tone") == 1


class ByteTokenizer:
    """Byte-level pieces like Qwen's: a character can be split over two tokens (decodes as U+FFFD until whole)."""

    pieces = {1: b" red", 2: b",", 3: b" b", 4: b"ordan", 5: b", 3d render", 6: b" caf\xc3", 7: b"\xa9", 0: b""}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_refine_marks_the_tags_the_model_barely_believed_in():
    import math

    from sdxs.pipeline import _scored_pieces

    tok, floor = ByteTokenizer(), math.log(0.05)
    # " b" + "ordan" is one tag: its unlikely second token marks it; the trailing pad (0) adds nothing
    ids, lps = [1, 2, 3, 4, 5, 0], [-0.1, -0.1, -0.2, -4.0, -0.1, -9.0]
    assert _scored_pieces(ids, lps, tok, floor) == [(" red", True), (" bordan", False), (" 3d render", True)]
    assert all(ok for _, ok in _scored_pieces(ids, lps, tok, -math.inf))
    # a character split over two tokens is whole in the text and carries the lower log-prob of the two
    assert _scored_pieces([6, 7, 5], [-0.1, -0.2, -0.1], tok, floor) == [(" café", True), (" 3d render", True)]
    assert _scored_pieces([6, 7, 5], [-0.1, -5.0, -0.1], tok, floor)[0] == (" café", False)


def test_refine_cut_after_unlikely_drops_the_tags_written_after_it():
    from sdxs.pipeline import _kept_tags

    pieces = [(" space", False), (" rocket", True), (" 3d render", True)]
    assert _kept_tags(pieces, cut_after_unlikely=False) == ["", " rocket", " 3d render"]
    assert _kept_tags(pieces, cut_after_unlikely=True) == []
    assert _kept_tags([(" chef", True), (" moon", False), (" cook", True)], True) == [" chef"]


def test_refine_prompts_min_token_prob_only_removes_tags(pipe):
    # the same seed samples the same tokens: the floor can only take tags away
    loose = pipe.refine_prompts(["cat", "rock"], max_new_tokens=12, seed=3, min_token_prob=0)
    strict = pipe.refine_prompts(
        ["cat", "rock"], max_new_tokens=12, seed=3, min_token_prob=0.5, cut_after_unlikely=False
    )
    for a, b, name in zip(loose, strict, ["cat", "rock"], strict=True):
        assert b.split(", ")[0] == name and set(b.split(", ")) <= set(a.split(", "))
    cut = pipe.refine_prompts(["cat", "rock"], max_new_tokens=12, seed=3, min_token_prob=0.5, cut_after_unlikely=True)
    for a, b in zip(strict, cut, strict=True):  # a cut keeps a leading run of the filtered tags
        assert a.split(", ")[: len(b.split(", "))] == b.split(", ")
    with pytest.raises(ValueError, match="min_token_prob"):
        pipe.refine_prompts("cat", min_token_prob=1.0)


def test_refine_prompts_errors(pipe):
    with pytest.raises(ValueError, match="empty list"):
        pipe.refine_prompts([])
    with pytest.raises(TypeError, match="string"):
        pipe.refine_prompts([1])


def test_encode_image_has_the_prompt_layout_and_drives_generation(pipe, image):
    emb, mask = pipe.encode_image(str(image))
    p_emb, p_mask, _, _ = pipe.encode_prompt("girl", do_classifier_free_guidance=False)
    assert emb.shape == p_emb.shape and mask.shape == p_mask.shape
    n = int(mask[0].sum())
    assert mask[0, :n].all() and not mask[0, n:].any()
    torch.testing.assert_close(emb[0, 0], emb[0, n - 1])  # pooled = last real token
    print("Pooled vector shape:", emb[:, 0, :].shape)
    images = pipe(
        prompt_embeds=emb,
        prompt_attention_mask=mask,
        negative_prompt="low quality",
        guidance_scale=4,
        width=48,
        height=80,
        seed=0,
        num_inference_steps=2,
    )[0]
    assert images[0].size == (48, 80)


def test_encode_image_batch_of_paths_and_pil(pipe, image):
    emb, mask = pipe.encode_image([str(image), Image.open(image).convert("RGBA")])
    assert emb.shape[0] == 2
    torch.testing.assert_close(emb[0], emb[1], atol=1e-5, rtol=1e-5)  # RGBA fully opaque == RGB


def text_only_pipe(pipe, with_lm_head: bool):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextModel

    from sdxs.pipeline import SDXSPipeline

    cfg = pipe.text_encoder.config.text_config
    torch.manual_seed(0)
    te = (Qwen3_5ForCausalLM(cfg) if with_lm_head else Qwen3_5TextModel(cfg)).eval()
    components = {**pipe.components, "text_encoder": te, "vision_processor": None}
    p = SDXSPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def test_text_only_encoder_gives_clear_errors_but_still_generates(pipe, image):
    lm = text_only_pipe(pipe, with_lm_head=True)
    with pytest.raises(ValueError, match="vision tower"):
        lm.encode_image(str(image))
    assert isinstance(lm.refine_prompts("girl", max_new_tokens=2, seed=0)[0], str)
    assert lm("girl", num_inference_steps=1, seed=0).images[0].size == (64, 64)
    bare = text_only_pipe(pipe, with_lm_head=False)
    with pytest.raises(ValueError, match="cannot generate"):
        bare.refine_prompts("girl")
    assert bare("girl", num_inference_steps=1, seed=0).images[0].size == (64, 64)


def test_everything_works_under_model_cpu_offload(image):
    from sdxs.presets import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("girl", num_inference_steps=2, seed=0, output_type="np").images
    pipe.enable_model_cpu_offload(device="cpu")  # the accelerate hooks run on CPU too
    np.testing.assert_allclose(
        pipe("girl", num_inference_steps=2, seed=0, output_type="np").images, reference, atol=1e-6
    )
    assert len(pipe.refine_prompts("girl", max_new_tokens=2, seed=0)) == 1
    assert pipe.encode_image(str(image))[0].shape[0] == 1
    assert pipe.image_upscale(str(image))[0].size == (112, 144)
