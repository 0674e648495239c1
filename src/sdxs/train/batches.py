"""`IndexBatches`: the batch sampler of the trainers whose data sit in memory (VAE, text encoder)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class IndexBatches:
    """Endless, seeded, rank-split batches of indices into a small in-memory dataset, resumable by (epoch, position).

    Used by the VAE and text-encoder trainers, whose data are image/caption folders rather than latent shards.
    Every epoch is one permutation (seed + epoch) shared by all ranks; rank r takes every world-th batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the dataset is empty.")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0  # position: batches of this epoch already taken by this rank

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        per_epoch = max(self.n // (self.batch_size * self.world), 1)
        if self.position >= per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        start = (self.position * self.world + self.rank) * self.batch_size
        self.position += 1
        return [int(order[(start + i) % self.n]) for i in range(self.batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
