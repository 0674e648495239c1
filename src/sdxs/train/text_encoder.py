"""Text-encoder training for small models (`sdxs train text-encoder`): a Qwen3.5 VLM from scratch on captions.

Three kinds of sequences, mixed in every batch (next-token loss on the answer part only, -100 elsewhere):

    caption      <caption><|im_end|>                                        plain language modelling
    instruction  chat(system=refine instruction, user=short prompt) -> caption    what `refine_prompts` asks
    image        chat(user=<|vision_start|><|image_pad|>*n<|vision_end|>) -> caption   what `encode_image` feeds

The tokenizer is trained on the captions with `tokenizers` (sdxs.tokenizer.train_tokenizer) unless a pretrained one is
given. Weights are fp32 or bf16; fp16 is refused (Qwen3.5's linear-attention layers overflow in it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sdxs.train.batches import IndexBatches
from sdxs.train.common import Task, fit, make_accelerator
from sdxs.train.config import TextDataConfig, TextEncoderTrainConfig

logger = logging.getLogger("sdxs.train")


def short_prompt(caption: str, max_words: int) -> str:
    """The caption's first comma-separated tags, at most `max_words` words: the kind of prompt users type."""
    words: list[str] = []
    for tag in caption.split(","):
        tag_words = tag.split()
        if words and len(words) + len(tag_words) > max_words:
            break
        words += tag_words
    return " ".join(words[:max_words]) or caption


class TextBatches:
    """Endless, seeded, rank-split batches of mixed caption / instruction / image->caption sequences."""

    def __init__(self, items, tokenizer, processor, config, cfg: TextDataConfig, seed: int, rank: int, world: int):
        from sdxs.pipeline import DEFAULT_REFINE_INSTRUCTION

        self.items, self.tok, self.processor, self.config, self.cfg = items, tokenizer, processor, config, cfg
        if cfg.short_prompt not in ("words", "first_line"):
            raise ValueError(f"`data.short_prompt` must be 'words' or 'first_line', got {cfg.short_prompt!r}.")
        self.seed, self.rank, self.instruction = seed, rank, DEFAULT_REFINE_INSTRUCTION
        self.index = IndexBatches(len(items), cfg.batch_size, seed, rank, world)

    def __iter__(self):
        return self

    def _chat(self, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = self.tok(prompt, add_special_tokens=False)["input_ids"]
        a = self.tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return p + a, [-100] * len(p) + a

    def __next__(self) -> dict:
        from sdxs.pipeline import load_rgb_image

        rng = np.random.default_rng([self.seed, self.index.epoch, self.index.position, self.rank])
        ids, labels, pixels, grids = [], [], [], []
        for i in next(self.index):
            item = self.items[i]
            caption = item.captions[int(rng.integers(len(item.captions)))]
            kind = rng.random()
            if kind < self.cfg.image_fraction:
                im = load_rgb_image(item.path).resize((self.cfg.image_size, self.cfg.image_size))
                vis = self.processor(images=[im], return_tensors="pt")
                n = int(vis["image_grid_thw"][0].prod()) // (int(self.processor.merge_size) ** 2)
                user = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
                x, y = self._chat([{"role": "user", "content": user}], caption)
                pixels.append(vis["pixel_values"])
                grids.append(vis["image_grid_thw"])
            elif kind < self.cfg.image_fraction + self.cfg.instruction_fraction:
                if self.cfg.short_prompt == "first_line":
                    user, answers = item.captions[0], item.captions[1:] or item.captions
                    caption = answers[int(rng.integers(len(answers)))]
                else:
                    user = short_prompt(caption, self.cfg.short_words)
                messages = [{"role": "system", "content": self.instruction}, {"role": "user", "content": user}]
                x, y = self._chat(messages, caption)
            else:
                x = self.tok(caption + "<|im_end|>", add_special_tokens=False)["input_ids"]
                y = list(x)
            if (
                len(x) > self.cfg.max_length and self.config.image_token_id in x
            ):  # cutting image tokens breaks the model
                raise ValueError(f"an image sequence has {len(x)} tokens > data.max_length; lower data.image_size.")
            ids.append(x[: self.cfg.max_length])
            labels.append(y[: self.cfg.max_length])
        length = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([x + [pad] * (length - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (length - len(y)) for y in labels]),
        }
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.config.image_token_id).long()
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return batch

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict, replan: bool = False) -> None:
        self.index.load_state_dict(state, replan)


