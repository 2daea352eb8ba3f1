"""Stop cleanly when the scheduler asks: SIGTERM or SIGUSR1 (SLURM's warning signal) sets a flag;
the training loop checks it after every optimizer step, all ranks agree, save a checkpoint, exit.

The agreement is one tiny all-reduce per step, so a signal that reaches only some ranks (or
reaches them at different steps) still stops every rank at the same step.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

RESUMABLE_EXIT = 75  # EX_TEMPFAIL: stopped early with a checkpoint; relaunch with --resume auto


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled (a collective: all ranks call it)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
