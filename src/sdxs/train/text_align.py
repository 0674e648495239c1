"""Teach the text encoder the ways people phrase the captions, through the frozen UNet (`sdxs train text-align`).

A model trained on exact captions answers only those strings: other phrasings of the same request ("a penguin",
"Penguin", "penguin icon") give text states the UNet never learnt. This trainer changes the text encoder so that
they give what the caption gave, measured where it matters, in the UNet's output. For a cached training image
(latent x0 and its caption's embedding T(C) from `sdxs prepare`, made with this model's text encoder) and the prompt P
the loader hands out (`[captions]`: a training-template rewrite of C, or C itself), at a random noise level s:

    loss = w * || UNet(x_s, s, S(P)) - UNet(x_s, s, T(C)) ||^2       (UNet frozen; S = the text encoder trained)

The target is the model's own prediction for the exact caption, not the noisy flow-matching velocity, so every sample
says precisely "draw for P what you drew for C". Three anchors keep what the model already does: samples whose prompt
is the exact caption (weight `align.anchor_weight`), one empty prompt per batch (CFG's unconditional branch,
`align.empty_weight`) and a few image prompts per batch (`encode_image` of the sample's image against the cached
image embedding, `align.image_prompts`). Only the decoder layers below the recipe's `hidden_layer` are trained (and,
with `model.train_embeddings`, the token-embedding rows less the special tokens); the layers above it, the final
norm and the vision tower are untouched.

`align.objective = "attention"` measures the same thing one step earlier, where the UNet reads the text: in each
cross-attention layer, attn(q, S(P)) against attn(q, T(C)) for the queries q the UNet computed on the sample's own
image (cached once at the start, `align.query_draws` noise levels per image). No UNet forward or backward per sample:
~3x the samples per second on the CPU, and on the emoji model more robustness per sample than the whole-UNet loss
(docs/experiments-log.md, "v3, sixteenth sitting").

    sdxs prepare DATA CACHE --model MODEL --image-embeds
    sdxs train text-align --config configs/emoji/text-align.toml model.pretrained=MODEL data.path=CACHE
    sdxs export RUN OUT           # MODEL with the trained text encoder
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sdxs.model_folder import export_run, load_base_pipeline
from sdxs.train.common import Task, fit, make_accelerator
from sdxs.train.config import TextAlignTrainConfig
from sdxs.train.unet import Endless, flow_matching_pair, latent_loader

logger = logging.getLogger("sdxs.train")


class PromptEncoder(torch.nn.Module):
    """The pipeline's text and image conditioning as one module (one forward per step, as DDP wants)."""

    def __init__(self, text_encoder, tokenizer, vision_processor, recipe: dict):
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer, self.vision_processor, self.recipe = tokenizer, vision_processor, dict(recipe)

    def forward(self, prompts: list[str], images: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (B + N, 1 + L, D), mask): `encode_text` of the prompts, then `encode_images` of the images,
        trimmed to the longest real length."""
        from sdxs.pipeline import encode_images, encode_text

        parts = [encode_text(self.text_encoder, self.tokenizer, list(prompts), self.recipe)]
        if images:
            parts.append(encode_images(self.text_encoder, self.tokenizer, self.vision_processor, images, self.recipe))
        return cat_text(parts)


def cat_text(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (embeds, mask) pairs along the batch, all trimmed or zero-padded to the longest real length."""
    from sdxs.data.loader import pad_text

    n = max(int(m.sum(1).max()) for _, m in parts if len(m))
    parts = [pad_text(e, m, n) for e, m in parts]
    return torch.cat([e.float() for e, _ in parts]), torch.cat([m.long() for _, m in parts])


