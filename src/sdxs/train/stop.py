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
