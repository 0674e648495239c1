"""UNet training with flow matching on a latent cache (`sdxs train unet`).

The convention is the pipeline's, through its shared helpers: a clean latent x0 and noise e at level s give
x_s = (1 - s) x0 + s e; the UNet sees timestep s * 1000 and predicts the velocity e - x0; noise levels are drawn
uniform or logit-normal and then shifted with `shift_sigmas(s, scheduler.config.shift)`, the same shift the
scheduler applies at inference. One Euler step x0 = x_s - s * v undoes it exactly (tests/test_train_unet.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from sdxs.grid import make_grid
from sdxs.model_folder import export_run, load_base_pipeline
from sdxs.pipeline import shift_sigmas, sigma_to_timestep
from sdxs.train.common import Task, fit, load_matching, log_load_report, make_accelerator, read_weights
from sdxs.train.config import FlowConfig, SampleConfig, UNetTrainConfig

logger = logging.getLogger("sdxs.train")


# ----------------------------------------------------------------------------------------------------------------
# Flow matching
# ----------------------------------------------------------------------------------------------------------------


def sample_sigmas(n: int, flow: FlowConfig, shift: float, generator: torch.Generator, device) -> torch.Tensor:
    """n noise levels in (0, 1): uniform or logit-normal, then the inference shift. (n,) float32."""
    if flow.timestep_sampling == "uniform":
        s = torch.rand(n, generator=generator, device=device)
    elif flow.timestep_sampling == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device) * flow.logit_std + flow.logit_mean)
    else:
        raise ValueError(
            f"`flow.timestep_sampling` must be 'uniform' or 'logit_normal', got {flow.timestep_sampling!r}."
        )
    return shift_sigmas(s, shift)


def flow_matching_pair(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor):
    """(x_s, target): x_s = (1 - s) x0 + s e and the velocity e - x0 the UNet learns. latents/noise (B, C, h, w)."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents


def drop_captions(embeds, mask, empty_embeds, empty_mask, p: float, generator: torch.Generator):
    """Replace each sample's text by the cached empty prompt with probability p (what CFG's unconditional branch sees)."""
    # batches are trimmed to their longest caption: bring both to the same token count (zero padding is masked)
    n = max(embeds.shape[1], int(empty_mask.sum()))
    return _replace_text(embeds, mask, empty_embeds, empty_mask, n, p, generator)[:2]


def use_image_prompts(
    embeds, mask, image_embeds, image_mask, p: float, generator: torch.Generator, return_pick: bool = False
):
    """Replace each sample's caption embedding by its image's encode_image embedding with probability p.

    Returns `(embeds, mask)`, and with `return_pick=True` also the (B,) bool of the samples that were swapped."""
    n = max(embeds.shape[1], image_embeds.shape[1])
    embeds, mask, pick = _replace_text(embeds, mask, image_embeds, image_mask, n, p, generator)
    return (embeds, mask, pick) if return_pick else (embeds, mask)


def _replace_text(embeds, mask, other_embeds, other_mask, n: int, p: float, generator: torch.Generator):
    """Both brought to `n` tokens (zero padding is masked), then each sample's text replaced by `other` with
    probability p. embeds (B, L, D), mask (B, L); other (1 or B, L', D). Returns embeds, mask and the (B,) pick."""
    from sdxs.data.loader import pad_text

    embeds, mask = pad_text(embeds, mask, n)
    other_embeds, other_mask = pad_text(other_embeds, other_mask, n)
    pick = torch.rand(embeds.shape[0], generator=generator, device=embeds.device) < p  # (B,)
    embeds = torch.where(pick[:, None, None], other_embeds.to(embeds), embeds)
    mask = torch.where(pick[:, None], other_mask.to(mask), mask)
    return embeds, mask, pick