def select_trainable(
    text_encoder, hidden_layer: int, train_layers: int, special_ids: list[int], embeddings: bool = False
) -> str:
    """Freeze all but the lowest decoder layers (and with `embeddings` the token embeddings, whose special-token rows
    get no gradient).

    `train_layers` -1: every layer below `hidden_layer` (the ones the UNet reads), else that many from the bottom.
    Returns a one-line description."""
    lm = text_encoder.model.language_model
    n_total = len(lm.layers)
    feeding = n_total + hidden_layer + 1 if hidden_layer < 0 else hidden_layer  # hidden_states[0] = embeddings
    n = feeding if train_layers < 0 else train_layers
    if not 0 <= n <= n_total:
        raise ValueError(f"`model.train_layers` must be -1 or in [0, {n_total}], got {train_layers}.")
    text_encoder.requires_grad_(False)
    what = []
    if embeddings:
        emb = lm.embed_tokens.weight
        emb.requires_grad_(True)
        if special_ids:
            rows = torch.tensor(sorted(special_ids), device=emb.device)
            emb.register_hook(lambda g: g.index_fill(0, rows.to(g.device), 0))
        what.append(f"token embeddings (less {len(special_ids)} special rows)")
    for layer in lm.layers[:n]:
        layer.requires_grad_(True)
    if n:
        what.append(f"decoder layers 0-{n - 1}")
    count = sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)
    if not count:
        raise ValueError("nothing to train: set `model.train_layers` > 0 or `model.train_embeddings = true`.")
    return f"{' + '.join(what)}, {count / 1e6:.2f}M parameters"


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special and added tokens (pad, vision markers, chat markers)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return sorted(i for i in ids if i is not None and i >= 0)


