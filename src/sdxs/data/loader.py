"""Training batches from a latent cache written by `sdxs prepare`.

    loader = LatentShardLoader("cache/emoji", batch_size=32, seed=0, rank=rank, world_size=world_size)
    loader.check_fingerprint(pipe)                      # refuse a cache made with other encoders
    empty_embeds, empty_mask = loader.empty_prompt()    # (1, 1+L, D), (1, 1+L): for caption dropout
    for epoch in range(num_epochs):
        for batch in loader:                            # the rest of the current epoch, then the epoch advances
            batch["latents"]   # (B, C, h, w) float32, scaled latents sampled from the stored posterior
            batch["embeds"]    # (B, 1+L, D)  float32, encode_text layout (pooled vector first)
            batch["mask"]      # (B, 1+L)     long
    torch.save(loader.state_dict(), ...); loader.load_state_dict(...)   # resume mid-epoch, bit-identically

Every batch holds one aspect-ratio bucket. The epoch plan depends only on (seed, epoch): within each bucket the
samples are shuffled and cut into *global* batches of `batch_size * world_size`; the global batches of all buckets
are shuffled together; rank r takes rows [r * batch_size, (r + 1) * batch_size) of each. So every rank makes the
same number of steps and sees the same bucket at the same step, and ranks never share a sample within an epoch.
With `drop_last=False` (default) a bucket's last, incomplete global batch is filled up with other samples of the
same bucket (as `DistributedSampler` pads), so no image is left out and every batch has the full size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdxs.data.captions import CaptionAugmentConfig, CaptionAugmenter
from sdxs.data.fingerprint import compare_fingerprints, model_fingerprint
from sdxs.data.folder import read_rows
from sdxs.data.shards import EMPTY_PROMPT_NAME, load_manifest

logger = logging.getLogger(__name__)


def pad_text(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (with zeros, mask 0) or trim embeds (B, T, D) and mask (B, T) to `length` tokens.

    `encode_text` zeroes the embeddings at padding, so trimming padding off and padding it back is exact; trimming
    real tokens is refused.
    """
    t = embeds.shape[1]
    if t >= length:
        if mask[:, length:].any():
            raise ValueError(f"`length` {length} would cut real tokens (longest real length {mask.sum(1).max()}).")
        return embeds[:, :length], mask[:, :length]
    pad = length - t
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad))
    return embeds, mask


