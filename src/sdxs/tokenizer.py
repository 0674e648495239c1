"""The tokenizers sdxs trains for its own text encoders: byte-level BPE with the Qwen special tokens and chat
template, read through a normalisation that lives in tokenizer.json (so it travels with the model).

    tok = train_tokenizer(captions, 4096, ("nfkc", "lowercase", "prefix-space"))   # a preset's own tokenizer
    normalize_tokenizer(tok, ["lowercase", "prefix-space"])                        # retrofit one of ours
    tokenizer_normalization(tok)                                                   # -> ["lowercase", "prefix-space"]

A published tokenizer (sdxs-1b's Qwen) is used exactly as published: `normalize_tokenizer` refuses tokenizers that
are not byte-level BPE.
"""

from __future__ import annotations

from collections.abc import Sequence

# Special tokens of the Qwen chat/vision format; our tokenizers are trained with them so a tiny model speaks the
# same protocol as the real Qwen3.5 (chat template, <|image_pad|> placeholders).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style chat template (text and image parts), used by refine_prompts and by text-encoder training.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small built-in corpus so a tokenizer can be trained offline for tests and random-weight benchmarks.
BUILTIN_CORPUS = [
    "girl, smiling, red eyes, blue hair, white shirt",
    "a red apple on a wooden table, 3d render",
    "woman surfing, medium skin tone, 3d render",
    "a cat sleeping on a sofa, soft light, illustration",
    "low quality, blurry, jpeg artifacts, watermark",
    "mountain lake at golden hour, detailed, sharp focus",
    "green, blue, yellow, red, black, white, orange, purple",
    "0 1 2 3 4 5 6 7 8 9 flag keycap heart face hand",
]


TEXT_NORMALIZATIONS = {
    "nfkc": "Unicode NFKC: full-width letters, ligatures and odd spaces read as their plain forms",
    "lowercase": "lower-case everything: 'Rocket', 'ROCKET' and 'rocket' are one token sequence",
    "prefix-space": "a space before the text and runs of spaces as one: a word is the same tokens first or later",
}


def tokenizer_pipeline(normalization: Sequence[str]):
    """(normalizer, pre_tokenizer) of a byte-level BPE tokenizer for `normalization` (names of
    `TEXT_NORMALIZATIONS`); they live in tokenizer.json, so they travel with the model."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    unknown = [n for n in normalization if n not in TEXT_NORMALIZATIONS]
    if unknown:
        raise ValueError(f"unknown text normalization(s) {unknown}; choose from {', '.join(TEXT_NORMALIZATIONS)}.")
    steps = []
    if "nfkc" in normalization:
        steps.append(normalizers.NFKC())
    if "lowercase" in normalization:
        steps.append(normalizers.Lowercase())
    if "prefix-space" in normalization:
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    normalizer = normalizers.Sequence(steps) if steps else None
    return normalizer, pre_tokenizers.ByteLevel(add_prefix_space="prefix-space" in normalization)


def normalize_tokenizer(tokenizer, normalization: Sequence[str]):
    """Set `normalization` on a byte-level BPE tokenizer of our own (in place; returns it). The vocabulary is kept:
    every string still tokenizes (bytes), but some tokens (capitals, a first word without its space) are no longer
    produced, so a text encoder trained with the old reading needs fine-tuning to the new one."""
    backend = tokenizer.backend_tokenizer
    if type(backend.pre_tokenizer).__name__ != "ByteLevel":
        raise ValueError(
            "text normalization is set on byte-level BPE tokenizers trained by sdxs; this tokenizer's pre-tokenizer "
            f"is {type(backend.pre_tokenizer).__name__}: a published tokenizer is used as published."
        )
    backend.normalizer, backend.pre_tokenizer = tokenizer_pipeline(normalization)
    return tokenizer


def tokenizer_normalization(tokenizer) -> list[str]:
    """The `TEXT_NORMALIZATIONS` a tokenizer applies (read back from its tokenizer.json)."""
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    found = json.dumps(spec.get("normalizer"))
    names = [n for n, key in (("nfkc", '"NFKC"'), ("lowercase", '"Lowercase"')) if key in found]
    if (spec.get("pre_tokenizer") or {}).get("add_prefix_space"):
        names.append("prefix-space")
    return names


def train_tokenizer(corpus, vocab_size: int = 512, normalization: Sequence[str] = ()):
    """Train a byte-level BPE tokenizer with the Qwen special tokens and chat template (offline, `tokenizers`), on
    text read through `normalization` (see `TEXT_NORMALIZATIONS`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = tokenizer_pipeline(normalization)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
