"""Caption augmentation (prompts as people type them) and the tokenizer normalisation that goes with it."""

from __future__ import annotations

import random

import pytest

from sdxs.data.captions import (
    TRAIN_ADJECTIVES,
    TRAIN_INVERSIONS,
    TRAIN_PUNCTUATION,
    TRAIN_QUANTITIES,
    TRAIN_TEMPLATES,
    CaptionAugmentConfig,
    CaptionAugmenter,
    head_word,
    is_holdout_tag,
    pluralize,
    subject_of,
    tags_of,
)

DATASET = [
    ["red apple", "red apple, 3d render", "red apple, fruit, food, 3d render"],
    ["green apple", "green apple, 3d render", "green apple, fruit, food, granny smith, 3d render"],
    ["cucumber", "cucumber, 3d render", "cucumber, food, pickle, gherkin, vegetable, 3d render"],
    [
        "woman surfing, medium skin tone",
        "woman surfing, medium skin tone, 3d render",
        "woman surfing, medium skin tone, surf, sea, ocean, 3d render",
    ],
    ["cat", "cat, 3d render", "cat, animal, meow, pet, 3d render"],
    ["black cat", "black cat, 3d render", "black cat, animal, superstition, 3d render"],
]


def augmenter(**overrides) -> CaptionAugmenter:
    cfg = CaptionAugmentConfig(probability=1.0, style_tags=["3d render"], **overrides)
    return CaptionAugmenter(cfg, DATASET)


def test_the_structure_of_a_caption_file():
    lines = DATASET[3]
    assert subject_of(lines) == "woman surfing, medium skin tone"
    tags, styles = tags_of(lines, subject_of(lines), ["3d render"])
    assert tags == ["surf", "sea", "ocean"] and styles == ["3d render"]
    # captions that do not share a prefix: the first line is the subject
    assert subject_of(["a dog on grass", "a photo of a dog"]) == "a dog on grass"
    assert head_word("face with tears of joy") == "face" and head_word("red apple") == "apple"


def test_plurals_and_articles_are_english():
    assert pluralize("red apple") == "red apples"
    assert pluralize("woman surfing") == "women surfing"
    assert pluralize("mouse") == "mice"
    assert pluralize("busts in silhouette") == "busts in silhouette"  # already plural: unchanged
    from sdxs.data.captions import with_article

    assert with_article("apple") == "an apple" and with_article("cat") == "a cat"


def test_only_unambiguous_tags_and_heads_stand_for_a_subject():
    aug = augmenter()
    assert "gherkin" in aug.unambiguous_tags and "meow" in aug.unambiguous_tags
    assert "fruit" not in aug.unambiguous_tags  # both apples carry it
    assert "apple" in aug.usable_heads  # two apples share the head word "apple", no emoji is named "apple"
    assert "cat" not in aug.usable_heads  # "cat" is itself an emoji: "cat" must keep meaning the cat


def test_rewrites_keep_what_the_image_shows():
    aug = augmenter()
    rng = random.Random(0)
    seen = [aug(DATASET[3], DATASET[3][1], rng) for _ in range(300)]
    # the skin tone is part of the picture: every rewrite keeps it
    assert all("medium skin tone" in s.lower() for s in seen)
    assert len(set(seen)) > 100  # many forms, not a handful
    # articles, templates, plurals, case and punctuation all occur
    low = [s.lower() for s in seen]
    assert any(s.startswith("a ") for s in low) and any("women" in s for s in low)
    assert any(s.isupper() for s in seen) and any(s.endswith(("!", ".")) for s in seen)
    assert any(s.lower().startswith(("surf", "sea", "ocean")) for s in seen)  # a tag first / alone


