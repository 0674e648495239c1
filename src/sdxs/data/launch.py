"""`sdxs prepare` under `accelerate launch` (or torchrun, mpirun): each rank makes one part, the last one merges.

    accelerate launch --num_processes 8 -m sdxs prepare SRC OUT --model MODEL

Rank and world size come from the launcher's environment, read as accelerate reads it (`RANK` / `WORLD_SIZE`, or
the MPI names), and become `--shard-index` / `--num-shards`. The ranks never talk to each other: no process group
is made, so a rank that dies (kill -9, a lost node) cannot hang the others. Each rank writes its partial manifest;
the rank that finds all N partial manifests after writing its own merges them into manifest.json (two ranks
finishing together both merge, to the same file, each with an atomic write). After a crash, the same command
again resumes every part from its finished shards and the last rank merges; `sdxs data merge OUT` also works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdxs.data.manifest import merge

RANK_ENV = ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"]
WORLD_ENV = ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"]
LOCAL_RANK_ENV = ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"]


def launched_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by a multi-process launcher, else None."""
    from accelerate.utils import get_int_from_env

    world = get_int_from_env(WORLD_ENV, 1)
    if world <= 1:
        return None
    return get_int_from_env(RANK_ENV, 0), world, get_int_from_env(LOCAL_RANK_ENV, 0)


def rank_device(local_rank: int) -> torch.device:
    """This rank's accelerator (`cuda:LOCAL_RANK`), or the CPU where there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def merge_if_complete(out: str | Path, num_shards: int) -> dict[str, Any] | None:
    """Merge the parts in `out` into manifest.json when all `num_shards` are there -> the manifest, else None."""
    parts = list(Path(out).glob(f"manifest.*-of-{num_shards:03d}.json"))
    return merge(out) if len(parts) == num_shards else None
