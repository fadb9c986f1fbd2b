"""The statistics wing: the real data's class statistics, computed once in a streaming pass.

* :mod:`.classstats` -- :class:`ClassStats` (class means and counts, the real-data classifier,
  metadata) and its file;
* :mod:`.compute` -- the pass: every backbone over one decode of each image, under
  ``torch.distributed`` sharded over ranks, resumable, undecodable images named or skipped;
* :mod:`.resume` -- the pass's checkpoints (its running sums and cached features).

Imports: the foundations, :mod:`fastsfm.data`, :mod:`fastsfm.models`.
"""

from .classstats import ClassStats, stats_file
from .compute import compute_stats, compute_stats_many, dataset_stats, dataset_stats_many, input_crops

__all__ = [
    "ClassStats",
    "compute_stats",
    "compute_stats_many",
    "dataset_stats",
    "dataset_stats_many",
    "input_crops",
    "stats_file",
]