def test_a_dataset_of_styles_names_the_subject_without_its_tag_and_keeps_the_tag_of_the_other_styles():
    """`sdxs data emoji --styles`: the default style has a bare line, the others tag every line ("red apple, flat");
    a flat image's rewrite always keeps "flat" (dropping it would ask for the 3d render), a 3d one may drop it."""
    styled = [
        *DATASET,
        ["red apple, flat", "red apple, fruit, food, flat"],
        ["cat, cartoon", "cat, animal, meow, pet, cartoon"],
    ]
    aug = CaptionAugmenter(CaptionAugmentConfig(probability=1.0, style_tags=["3d render", "flat", "cartoon"]), styled)
    flat = aug.parse(styled[-2])
    assert (flat.subject, flat.main, flat.qualifiers) == ("red apple", "red apple", [])
    assert flat.tags == ["fruit", "food"] and flat.styles == ["flat"] and not flat.untagged
    assert aug.parse(styled[0]).untagged and aug.parse(styled[0]).styles == ["3d render"]
    assert "meow" in aug.unambiguous_tags  # the cat in two styles is still one subject
    rng = random.Random(0)
    flat_rewrites = [aug(styled[-2], styled[-2][0], rng) for _ in range(300)]
    assert all("flat" in s.lower() for s in flat_rewrites)
    assert any(not s.lower().rstrip("!.~;:*]>- ").endswith("flat") for s in flat_rewrites)  # also in front
    rewrites_3d = [aug(styled[0], styled[0][1], rng) for _ in range(300)]
    assert any("3d render" not in s.lower() for s in rewrites_3d)  # the default style may go untagged


def test_held_out_and_ambiguous_tags_never_stand_alone():
    aug = augmenter(
        holdout_tags=0.5,
        tag_form=1.0,
        head_form=0,
        template=0,
        plural=0,
        adjective=0,
        case=0,
        punctuation=0,
        add_tags=0,
        tag_first=0,
        keep_style=1,
        shuffle_parts=0,
    )  # only the choice of what names the subject: the prompt is that and nothing else
    held = [t for t in ("pickle", "gherkin", "vegetable") if is_holdout_tag(t, 0.5)]
    rng = random.Random(1)
    firsts = {aug(DATASET[2], DATASET[2][0], rng).removesuffix(", 3d render") for _ in range(200)}
    assert not firsts & set(held)
    assert "food" not in firsts  # shared with the apples
    assert firsts <= {"pickle", "gherkin", "vegetable", "cucumber"} and firsts - {"cucumber"}


ONLY_THE_FORM = dict(
    template=0, plural=0, adjective=0, case=0, punctuation=0, add_tags=0, tag_first=0, keep_style=1, shuffle_parts=0
)  # every change but the choice of what names the subject switched off


def test_keyword_prompts_name_the_subject_with_several_tags_held_out_ones_never_alone():
    aug = augmenter(holdout_tags=0.5, tag_form=0, head_form=0, keywords_form=1.0, **ONLY_THE_FORM)
    rng = random.Random(3)
    prompts = {aug(DATASET[2], DATASET[2][0], rng).removesuffix(", 3d render") for _ in range(200)}
    tags = {"food", "pickle", "gherkin", "vegetable"}
    for p in prompts:
        parts = p.split(", ")
        assert 2 <= len(parts) <= 3 and set(parts) <= tags and len(set(parts)) == len(parts), p
    assert len(prompts) > 10  # many sets and orders, held-out and ambiguous tags among them
    assert any("food" in p for p in prompts)


def test_head_first_prompts_invert_a_name_whose_head_is_last():
    aug = augmenter(tag_form=0, head_form=0, head_first=1.0, **ONLY_THE_FORM)
    rng = random.Random(4)
    apples = {aug(DATASET[0], DATASET[0][0], rng).removesuffix(", 3d render") for _ in range(100)}
    assert apples == {t.replace("{head}", "apple").replace("{rest}", "red") for t in aug.config.inversions}
    # the qualifiers stay after the name; a one-word name has nothing to invert
    surfers = {t.replace("{head}", "surfing").replace("{rest}", "woman") for t in aug.config.inversions}
    assert aug(DATASET[3], DATASET[3][0], rng).removesuffix(", medium skin tone, 3d render") in surfers
    assert aug(DATASET[2], DATASET[2][0], rng) == "cucumber, 3d render"
    # a form with no share never occurs, even when the forms before it do not apply (no tag, no usable head)
    things = [[f"{s} thing", f"{s} thing, shape, object"] for s in ("round", "square")]  # no tag or head of its own
    cfg = CaptionAugmentConfig(probability=1.0, tag_form=0.5, head_form=0, max_head_subjects=1, **ONLY_THE_FORM)
    plain = CaptionAugmenter(cfg, things)
    assert {plain(things[0], things[0][0], rng) for _ in range(100)} == {"round thing"}
    with pytest.raises(ValueError, match="inversions"):
        augmenter(inversions=["{head} only"])