class LatentShardLoader:
    r"""
    Iterates over a latent cache in single-bucket batches, seeded, split over ranks and resumable.

    Args:
        cache_dir (`str` or `os.PathLike`): the OUT folder of `sdxs prepare` (holds `manifest.json`).
        batch_size (`int`): samples per batch *per rank*.
        seed (`int`, defaults to 0): seeds the epoch plans, the caption choice and the posterior noise.
        rank (`int`, defaults to 0), world_size (`int`, defaults to 1): this process's share of every global batch.
        shuffle (`bool`, defaults to `True`): shuffle samples within buckets and batches across buckets each epoch.
        drop_last (`bool`, defaults to `False`): drop each bucket's incomplete global batch instead of filling it up.
        sample_posterior (`bool`, defaults to `True`): latents = mean + std * noise (seeded) instead of the mean.
        pad_to_max_length (`bool`, defaults to `True`): pad text to `1 + text_recipe["max_length"]` tokens as
            `encode_text` returns it; `False` trims each batch to its longest real length (same result under the
            attention mask, less compute).
        max_open_shards (`int`, defaults to 64): shard files kept open (memory-mapped) at once.
        balance_pattern (`str`, *optional*): a regular expression; samples whose file names are equal once its
            matches are deleted form one group, and each epoch draws the groups, not the images, evenly (with
            replacement, within each bucket: buckets keep their share of batches). For emoji, `"-1f3f[b-f]"` makes the five skin tones of one emoji share one emoji's weight.
        balance_power (`float`, defaults to 1.0): a group of n images weighs n ** (1 - balance_power): 1 gives
            every group the same weight, 0 every image (no balancing), 0.5 is in between.
        caption_augment (`CaptionAugmentConfig`, *optional*): rewrite a share of the captions into the forms people
            type (`sdxs.data.captions`); batches then carry `prompts`, the text to encode on the fly. Seeded per
            (seed, epoch, step, rank) apart from the other draws, so turning it on or off changes nothing else.
        sample_weights (`str`, `os.PathLike` or `dict`, *optional*): a weight per image, multiplied into the
            balance above: a `{key: weight}` dict or a `.csv` / `.jsonl` file with `file_name` and `weight` columns
            (keys as the cache's `keys`: paths relative to the prepared folder). Images it does not list weigh 1;
            a weight of 0 leaves an image out. Like the balance, it changes how often each image is drawn, not how
            many samples an epoch has.

    Yields dicts: `latents` (B, C, h, w) float32, `embeds` (B, 1+L, D) float32, `mask` (B, 1+L) long,
    `bucket` (width, height) at output resolution, `keys` (list of source paths relative to the dataset folder)
    and `captions` (the caption chosen for each sample); from a cache made with `image_embeds=True` also
    `image_embeds` (B, 1+L', D) float32 and `image_mask` (B, 1+L') long, the `encode_image` of each sample's image;
    with `caption_augment` also `prompts` (the caption or its rewrite, one str per sample).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        sample_posterior: bool = True,
        pad_to_max_length: bool = True,
        max_open_shards: int = 64,
        balance_pattern: str | None = None,
        balance_power: float = 1.0,
        sample_weights: str | os.PathLike | dict[str, float] | None = None,
        caption_augment: CaptionAugmentConfig | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}.")
        self.cache_dir = Path(cache_dir)
        self.manifest: dict[str, Any] = load_manifest(self.cache_dir)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.sample_posterior = sample_posterior
        self.pad_to_max_length = pad_to_max_length
        self.max_open_shards = max_open_shards
        self.text_length = 1 + int(self.manifest["text_recipe"]["max_length"])  # 1 + L
        self._shards = [s for s in self.manifest["shards"] if s["count"] > 0]
        self._open: OrderedDict[int, tuple[Any, torch.Tensor, dict]] = OrderedDict()
        # bucket (W, H) -> [(shard index, row)] in manifest order: the unshuffled sample list
        self._samples: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, shard in enumerate(self._shards):
            self._samples.setdefault(tuple(shard["bucket"]), []).extend((i, r) for r in range(shard["count"]))
        self.balance_pattern, self.balance_power = balance_pattern or None, float(balance_power)
        self.sample_weights = read_sample_weights(sample_weights) if sample_weights else None
        self._weights = self._sample_weights() if (self.balance_pattern or self.sample_weights) else None
        self.augmenter = None
        if caption_augment is not None and caption_augment.probability > 0:
            self.augmenter = CaptionAugmenter(caption_augment, self.caption_lines())
        self.epoch = 0
        self._step = 0  # next batch of the current epoch
        if len(self) == 0:
            raise ValueError(
                f"{self.cache_dir} yields no batch: {self.num_samples} sample(s), global batch "
                f"{batch_size * world_size}{' with drop_last' if drop_last else ''}. Lower `batch_size`."
            )

    # ---------------------------------------------------------------------------------------------------------
    # Facts about the cache
    # ---------------------------------------------------------------------------------------------------------

    @property
    def has_image_embeds(self) -> bool:
        """True when the cache was made with `prepare(..., image_embeds=True)`: batches carry `image_embeds`."""
        return bool(self.manifest.get("options", {}).get("image_embeds", False))

    def caption_lines(self) -> list[list[str]]:
        """The caption lines of every sample, in manifest order (one list per image)."""
        return [lines for i in range(len(self._shards)) for lines in self._shard(i)[2]["captions"]]

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self._samples.values())

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(width, height) of the buckets that hold samples, at output resolution."""
        return sorted(self._samples)

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self.manifest["fingerprint"])

    def check_fingerprint(
        self, pipe=None, *, vae=None, text_encoder=None, text_recipe: dict | None = None, tokenizer=None
    ) -> None:
        """Raise `ValueError` naming each of VAE / text encoder / text recipe / tokenizer that differs from the cache's.

        Pass a pipeline (its vae, text_encoder and `config.text_recipe` are checked) or any of the components.
        """
        if pipe is not None:
            vae = vae if vae is not None else pipe.vae
            text_encoder = text_encoder if text_encoder is not None else pipe.text_encoder
            text_recipe = text_recipe if text_recipe is not None else pipe.config.text_recipe
            tokenizer = tokenizer if tokenizer is not None else pipe.tokenizer
        if vae is None and text_encoder is None and text_recipe is None and tokenizer is None:
            raise ValueError(
                "`check_fingerprint` needs `pipe` or at least one of `vae`, `text_encoder`, `text_recipe`, `tokenizer`."
            )
        current = model_fingerprint(vae, text_encoder, text_recipe, tokenizer)
        compare_fingerprints(self.manifest["fingerprint"], current, where=f"The latent cache {self.cache_dir}")

    def empty_prompt(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached `encode_text([""])`: embeds (1, length, D) float32 and mask (1, length) long.

        `length` defaults to `1 + max_length`, the layout of the batches when `pad_to_max_length=True`.
        """
        from safetensors.torch import load_file

        t = load_file(str(self.cache_dir / EMPTY_PROMPT_NAME))
        return pad_text(t["embeds"].float(), t["mask"].long(), length or self.text_length)

    def iter_samples(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every sample once, in manifest order, in single-bucket batches of at most `batch_size`: `keys`, `latents`
        (the posterior means), `embeds`, `mask` (each image's first caption, trimmed as the loader's batches are) and `captions`.
        Unshuffled and unaugmented, independent of the epoch position (for passes that cache per-sample facts)."""
        gen = torch.Generator().manual_seed(self.seed)
        for bucket, rows in self._samples.items():
            for i in range(0, len(rows), batch_size):
                part = rows[i : i + batch_size]
                batch = self._make_batch(bucket, part, gen, first_caption=True, posterior=False)
                batch.pop("caption_lines")
                yield batch

    # ---------------------------------------------------------------------------------------------------------
    # Position
    # ---------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return len(self._epoch_plan(self.epoch, counts_only=True))

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self._step = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """The position of the *next* batch (and the settings that define the plan, to check on load)."""
        return {
            "epoch": self.epoch,
            "step": self._step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "balance": self._balance_id(),
        }

    def load_state_dict(self, state: dict[str, int], replan: bool = False) -> None:
        """Resume at a position from `state_dict()`. A state made with another plan (seed, batch size, world size,
        cache, balance or sample weights) is refused, or with `replan` resumed at the start of the next epoch, whose
        plan is this loader's: no batch is drawn half under one plan and half under the other."""
        mine = self.state_dict()
        changed = [
            k
            for k in ("seed", "batch_size", "world_size", "num_samples", "balance")
            if k in state and state[k] != mine[k]
        ]
        if changed and not replan:
            k = changed[0]
            raise ValueError(
                f"Loader state was saved with {k}={state[k]!r}, this loader has {mine[k]!r}: the epoch plan would "
                "differ. Resume with the same settings and cache, or pass `run.replan_data=true` to go on from the "
                "next epoch under the new plan."
            )
        if changed:
            logger.info(
                "data plan changed (%s): resuming at the start of epoch %d", ", ".join(changed), int(state["epoch"]) + 1
            )
            self.epoch, self._step = int(state["epoch"]) + 1, 0
        else:
            self.epoch, self._step = int(state["epoch"]), int(state["step"])

    # ---------------------------------------------------------------------------------------------------------
    # Iteration
    # ---------------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch; afterwards the loader moves on to the next epoch."""
        plan = self._epoch_plan(self.epoch)
        while self._step < len(plan):
            step = self._step
            bucket, global_batch = plan[step]
            rows = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            self._step = step + 1  # advance first: state_dict() taken after this batch resumes at the next one
            batch = self._make_batch(bucket, rows, self._generator(step))
            if self.augmenter is not None:
                rng = random.Random(self._seed_state(step, 1))  # its own stream: the other draws stay as they were
                lines = batch.pop("caption_lines")
                batch["prompts"] = [self.augmenter(ls, c, rng) for ls, c in zip(lines, batch["captions"], strict=True)]
            else:
                batch.pop("caption_lines")
            yield batch
        self.epoch, self._step = self.epoch + 1, 0

    def _generator(self, step: int) -> torch.Generator:
        # one generator per (seed, epoch, step, rank): caption choice and noise do not depend on where we resumed
        return torch.Generator().manual_seed(self._seed_state(step))

    def _seed_state(self, step: int, stream: int = 0) -> int:
        key = [self.seed, self.epoch, step, self.rank] + ([stream] if stream else [])
        return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)

    def _balance_id(self) -> str:
        """What defines the draw probabilities, for `state_dict` (a resume must draw the same way)."""
        parts = [f"{self.balance_pattern}^{self.balance_power}"] if self.balance_pattern else []
        if self.sample_weights:
            digest = hashlib.sha256(json.dumps(sorted(self.sample_weights.items())).encode()).hexdigest()[:12]
            parts.append(f"weights:{digest}")
        return " ".join(parts)

    def _sample_weights(self) -> dict[tuple[int, int], np.ndarray]:
        """bucket -> sampling probability of each of its samples, from `balance_pattern` and `sample_weights`."""
        pattern = None
        if self.balance_pattern:
            try:
                pattern = re.compile(self.balance_pattern)
            except re.error as e:
                raise ValueError(f"`balance_pattern` {self.balance_pattern!r} is not a regular expression: {e}.") from e
            if not 0.0 <= self.balance_power <= 1.0:
                raise ValueError(f"`balance_power` must be in [0, 1], got {self.balance_power}.")
        files = {}
        for i in sorted({i for samples in self._samples.values() for i, _ in samples}):
            files[i] = self._shard(i)[2]["files"]
        table = self.sample_weights or {}
        if table and not any(f in table for names in files.values() for f in names):
            example = next(iter(files.values()))[0]
            raise ValueError(
                f"`sample_weights` names none of the cache's {self.num_samples} images (its keys look like "
                f"{next(iter(table))!r}, the cache's like {example!r}): list paths relative to the prepared folder."
            )
        weights = {}
        for bucket, samples in self._samples.items():
            names = [files[i][r] for i, r in samples]
            w = np.array([table.get(n, 1.0) for n in names], dtype=np.float64)
            if pattern is not None:
                keys = [pattern.sub("", Path(n).stem) for n in names]
                sizes = Counter(keys)
                w *= np.array([sizes[k] ** -self.balance_power for k in keys], dtype=np.float64)
            if w.sum() <= 0:
                raise ValueError(
                    f"`sample_weights` gives every image of bucket {bucket[0]}x{bucket[1]} weight 0, but a bucket "
                    "keeps its share of batches: give one of its images a weight > 0, or leave it out of the cache."
                )
            weights[bucket] = w / w.sum()
        return weights

    def _epoch_plan(self, epoch: int, counts_only: bool = False) -> list[tuple[tuple[int, int], list]]:
        """[(bucket, global batch of (shard, row))] for `epoch`; a pure function of (seed, epoch, settings)."""
        rng = np.random.default_rng([self.seed, epoch])
        size = self.batch_size * self.world_size
        plan = []
        for bucket in sorted(self._samples):
            samples = self._samples[bucket]
            if counts_only or not self.shuffle:
                order = np.arange(len(samples))
            elif self._weights is not None:  # balanced: as many draws as samples, groups evenly, with replacement
                order = rng.choice(len(samples), size=len(samples), replace=True, p=self._weights[bucket])
            else:
                order = rng.permutation(len(samples))
            full, rest = divmod(len(samples), size)
            for b in range(full):
                plan.append((bucket, [samples[i] for i in order[b * size : (b + 1) * size]]))
            if rest and not self.drop_last:
                # fill the last global batch with the bucket's first samples again (cycling for tiny buckets)
                idx = list(order[full * size :]) + [order[i % len(order)] for i in range(size - rest)]
                plan.append((bucket, [samples[i] for i in idx]))
        if self.shuffle and not counts_only:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _shard(self, i: int) -> tuple[Any, torch.Tensor, dict]:
        """(safetensors handle, caption_offsets, metadata) of shard i, keeping at most `max_open_shards` open."""
        from safetensors import safe_open

        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        handle = safe_open(str(self.cache_dir / self._shards[i]["file"]), framework="pt")
        entry = (handle, handle.get_tensor("caption_offsets"), json.loads(handle.metadata()["sdxs"]))
        self._open[i] = entry
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return entry

    def _make_batch(
        self,
        bucket: tuple[int, int],
        rows: list[tuple[int, int]],
        gen: torch.Generator,
        first_caption: bool = False,
        posterior: bool | None = None,
    ) -> dict:
        means, logvars, embeds, masks, keys, captions, lines = [], [], [], [], [], [], []
        img_embeds, img_masks = [], []
        for shard_i, row in rows:
            handle, offsets, meta = self._shard(shard_i)
            means.append(handle.get_slice("latents_mean")[row : row + 1])
            logvars.append(handle.get_slice("latents_logvar")[row : row + 1])
            # pick one of the image's captions: rows offsets[row]:offsets[row + 1] of embeds / mask
            first, end = int(offsets[row]), int(offsets[row + 1])
            k = first if first_caption else first + int(torch.randint(end - first, (1,), generator=gen))
            e, m = handle.get_slice("embeds")[k : k + 1], handle.get_slice("mask")[k : k + 1]
            e, m = pad_text(e.float(), m.long(), self.text_length)  # shards differ in trimmed length
            embeds.append(e)
            masks.append(m)
            if self.has_image_embeds:
                ie, im = handle.get_slice("image_embeds")[row : row + 1], handle.get_slice("image_mask")[row : row + 1]
                ie, im = pad_text(ie.float(), im.long(), self.text_length)
                img_embeds.append(ie)
                img_masks.append(im)
            keys.append(meta["files"][row])
            captions.append(meta["captions"][row][k - first])
            lines.append(meta["captions"][row])
        mean = torch.cat(means).float()  # (B, C, h, w)
        latents = mean
        posterior = self.sample_posterior if posterior is None else posterior
        if posterior:
            std = torch.exp(0.5 * torch.cat(logvars).float())
            latents = mean + std * torch.randn(mean.shape, generator=gen)
        embeds_t, mask_t = torch.cat(embeds), torch.cat(masks)  # (B, 1+L, D), (B, 1+L)
        if not self.pad_to_max_length:
            # cut the columns that are padding in every row (right padding: the tail; left padding: nothing)
            embeds_t, mask_t = pad_text(embeds_t, mask_t, int(mask_t.any(0).nonzero().max()) + 1)
        batch = {
            "latents": latents,
            "embeds": embeds_t,
            "mask": mask_t,
            "bucket": bucket,
            "keys": keys,
            "captions": captions,
            "caption_lines": lines,
        }
        if img_embeds:  # encode_image of each sample's own image, same layout as `embeds` (image prompts)
            ie, im = torch.cat(img_embeds), torch.cat(img_masks)
            if not self.pad_to_max_length:
                ie, im = pad_text(ie, im, int(im.any(0).nonzero().max()) + 1)
            batch["image_embeds"], batch["image_mask"] = ie, im
        return batch


