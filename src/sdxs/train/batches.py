"""`IndexBatches`: the batch sampler of the trainers whose data sit in memory (VAE, text encoder)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class IndexBatches:
    """Endless, seeded, rank-split batches of indices into a small in-memory dataset, resumable by (epoch, position).

    Used by the VAE and text-encoder trainers, whose data are image/caption folders rather than latent shards.
    Every epoch is one permutation (seed + epoch) shared by all ranks; rank r takes every world-th batch. With
    `weights` (one per item, >= 0) an epoch is instead n draws with replacement in proportion to them, as the latent
    loader's `sample_weights`.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, weights: Sequence[float] | None = None
    ):
        if n < 1:
            raise ValueError("the dataset is empty.")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0  # position: batches of this epoch already taken by this rank
        self.p = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"`weights` must be {n} finite numbers >= 0, not all 0.")
            self.p = w / w.sum()

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        per_epoch = max(self.n // (self.batch_size * self.world), 1)
        if self.position >= per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(self.n) if self.p is None else rng.choice(self.n, size=self.n, replace=True, p=self.p)
        start = (self.position * self.world + self.rank) * self.batch_size
        self.position += 1
        return [int(order[(start + i) % self.n]) for i in range(self.batch_size)]

    def _weights_id(self) -> str:
        """What the draw probabilities are (a resume must draw the same way): "" for plain permutations."""
        return "" if self.p is None else hashlib.sha256(self.p.tobytes()).hexdigest()[:12]

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "n": self.n, "batch_size": self.batch_size}
        return {**state, "weights": self._weights_id()} if self.p is not None else state

    def load_state_dict(self, state: dict, replan: bool = False) -> None:
        """Resume at a position from `state_dict()`; a state drawn another way (other weights, dataset size or batch
        size) is refused, or with `replan` resumed at the start of the next epoch, drawn this way."""
        changed = [k for k in ("n", "batch_size") if k in state and state[k] != getattr(self, k)]
        if state.get("weights", "") != self._weights_id():
            changed.append("sample weights")
        if not changed:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])
        elif replan:
            self.epoch, self.position = int(state["epoch"]) + 1, 0
            logger.info("data plan changed (%s): resuming at the start of epoch %d", ", ".join(changed), self.epoch)
        else:
            what = ", ".join(
                "`data.sample_weights`" if k == "sample weights" else f"{k}={state[k]} (this run: {getattr(self, k)})"
                for k in changed
            )
            raise ValueError(
                f"the checkpoint was drawn with other data ({what}): resume with the same table, batch size and "
                "dataset, pass `run.replan_data=true` to go on from the next epoch under the new plan, or start a new "
                "run (`run.output_dir`)."
            )
