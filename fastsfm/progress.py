"""Progress reporting that suits both a terminal and a log file.

On a terminal: a ``tqdm`` bar.  Anywhere else (a batch job's log, CI, a pipe): one plain
line every ``interval`` seconds -- count, elapsed time, ETA, rate -- and a last one at the end,
so a 5000-step run writes a screenful of lines instead of megabytes of carriage-return updates.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "track", "duration"]

T = TypeVar("T")


class Progress:
    """A counter from ``initial`` to ``total`` with a ``desc``; ``update(n, **postfix)`` advances it."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        initial: int = 0,
        enabled: bool = True,
        unit: str = "it",
        interval: float = 60.0,
        stream=None,
    ):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.count, self.unit, self.interval = total, desc, initial, unit, interval
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, initial=initial, unit=unit, file=self.stream)
        self.start = self.last = time.monotonic()
        self.first = initial
        self.postfix: dict[str, object] = {}

    def update(self, n: int = 1, **postfix: object) -> None:
        self.count += n
        self.postfix = postfix
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = (self.count - self.first) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        left = (self.total - self.count) / rate if self.total and rate > 0 else None
        eta = f", ETA {duration(left)}" if left is not None and self.count < self.total else ""
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.count}{of} {self.unit}, {duration(elapsed)} elapsed{eta}, "
            f"{rate:.3g} {self.unit}/s{extra}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.count > self.first:
            self._line()


def duration(seconds: float) -> str:
    """``seconds`` as ``42 s``, ``12m05s`` or ``3h07m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def track(
    iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True, unit: str = "it"
) -> Iterator[T]:
    """Iterate with a :class:`Progress` (total from ``len(iterable)`` when not given)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Progress(total, desc, enabled=enabled, unit=unit)
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
