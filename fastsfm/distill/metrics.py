"""Per-step metrics of a run: ``metrics.jsonl`` (one JSON object per step) and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["MetricsLog", "plot_loss"]


class MetricsLog:
    """Appends ``{"step", "loss", ...}`` lines to ``path``.

    Opening it at ``start`` (a resumed run) first drops the lines of steps ``>= start`` that
    an interrupted run wrote after its last checkpoint, so the file holds every step once.
    ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, path: str | Path, start: int = 0, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = [line for line in read_metrics(self.path) if line["step"] < start] if start else []
        atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def log(self, **values: object) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(values) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, out: str | Path, title: str = "") -> None:
    """Loss against step from ``metrics.jsonl``, with pyramid-level changes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(metrics_path)
    if not lines:
        return
    steps, losses = [m["step"] for m in lines], [m["loss"] for m in lines]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8)
    for prev, cur in zip(lines, lines[1:], strict=False):
        if cur.get("levels") != prev.get("levels"):
            ax.axvline(cur["step"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "distillation loss (dotted: a pyramid level is added)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