def noisy_latents(latents: torch.Tensor, min_sigma: float, generator: torch.Generator):
    """(x_s, timesteps) at noise levels drawn uniformly in [min_sigma, 1], one per latent (sigmas, then noise)."""
    from sdxs.pipeline import sigma_to_timestep

    sigmas = min_sigma + (1 - min_sigma) * torch.rand(len(latents), generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    return flow_matching_pair(latents, noise, sigmas)[0], sigma_to_timestep(sigmas)


class CrossAttentionProbe:
    """The frozen UNet's cross-attention layers with the queries each cached image gave them (`align.objective`
    "attention").

    The UNet reads text in its cross-attention layers only: attn2(q, S(P)) against attn2(q, T(C)) on the queries q the
    UNet computed for the sample's own image (at `draws` noise levels per image, cached once) is the text's whole effect
    on each layer, without a UNet forward and backward per sample. Each layer's error is divided by how far apart its
    outputs are for different captions (measured on the first batch), so every layer counts by how much it tells
    prompts apart."""

    def __init__(
        self,
        unet,
        loader,
        draws: int,
        min_sigma: float,
        batch_size: int = 64,
        show: bool = True,
        cache: Path | None = None,
    ):
        from diffusers.models.attention import BasicTransformerBlock

        if draws < 1:
            raise ValueError(f"`align.query_draws` must be >= 1, got {draws}.")
        self.layers = [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None]
        if not self.layers:
            raise ValueError('the UNet has no cross-attention layers: `align.objective = "attention"` needs them.')
        self.draws = draws
        # what the queries depend on: a run that resumes with the same ones reads them back instead of recording
        stamp = {
            "draws": draws,
            "min_sigma": min_sigma,
            "batch_size": batch_size,
            "seed": loader.seed,
            "cache": str(Path(loader.cache_dir).resolve()),
            "samples": loader.num_samples,
            "unet": [round(float(layer.to_k.weight.double().sum()), 6) for layer in self.layers],
        }
        if cache is not None and self._load(cache, stamp):
            logger.info("cross-attention queries read from %s", cache)
            return
        self._record(unet, loader, draws, min_sigma, batch_size, show)
        if cache is not None:
            from sdxs.data.shards import atomic_save

            tensors = {f"queries.{i}": q for i, q in enumerate(self.queries)}
            tensors["scales"] = torch.tensor(self.scales, dtype=torch.float64)
            keys = sorted(self.index, key=self.index.get)
            atomic_save(tensors, cache, {**stamp, "keys": keys})

    def _load(self, path: Path, stamp: dict) -> bool:
        """Read queries saved by a run with the same `stamp`; False (and record anew) when there are none or they
        were made from something else."""
        from safetensors.torch import load_file

        from sdxs.data.shards import read_shard_meta

        meta = read_shard_meta(path) if path.is_file() else None
        if not meta or {k: meta.get(k) for k in stamp} != stamp:
            return False
        tensors = load_file(str(path))
        self.queries = [tensors[f"queries.{i}"] for i in range(len(self.layers))]
        self.scales = [float(v) for v in tensors["scales"]]
        self.index = {key: i for i, key in enumerate(meta["keys"])}
        return True

    def _record(self, unet, loader, draws: int, min_sigma: float, batch_size: int, show: bool) -> None:
        from tqdm.auto import tqdm

        device = next(unet.parameters()).device
        seen: dict[int, torch.Tensor] = {}  # layer index -> its query input of the last forward

        def keep(i):
            return lambda _module, args: seen.__setitem__(i, args[0].detach().half().cpu())

        hooks = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(self.layers)]
        gen = torch.Generator(device=device).manual_seed(loader.seed)
        keys, per_layer = [], [[] for _ in self.layers]  # per layer: [(B, draws, positions, channels)]
        self.scales = None
        try:
            bar = tqdm(total=loader.num_samples, desc="cross-attention queries", disable=not show)
            for batch in loader.iter_samples(batch_size):
                latents = batch["latents"].to(device, torch.float32)
                emb, mask = batch["embeds"].to(device).float(), batch["mask"].to(device)
                draws_of_batch = [[] for _ in self.layers]
                for _ in range(draws):
                    x, timesteps = noisy_latents(latents, min_sigma, gen)
                    seen.clear()
                    with torch.no_grad():
                        unet(x, timesteps, encoder_hidden_states=emb, encoder_attention_mask=mask)
                    for i in range(len(self.layers)):
                        draws_of_batch[i].append(seen[i])
                for i, qs in enumerate(draws_of_batch):
                    per_layer[i].append(torch.stack(qs, 1))
                if self.scales is None:  # how far apart each layer's outputs are for different captions
                    self.scales = [
                        float(self._spread(layer, q[:, 0].to(device).float(), emb, mask))
                        for layer, q in zip(self.layers, (p[-1] for p in per_layer), strict=True)
                    ]
                keys.extend(batch["keys"])
                bar.update(len(latents))
            bar.close()
        finally:
            for h in hooks:
                h.remove()
        self.queries = [torch.cat(p) for p in per_layer]
        self.index = {key: i for i, key in enumerate(keys)}

    @staticmethod
    def _bias(mask: torch.Tensor) -> torch.Tensor:
        return ((1 - mask.float()) * -10000.0).unsqueeze(1)  # as UNet2DConditionModel turns the mask into a bias

    def _spread(self, layer, queries, emb, mask) -> torch.Tensor:
        with torch.no_grad():
            out = layer(queries, encoder_hidden_states=emb, attention_mask=self._bias(mask))
        return (out - out.mean(0, keepdim=True)).pow(2).mean().clamp_min(1e-12)

    def __call__(self, keys, s_emb, s_mask, t_emb, t_mask, generator, groups=()) -> torch.Tensor:
        """Per-sample error (B,) of the student embeddings against the teacher's, over every cross-attention layer.

        `groups`: row indices where the batch splits into parts of very different lengths (text prompts, image
        prompts); each part is trimmed to its own longest real length (the same result under the mask, cheaper)."""
        idx = torch.tensor([self.index[k] for k in keys])
        draw = torch.randint(self.draws, (len(idx),), generator=generator, device=generator.device).cpu()
        bounds = [0, *groups, len(idx)]
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi <= lo:
                continue
            n = int((s_mask[lo:hi].bool() | t_mask[lo:hi].bool()).any(0).nonzero().max()) + 1
            parts.append(
                self._error(
                    idx[lo:hi], draw[lo:hi], s_emb[lo:hi, :n], s_mask[lo:hi, :n], t_emb[lo:hi, :n], t_mask[lo:hi, :n]
                )
            )
        return torch.cat(parts)

    def _error(self, idx, draw, s_emb, s_mask, t_emb, t_mask) -> torch.Tensor:
        device = s_emb.device
        s_bias, t_bias = self._bias(s_mask), self._bias(t_mask)
        total = torch.zeros(len(idx), device=device)
        for layer, queries, scale in zip(self.layers, self.queries, self.scales, strict=True):
            q = queries[idx, draw].to(device).float()
            with torch.no_grad():
                target = layer(q, encoder_hidden_states=t_emb, attention_mask=t_bias)
            pred = layer(q, encoder_hidden_states=s_emb, attention_mask=s_bias)
            total = total + (pred - target).pow(2).mean(dim=(1, 2)) / scale
        return total / len(self.layers)


