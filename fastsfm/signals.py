"""Preemption signals: SIGTERM, SIGUSR1 (SLURM's requeue signal) and a first Ctrl-C ask a long
run -- a distillation, an evaluation -- to stop at its next safe point, write a checkpoint and exit
with status ``128 + signal`` (143, 138, 130); a second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

__all__ = ["StopSignals"]

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Turns SIGTERM, SIGUSR1 and a first SIGINT into a request to stop after the current step.

    ``requested(group)`` is True once any rank of ``group`` received one (an all-reduce when
    there are several ranks, so all stop at the same step); ``code`` is ``128 + signal``.
    """

    def __init__(self):
        self.signum = 0
        self._saved = {}

    def __enter__(self) -> StopSignals:
        for sig in _SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, group=None) -> bool:
        return self.agree(group)[0]

    def agree(self, group=None, due: bool = False) -> tuple[bool, bool]:
        """``(a stop was requested, ``due`` holds)`` on any rank of ``group``: one all-reduce for both
        when there are several ranks (so they stop, or checkpoint by time, at the same step)."""
        if group is None:
            return self.signum != 0, due
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        flags = torch.tensor([self.signum, int(due)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        self.signum = int(flags[0])
        return self.signum != 0, bool(flags[1])

    @property
    def code(self) -> int:
        return 128 + self.signum
