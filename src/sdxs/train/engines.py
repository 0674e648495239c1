"""Which of accelerate's engines `sdxs train` runs under: DDP (and one process) yes; FSDP, DeepSpeed and Megatron-LM
are refused before anything is built, with the reason and what to use instead (docs/scale.md)."""

from __future__ import annotations

import os

# what `accelerate launch` sets for each engine (accelerate/commands/launch.py), whatever the device turns out to be
_ENGINE_ENV = {
    "FSDP": "ACCELERATE_USE_FSDP",
    "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED",
    "MEGATRON_LM": "ACCELERATE_USE_MEGATRON_LM",
}


def requested_engine() -> str | None:
    """The sharded engine `accelerate launch` was asked for (its config file or flags), if any."""
    return next((name for name, var in _ENGINE_ENV.items() if os.environ.get(var, "").lower() in ("1", "true")), None)


def refuse_sharded_engines(engine: str) -> None:
    """Sharded engines are refused: checkpoints save the main process's optimizer state and unwrapped weights and the
    EMA is a full copy per rank (right for DDP, where every rank holds everything, wrong for sharded training), and
    FSDP cannot be tested on our CPU-only machines (accelerate selects FSDP for GPU launches only). docs/scale.md."""
    if engine not in _ENGINE_ENV:
        return
    raise ValueError(
        f"`accelerate launch` with {engine} is not supported by sdxs train yet: its checkpoints and EMA assume every "
        "rank holds the full model and optimizer, and sharded checkpoints (accelerate save_state/load_state) are not "
        "wired in. Use DDP (`accelerate launch --config_file configs/accelerate/ddp.yaml` or `--multi_gpu`): "
        "sdxs-1b fits a 24 GB GPU with 8-bit Adam and gradient checkpointing without EMA (docs/scale.md)."
    )