def flow_matching_loss(
    unet,
    batch: dict,
    empty: tuple[torch.Tensor, torch.Tensor],
    flow: FlowConfig,
    shift: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE between the UNet's velocity and e - x0 for one batch {latents (B,C,h,w), embeds (B,1+L,D), mask (B,1+L)}."""
    device = generator.device
    latents = batch["latents"].to(device, torch.float32)
    embeds, mask = batch["embeds"].to(device), batch["mask"].to(device)
    image_pick = None
    if flow.image_prompt_fraction > 0:  # no extra random draw otherwise: older runs resume bit-identically
        if "image_embeds" not in batch:
            raise ValueError(
                "`flow.image_prompt_fraction` > 0 needs a latent cache made with `sdxs prepare --image-embeds`."
            )
        embeds, mask, image_pick = use_image_prompts(
            embeds,
            mask,
            batch["image_embeds"].to(device),
            batch["image_mask"].to(device),
            flow.image_prompt_fraction,
            generator,
            return_pick=True,
        )
    embeds, mask = drop_captions(
        embeds, mask, empty[0].to(device), empty[1].to(device), flow.caption_dropout, generator
    )
    sigmas = sample_sigmas(latents.shape[0], flow, shift, generator, device)  # (B,)
    if image_pick is not None and flow.image_prompt_min_sigma > 0:
        # image prompts only where a prompt decides the picture: [0, 1] mapped onto [min, 1] (no extra random draw)
        m = flow.image_prompt_min_sigma
        sigmas = torch.where(image_pick, m + (1 - m) * sigmas, sigmas)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    noisy, target = flow_matching_pair(latents, noise, sigmas)
    pred = unet(noisy, sigma_to_timestep(sigmas), encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
    loss = F.mse_loss(pred.float(), target)
    return loss, {}


# ----------------------------------------------------------------------------------------------------------------
# Model, data, samples
# ----------------------------------------------------------------------------------------------------------------


def build_unet(cfg: UNetTrainConfig, base):
    """A fresh preset UNet (seeded as every fresh component is), or the base pipeline's; then every matching tensor
    of `model.init_from`."""
    from diffusers import UNet2DConditionModel

    from sdxs.presets import fresh_component, get_preset

    m = cfg.model
    if m.unet_preset:
        unet = fresh_component(  # the preset's shape, fitted to this model's text and latent spaces
            get_preset(m.unet_preset),
            "unet",
            cfg.run.seed,
            text_hidden_size=_text_hidden_size(base.text_encoder),
            latent_channels=int(base.vae.config.latent_channels),
        )
        source = f"preset {m.unet_preset!r} (random init, seed {cfg.run.seed})"
    else:
        unet = UNet2DConditionModel.from_config(base.unet.config)
        unet.load_state_dict(base.unet.state_dict())
        source = f"{m.pretrained}/unet"
    logger.info("UNet from %s: %.2fM parameters", source, sum(p.numel() for p in unet.parameters()) / 1e6)
    if m.init_from:
        folder = Path(m.init_from)
        folder = folder / "unet" if (folder / "unet").is_dir() else folder
        log_load_report(load_matching(unet, read_weights(folder)), str(folder))
    return unet.float().train()


def _text_hidden_size(text_encoder) -> int:
    cfg = text_encoder.config
    return getattr(cfg, "text_config", cfg).hidden_size


class Endless:
    """Make a per-epoch `LatentShardLoader` yield forever; its state is the position of the next batch."""

    def __init__(self, loader):
        self.loader, self._it = loader, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):  # at most one empty tail of an epoch between batches
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the latent loader yields no batches.")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict, replan: bool = False) -> None:
        self.loader.load_state_dict(state, replan)
        self._it = None


def text_encoder_fn(base, device):
    """fn(prompts) -> (embeds (B, 1+T, D), mask (B, 1+T)) from the base pipeline's frozen text encoder, trimmed to
    the batch's longest prompt (what the cache-reading loader yields with `pad_to_max_length=False`)."""
    from sdxs.data.loader import pad_text
    from sdxs.pipeline import encode_text

    te = base.text_encoder.to(device).eval().requires_grad_(False)
    recipe = base.config.text_recipe

    @torch.no_grad()
    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = encode_text(te, base.tokenizer, list(prompts), recipe, device=device, dtype=torch.float32)
        return pad_text(embeds, mask, int(mask.any(0).nonzero().max()) + 1)

    return encode


def make_sampler(base, sample: SampleConfig, device):
    """fn(unet, png_path): the fixed prompts and seeds through the real SDXSPipeline, pasted into one grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdxs.pipeline import SDXSPipeline

    if not sample.prompts:
        return None

    def write_grid(unet, path: Path) -> None:
        was_training = unet.training
        base.vae.to(device)
        base.text_encoder.to(device)
        # the base pipeline with the model under training and a fresh scheduler (its step state is per call)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(base.scheduler.config)
        pipe = SDXSPipeline.from_pipe(base, unet=unet.eval(), scheduler=scheduler, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            sample.prompts,
            num_inference_steps=sample.steps,
            guidance_scale=sample.guidance_scale,
            seed=sample.seed,
            width=sample.width or None,
            height=sample.height or None,
        ).images
        make_grid(images, sample.prompts, columns=min(4, len(images))).save(path)
        unet.train(was_training)

    return write_grid


def save_unet(unet, folder: Path) -> None:
    unet.save_pretrained(folder, safe_serialization=True)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def train_unet(cfg: UNetTrainConfig, resume: str | None = None) -> Path:
    """Train the UNet of `cfg.model.pretrained`'s pipeline on the latent cache `cfg.data.path`; returns the final checkpoint."""
    accelerator = make_accelerator(cfg.run)
    base = load_base_pipeline(cfg.model.pretrained)
    unet = build_unet(cfg, base)
    return fit(unet_task(cfg, base, unet, accelerator), cfg, resume=resume, accelerator=accelerator)


def latent_loader(cfg, accelerator):
    """This rank's `LatentShardLoader` of the cache `cfg.data.path` (the `data` and `captions` sections)."""
    from sdxs.data.loader import LatentShardLoader

    if not cfg.data.path:
        raise ValueError("`data.path` is required: the latent cache written by `sdxs prepare`.")
    return LatentShardLoader(
        cfg.data.path,
        cfg.data.batch_size,
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        sample_posterior=cfg.data.sample_posterior,
        pad_to_max_length=False,  # trim each batch to its longest caption: same result under the mask, less compute
        balance_pattern=cfg.data.balance_pattern,
        balance_power=cfg.data.balance_power,
        sample_weights=cfg.data.sample_weights or None,
        caption_augment=getattr(cfg, "captions", None),
    )


def unet_task(cfg, base, unet, accelerator) -> Task:
    """The flow-matching Task for `unet` on the latent cache `cfg.data.path` (shared with the LoRA trainer).

    `cfg` needs the `run`, `data`, `flow` and `sample` sections of `UNetTrainConfig`."""
    loader = latent_loader(cfg, accelerator)
    loader.check_fingerprint(base)  # latents and embeddings must come from this VAE / text encoder / recipe
    encode = None
    if loader.augmenter is not None or getattr(cfg.data, "text_on_the_fly", False):
        encode = text_encoder_fn(base, accelerator.device)
        empty = encode([""])
    else:
        empty = loader.empty_prompt()  # (1, 1+L, D), (1, 1+L)
    if not 0.0 <= cfg.flow.image_prompt_min_sigma < 1.0:
        raise ValueError(
            f"`flow.image_prompt_min_sigma` must be in [0, 1), got {cfg.flow.image_prompt_min_sigma}: image-prompt "
            "samples draw their noise level from [min, 1] (0: the same levels as captions)."
        )
    if cfg.flow.image_prompt_fraction > 0 and not loader.has_image_embeds:
        raise ValueError(
            f"`flow.image_prompt_fraction` is {cfg.flow.image_prompt_fraction} but the latent cache {cfg.data.path!r} "
            "holds no image embeddings: make it with `sdxs prepare ... --image-embeds` (or set the fraction to 0)."
        )
    shift = cfg.flow.shift or float(base.scheduler.config.shift)
    if accelerator.is_main_process:
        logger.info(
            "flow matching: %s sigmas, shift %.3g, caption dropout %.0f%%, image prompts %.0f%% (sigma >= %g); "
            "%d samples in %d bucket(s)",
            cfg.flow.timestep_sampling,
            shift,
            100 * cfg.flow.caption_dropout,
            100 * cfg.flow.image_prompt_fraction,
            cfg.flow.image_prompt_min_sigma,
            loader.num_samples,
            len(loader.buckets),
        )
        if loader.sample_weights:
            w = loader.sample_weights
            logger.info(
                "sample weights from %s: %d images listed, weights %g-%g (unlisted images weigh 1)",
                cfg.data.sample_weights,
                len(w),
                min(w.values()),
                max(w.values()),
            )

    def loss_fn(model, batch, generator):
        if encode is not None:  # the captions (or their rewrites) through the frozen text encoder, now
            batch = {**batch}
            batch["embeds"], batch["mask"] = encode(batch.get("prompts", batch["captions"]))
        return flow_matching_loss(model, batch, empty, cfg.flow, shift, generator)

    return Task(
        name="unet",
        model=unet,
        loss_fn=loss_fn,
        data=Endless(loader),
        batch_size=cfg.data.batch_size,
        save_model=save_unet,
        sample_fn=make_sampler(base, cfg.sample, accelerator.device) if accelerator.is_main_process else None,
        export_fn=lambda run_dir: export_run(run_dir, run_dir / "export"),
    )
