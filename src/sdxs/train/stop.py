"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM ends training after the current step with a checkpoint.

A long run on a shared or borrowed machine is stopped from outside: Ctrl-C in a terminal, `kill PID`, a job scheduler's
SIGTERM before its time limit, a session ending. Without this, everything since the last periodic checkpoint is lost
(up to `run.checkpoint_every` steps). With it, `fit` finishes the optimiser step it is in, writes a checkpoint of that
step (atomically, like every checkpoint) and raises `TrainingStopped`; `sdxs train` prints where the run stands and
exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell does for a killed command.
`--resume latest` then continues exactly where it stopped. A second signal while that checkpoint is being written acts
as if this module were not there (SIGINT raises KeyboardInterrupt, SIGTERM ends the process): an escape hatch.

Under `accelerate launch` every rank receives the signal from the launcher; the ranks agree on the step to stop at
(an all-reduce of the flag each step), so their checkpoints stay consistent.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("sdxs.train")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(KeyboardInterrupt):
    """Training was stopped by a signal after writing a checkpoint of the step it had reached."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, Path(checkpoint)
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint {self.checkpoint}. Continue with --resume latest "
            "(the same config and overrides)."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: while active, SIGINT / SIGTERM set a flag instead of ending the process.

    `requested(accelerator)` is True on every rank once any rank got a signal. Handlers are only installed from the
    main thread (Python's rule); elsewhere the flag never rises and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        logger.warning(
            "%s: stopping after this step with a checkpoint (send it again to abort without one)",
            signal.Signals(signum).name,
        )
        for sig, handler in self._previous.items():  # the next signal acts as usual
            signal.signal(sig, handler)

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=accelerator.device)
        got = accelerator.reduce(flag, reduction="sum").item()
        if got and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another rank's signal: report it as a termination
        return bool(got)


class CheckpointClock:
    """`run.checkpoint_every_minutes`: is a checkpoint due because that much wall time has passed since the last one?

    A signal lets a run stop cleanly; a hard stop (SIGKILL, a machine taken away) does not, and loses everything since
    the last checkpoint. A step count bounds that loss in steps, this clock in time. Under `accelerate launch` the
    ranks agree (any rank's clock running out means a checkpoint on all ranks), so `due` must be called on every
    rank at every step.
    """

    def __init__(self, minutes: float) -> None:
        if minutes < 0:
            raise ValueError(f"`run.checkpoint_every_minutes` must be >= 0 (0: off), got {minutes}.")
        self.seconds = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()

    def due(self, accelerator) -> bool:
        if not self.seconds:
            return False
        late = time.monotonic() - self.start >= self.seconds
        if accelerator.num_processes == 1:
            return late
        flag = torch.tensor([float(late)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())