def image_source(cfg: TextAlignTrainConfig, loader) -> Path | None:
    """The folder of the cached images (for image-prompt anchors): `align.image_folder` or the cache's source."""
    if cfg.align.image_prompts <= 0:
        return None
    if not loader.has_image_embeds:
        raise ValueError(
            f"`align.image_prompts` is {cfg.align.image_prompts} but the latent cache {cfg.data.path!r} holds no image "
            "embeddings: make it with `sdxs prepare ... --image-embeds` (or set align.image_prompts=0)."
        )
    folder = Path(cfg.align.image_folder or loader.manifest.get("source", ""))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the images of {cfg.data.path!r} are not at {str(folder)!r}: set `align.image_folder` to the folder "
            "`sdxs prepare` read (or align.image_prompts=0)."
        )
    return folder


def text_align_task(cfg: TextAlignTrainConfig, base, accelerator) -> Task:
    """The Task: a `PromptEncoder` around `base.text_encoder` (partly trainable), the frozen UNet in the loss."""
    from sdxs.data.loader import pad_text
    from sdxs.pipeline import load_rgb_image

    if not cfg.model.pretrained:
        raise ValueError("`model.pretrained` is required: the model whose text encoder is trained (and its UNet).")
    if cfg.captions.probability <= 0:
        raise ValueError(
            "`captions.probability` must be > 0: the rewrites of the captions are what the text encoder learns "
            "(with 0 every prompt is the exact caption and there is nothing to learn)."
        )
    a = cfg.align
    if not 0.0 <= a.min_sigma < 1.0:
        raise ValueError(f"`align.min_sigma` must be in [0, 1), got {a.min_sigma}.")
    if a.anchor_weight < 0 or a.empty_weight < 0:
        raise ValueError("`align.anchor_weight` and `align.empty_weight` must be >= 0.")
    if base.text_encoder is None or base.unet is None:
        raise ValueError(f"{cfg.model.pretrained!r} needs both a text encoder and a UNet for `sdxs train text-align`.")
    loader = latent_loader(cfg, accelerator)
    loader.check_fingerprint(base)  # the cached embeddings are the targets: they must be this text encoder's
    if cfg.model.tokenizer:  # the text encoder learns to read a new tokenizer (the targets stay the old one's)
        from transformers import AutoTokenizer

        if not Path(cfg.model.tokenizer, "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"`model.tokenizer` {cfg.model.tokenizer!r} holds no tokenizer_config.json (a tokenizer folder, e.g. "
                "MODEL/tokenizer of `sdxs init --text-normalization ...`)."
            )
        new_tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
        if new_tokenizer.get_vocab() != base.tokenizer.get_vocab():
            raise ValueError(
                f"`model.tokenizer` {cfg.model.tokenizer!r} has another vocabulary than {cfg.model.pretrained!r}'s: "
                "only a tokenizer with the same tokens read another way (a normaliser, a prefix space) can be learnt."
            )
        base.register_modules(tokenizer=new_tokenizer)
    images_dir = image_source(cfg, loader)
    background = tuple(loader.manifest.get("options", {}).get("background", (255, 255, 255)))  # as prepare saw them
    recipe = base.config.text_recipe
    te = base.text_encoder.float().to(accelerator.device)
    described = select_trainable(
        te,
        int(recipe["hidden_layer"]),
        cfg.model.train_layers,
        special_token_ids(base.tokenizer),
        embeddings=cfg.model.train_embeddings,
    )
    te.train()
    model = PromptEncoder(te, base.tokenizer, base.vision_processor, recipe)
    unet = base.unet.float().to(accelerator.device).eval().requires_grad_(False)
    if a.objective not in ("unet", "attention"):
        raise ValueError(f'`align.objective` must be "unet" or "attention", got {a.objective!r}.')
    probe = None
    if a.objective == "attention":
        # saved in the run folder, one file per rank (each records its own share of the data): a resume reads it back
        cache = Path(cfg.run.output_dir) / f"attention-queries.rank{accelerator.process_index}.safetensors"
        probe = CrossAttentionProbe(
            unet, loader, a.query_draws, a.min_sigma, show=accelerator.is_main_process, cache=cache
        )
    empty = loader.empty_prompt()  # (1, 1+L, D): the cache's empty prompt, CFG's unconditional branch
    if accelerator.is_main_process:
        logger.info(
            "text-align: %s; %.0f%% of prompts rewritten, anchors x%g, empty prompt x%g, %d image prompt(s) per "
            "batch; %d samples",
            described,
            100 * cfg.captions.probability,
            a.anchor_weight,
            a.empty_weight,
            a.image_prompts if images_dir else 0,
            loader.num_samples,
        )

    def loss_fn(model, batch, generator):
        device = generator.device
        prompts = list(batch.get("prompts", batch["captions"]))
        b = len(prompts)
        exact = torch.tensor([p == c for p, c in zip(prompts, batch["captions"], strict=True)], device=device)
        teacher = [(batch["embeds"].float(), batch["mask"])]
        if a.empty_weight > 0:  # the first sample asks for nothing: its target is the cache's empty prompt
            prompts[0] = ""
            e, m = cat_text([teacher[0], empty])  # the b captions, then the empty prompt last
            teacher = [(torch.cat([e[-1:], e[1:b]]), torch.cat([m[-1:], m[1:b]]))]
        k = min(a.image_prompts, b) if images_dir else 0
        images = [load_rgb_image(images_dir / key, background=background) for key in batch["keys"][:k]]
        if k:
            teacher.append((batch["image_embeds"][:k].float(), batch["image_mask"][:k]))
        t_emb, t_mask = cat_text(teacher)
        s_emb, s_mask = model(prompts, images)
        n = max(t_emb.shape[1], s_emb.shape[1])
        t_emb, t_mask = pad_text(t_emb.to(device), t_mask.to(device), n)
        s_emb, s_mask = pad_text(s_emb, s_mask, n)
        if probe is not None:
            keys = list(batch["keys"]) + list(batch["keys"][:k])
            per = probe(keys, s_emb, s_mask, t_emb, t_mask, generator, groups=(b,))  # (B + k,)
        else:
            latents = batch["latents"].to(device, torch.float32)
            noisy, timesteps = noisy_latents(torch.cat([latents, latents[:k]]), a.min_sigma, generator)
            with torch.no_grad():
                target = unet(noisy, timesteps, encoder_hidden_states=t_emb, encoder_attention_mask=t_mask).sample
            pred = unet(noisy, timesteps, encoder_hidden_states=s_emb, encoder_attention_mask=s_mask).sample
            per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B + k,)
        weight = torch.ones_like(per)
        weight[:b][exact] = a.anchor_weight
        weight[b:] = a.anchor_weight
        if a.empty_weight > 0:
            weight[0] = a.empty_weight
        loss = (weight * per).sum() / weight.sum()
        rewritten = ~exact
        if a.empty_weight > 0:
            rewritten[0] = False
        per = per.detach()
        logs = {"rewrite": float(per[:b][rewritten].mean()) if rewritten.any() else 0.0}
        anchored = per[:b][exact & (torch.arange(b, device=device) >= int(a.empty_weight > 0))]
        logs["caption"] = float(anchored.mean()) if len(anchored) else 0.0
        if k:
            logs["image"] = float(per[b:].mean())
        return loss, logs

    def save(encoder, folder: Path) -> None:
        encoder.save_pretrained(folder, safe_serialization=True)
        base.tokenizer.save_pretrained(folder.parent / "tokenizer")  # export finds it beside the text encoder
        if base.vision_processor is not None:
            base.vision_processor.save_pretrained(folder.parent / "vision_processor")

    return Task(
        name="text_encoder",
        model=model,
        loss_fn=loss_fn,
        data=Endless(loader),
        batch_size=cfg.data.batch_size,
        save_model=save,
        inner=lambda m: m.text_encoder,
        export_fn=lambda run_dir: export_run(run_dir, Path(run_dir) / "export"),
    )


def train_text_align(cfg: TextAlignTrainConfig, resume: str | None = None) -> Path:
    """Train `cfg.model.pretrained`'s text encoder through its frozen UNet on the latent cache `cfg.data.path`."""
    accelerator = make_accelerator(cfg.run)
    base = load_base_pipeline(cfg.model.pretrained)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return fit(text_align_task(cfg, base, accelerator), cfg, resume=resume, accelerator=accelerator)