def test_filler_words_are_common_words_the_dataset_never_uses(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("table\nApples\nwonder\nfruits\nx1\nsea\ntonight\ntable\n")
    aug = augmenter(filler=1.0, filler_words=str(words), tag_form=0, head_form=0, **ONLY_THE_FORM)
    assert aug.fillers == ["table", "wonder", "tonight"]  # apples, fruits, sea: the captions' own words (inflected)
    rng = random.Random(5)
    prompts = {aug(DATASET[0], DATASET[0][0], rng).removesuffix(", 3d render") for _ in range(200)}
    for p in prompts:
        extra = p.replace("red apple", " ").split()
        assert "red apple" in p and 1 <= len(extra) <= 2 and set(extra) <= set(aug.fillers), p
    assert any(p.startswith("red apple ") for p in prompts) and any(p.endswith(" red apple") for p in prompts)
    # off (the default), a words file changes nothing: the same draws, the same prompts
    a, b = random.Random(9), random.Random(9)
    plain, listed = augmenter(), augmenter(filler_words=str(words))
    assert [plain(DATASET[3], DATASET[3][0], a) for _ in range(50)] == [
        listed(DATASET[3], DATASET[3][0], b) for _ in range(50)
    ]
    with pytest.raises(ValueError, match="filler_words"):
        augmenter(filler=0.5)
    with pytest.raises(FileNotFoundError, match="filler_words"):
        augmenter(filler=0.5, filler_words=str(tmp_path / "missing.txt"))
    (tmp_path / "own.txt").write_text("apple\nred\nGREEN\n")
    with pytest.raises(ValueError, match="no word"):
        augmenter(filler=0.5, filler_words=str(tmp_path / "own.txt"))
    with pytest.raises(ValueError, match="captions.filler"):
        augmenter(filler=1.5, filler_words=str(words))


def test_probability_and_seed():
    off = CaptionAugmenter(CaptionAugmentConfig(probability=0.0), DATASET)
    assert off(DATASET[0], "red apple, 3d render", random.Random(0)) == "red apple, 3d render"
    aug = augmenter()
    a = [aug(DATASET[0], DATASET[0][1], random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1  # the same rng state, the same rewrite
    half = CaptionAugmenter(CaptionAugmentConfig(probability=0.5, style_tags=["3d render"]), DATASET)
    rng = random.Random(2)
    kept = sum(half(DATASET[0], "red apple, 3d render", rng) == "red apple, 3d render" for _ in range(1000))
    assert 450 < kept < 650  # half kept, plus the rewrites that happen to equal it


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="probability"):
        CaptionAugmenter(CaptionAugmentConfig(probability=2.0), DATASET)
    with pytest.raises(ValueError, match="templates"):
        CaptionAugmenter(CaptionAugmentConfig(probability=1.0, templates=["no slot"]), DATASET)


def test_evaluation_words_are_not_training_words():
    """The robustness eval measures phrasings the model never trained on."""
    from sdxs.eval import robust

    def words(items):
        return {w for item in items for w in item.replace("{}", " ").replace(",", " ").lower().split()}

    train = words(TRAIN_TEMPLATES) | words(TRAIN_ADJECTIVES) | words(TRAIN_QUANTITIES)
    eval_only = robust.eval_only_words()
    assert {"tiny", "clipart", "show", "two", "lots"} <= eval_only
    function_words = {"a", "an", "of", "the"}  # English needs them in both; every content word is apart
    assert not (train & eval_only) - function_words, train & eval_only
    assert not set(TRAIN_TEMPLATES) & set(robust.EVAL_PHRASES)
    assert not set(robust.EVAL_PUNCTUATION) & set(TRAIN_PUNCTUATION)
    # the eval's word order puts a comma after the head word ("apple, red"); training's inversions never do
    assert not [t for t in TRAIN_INVERSIONS if t.startswith("{head},")]


def test_robust_rewrites(tmp_path):
    from sdxs.eval.robust import CLASSES, everyday_words, parse_classes, rewrite
    from sdxs.eval.strict import Render

    r = Render(0, tmp_path / "x.webp", "train", "", "red apple", [], "objects/animals/food/travel")
    toned = Render(1, tmp_path / "y.webp", "train", "", "woman surfing", ["medium skin tone"], "toned people")
    rng = random.Random(0)
    every = everyday_words(DATASET, 1.0)  # every unambiguous tag held out
    assert every["cucumber"] and "food" not in every["cucumber"]
    for klass in CLASSES:
        text = rewrite(toned, klass, rng, every)
        if text is not None:
            assert "medium skin tone" in text.lower(), (klass, text)
    assert rewrite(r, "word order", rng, every) == "apple, red"
    assert rewrite(toned, "word order", rng, every) == "medium skin tone, woman surfing"
    assert rewrite(r, "everyday words", rng, every) is None  # the apples share all their tags
    # words only: the codes of a keyword list ("fi", "2130", "55b6") are nobody's everyday word for a thing
    coded = [
        ["flag of finland", "flag of finland, fi, suomi, 3d render"],
        ["nine-thirty", "nine-thirty, 2130, 3d render"],
    ]
    assert everyday_words(coded, 1.0) == {"flag of finland": ["suomi"]}
    assert parse_classes(None) == CLASSES and parse_classes("Plurals, everyday words") == ("plurals", "everyday words")
    with pytest.raises(ValueError, match="'plural'"):
        parse_classes("plural")


def test_loader_rewrites_are_seeded_and_resumable(tmp_path, tiny_hub_dir):
    from test_train_unet import make_colour_cache

    from sdxs.data.loader import LatentShardLoader

    cache = make_colour_cache(tmp_path, tiny_hub_dir)
    cfg = CaptionAugmentConfig(probability=1.0)
    plain = LatentShardLoader(cache, 2, seed=0)
    aug = LatentShardLoader(cache, 2, seed=0, caption_augment=cfg)
    a, b = next(iter(plain)), next(iter(aug))
    assert "prompts" not in a and len(b["prompts"]) == 2
    assert (a["latents"] == b["latents"]).all() and a["captions"] == b["captions"]  # nothing else moves
    state = aug.state_dict()
    rest = [x["prompts"] for x in aug]
    again = LatentShardLoader(cache, 2, seed=0, caption_augment=cfg)
    again.load_state_dict(state)
    assert [x["prompts"] for x in again] == rest


def test_tokenizer_normalisation_gives_one_form_per_word(tmp_path):
    from transformers import AutoTokenizer

    from sdxs.tokenizer import normalize_tokenizer, tokenizer_normalization, train_tokenizer

    corpus = ["penguin, 3d render", "a penguin on ice", "red apple, fruit", "rocket, space"] * 20
    plain = train_tokenizer(corpus, 300)
    assert plain("penguin")["input_ids"] != plain("a penguin")["input_ids"][1:]  # the old reading: two forms
    tok = train_tokenizer(corpus, 300, ("nfkc", "lowercase", "prefix-space"))
    ids = tok("penguin")["input_ids"]
    for text in ("Penguin", "PENGUIN", "  penguin", "ｐｅｎｇｕｉｎ"):  # case, spaces, full-width letters
        assert tok(text)["input_ids"] == ids, text
    assert tok("a penguin")["input_ids"][-len(ids) :] == ids  # first or later: the same tokens
    tok.save_pretrained(tmp_path / "tok")
    back = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert back("A PENGUIN")["input_ids"] == tok("a penguin")["input_ids"]
    assert tokenizer_normalization(back) == ["nfkc", "lowercase", "prefix-space"]
    # an existing tokenizer of ours gets the normalisation without a new vocabulary
    normalize_tokenizer(plain, ["lowercase", "prefix-space"])
    assert plain("Penguin")["input_ids"] == plain("penguin")["input_ids"]
    with pytest.raises(ValueError, match="unknown text normalization"):
        normalize_tokenizer(plain, ["stemming"])