def build_text_model(cfg: TextEncoderTrainConfig, captions: list[str]):
    """(model, tokenizer, image processor): pretrained ones, or a fresh preset shape with a tokenizer trained here."""
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sdxs.presets import fresh_component, get_preset
    from sdxs.runtime import torch_dtype
    from sdxs.tokenizer import train_tokenizer

    m = cfg.model
    preset = get_preset(m.preset)
    if m.dtype not in ("fp32", "bf16"):
        raise ValueError(f"`model.dtype` must be 'fp32' or 'bf16' (fp16 overflows in Qwen3.5), got {m.dtype!r}.")
    dtype = torch_dtype(m.dtype, "`model.dtype`")
    processor = Qwen2VLImageProcessorPil(**preset.vision_processor)
    if m.pretrained:
        root = Path(m.pretrained)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        model = Qwen3_5ForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=dtype)
        if (root / "vision_processor").is_dir():
            processor = Qwen2VLImageProcessorPil.from_pretrained(root / "vision_processor")
    else:
        tokenizer = train_tokenizer(captions, m.vocab_size or preset.tokenizer_vocab, _normalization(m, preset))
        model = fresh_component(preset, "text_encoder", cfg.run.seed, tokenizer, dtype=dtype)
    return model.train(), tokenizer, processor


def _normalization(m, preset) -> tuple[str, ...]:
    """`model.tokenizer_normalization` as names: "preset" -> the preset's, "none" -> (), else the comma list."""
    from sdxs.tokenizer import TEXT_NORMALIZATIONS

    value = m.tokenizer_normalization.strip()
    if value == "preset":
        return tuple(preset.tokenizer_normalization)
    if value in ("none", ""):
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in TEXT_NORMALIZATIONS]
    if unknown:
        raise ValueError(
            f'`model.tokenizer_normalization`: unknown {", ".join(unknown)}; use "preset", "none" or names from '
            f'{", ".join(TEXT_NORMALIZATIONS)} joined by commas (e.g. "nfkc,lowercase").'
        )
    return names


def freeze_all_but_last_layers(model, n: int) -> str:
    """`model.train_layers`: with n > 0 only the language model's last n decoder layers and its final norm train.
    Returns what trains, for the log."""
    if n == 0:
        return "all trained"
    lm = model.model.language_model
    if not 0 < n <= len(lm.layers):
        raise ValueError(
            f"`model.train_layers` must be 0 (everything) or 1-{len(lm.layers)} (the last decoder layers), got {n}."
        )
    model.requires_grad_(False)
    for module in (*lm.layers[-n:], lm.norm):
        module.requires_grad_(True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{count / 1e6:.2f}M trained: the last {n} decoder layer(s) and the final norm"


def train_text_encoder(cfg: TextEncoderTrainConfig, resume: str | None = None) -> Path:
    """Train a small Qwen3.5 text encoder on the captions (and images) of `cfg.data.path`."""
    from sdxs.data.folder import scan_folder

    if cfg.run.mixed_precision == "fp16":
        raise ValueError("`run.mixed_precision` fp16 is refused for Qwen3.5 (it overflows); use bf16 or no.")
    accelerator = make_accelerator(cfg.run, find_unused_parameters=True)  # text-only batches skip the vision tower
    if not cfg.data.path:
        raise ValueError("`data.path` is required: a folder of images with captions.")
    items, skipped = scan_folder(cfg.data.path)
    if not items:
        raise ValueError(f"`data.path` {cfg.data.path!r} has no captioned images ({len(skipped)} files skipped).")
    model, tokenizer, processor = build_text_model(cfg, [c for it in items for c in it.captions])
    trained = freeze_all_but_last_layers(model, cfg.model.train_layers)
    data = TextBatches(
        items,
        tokenizer,
        processor,
        model.config,
        cfg.data,
        cfg.run.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    if accelerator.is_main_process:
        logger.info(
            "text encoder: %.2fM parameters (%s), vocabulary %d, %d captioned images",
            sum(p.numel() for p in model.parameters()) / 1e6,
            trained,
            len(tokenizer),
            len(items),
        )

    def loss_fn(model, batch, generator):
        batch = {k: v.to(generator.device) for k, v in batch.items()}
        return model(**batch).loss, {}

    def save(model, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder.parent / "tokenizer")

    task = Task(
        name="text_encoder",
        model=model,
        loss_fn=loss_fn,
        data=data,
        batch_size=cfg.data.batch_size,
        save_model=save,
        find_unused_parameters=True,
    )
    return fit(task, cfg, resume=resume, accelerator=accelerator)