def read_sample_weights(source: str | os.PathLike | dict[str, float]) -> dict[str, float]:
    """`{key: weight}` from a dict or a `.csv` / `.jsonl` file with `file_name` and `weight` columns.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the row of a bad one (a weight that is
    not a finite number >= 0, a missing column, a key listed twice)."""
    if isinstance(source, dict):
        rows, where = [{"file_name": k, "weight": v} for k, v in source.items()], "`sample_weights`"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"`sample_weights` file {str(path)!r} does not exist; pass a .csv or .jsonl with file_name,weight."
            )
        where = str(path)
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise ValueError(f"`sample_weights` {where!r} must be a .csv or .jsonl file with file_name,weight.")
        rows = read_rows(path)
    table: dict[str, float] = {}
    for n, row in enumerate(rows, start=1):
        if "file_name" not in row or "weight" not in row:
            raise ValueError(f"{where}, row {n}: needs `file_name` and `weight` columns, has {sorted(row)}.")
        key = str(row["file_name"])
        try:
            weight = float(row["weight"])
        except (TypeError, ValueError):
            weight = float("nan")
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}, row {n} ({key!r}): weight must be a number >= 0, got {row['weight']!r}.")
        if key in table:
            raise ValueError(f"{where}, row {n}: {key!r} is listed twice.")
        table[key] = weight
    if not table:
        raise ValueError(f"{where} lists no image: give one file_name,weight row per image to reweight.")
    return table
