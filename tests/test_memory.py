"""Peak memory on a CPU: the largest running total of the tensors allocated, not their sum."""

import torch

from fastsfm.memory import peak_bytes

CPU = torch.device("cpu")


def test_cpu_peak_is_the_largest_running_total_of_allocations():
    def overlapping():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 8 MB, both alive: 12 MB
        del a
        c = torch.empty(500, 1000)  # 2 MB after a's 4 MB were freed: 10 MB
        return b, c

    assert peak_bytes(overlapping, CPU) == 12_000_000
    kept = torch.empty(4000, 1000)  # allocated before: not counted
    assert peak_bytes(lambda: kept.add_(1), CPU) < 64  # a scalar or two
    assert peak_bytes(lambda: (kept * 2).sum(), CPU) >= 16_000_000
