"""Test setup: run Triton kernels in the CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton, hence here, first.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests are skipped, with the reason, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU: python benches/gpu_check.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device the Triton kernels run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_problem(n: int, c: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0, order: str = "shuffled"):
    """Features (N, D), labels (N,) and centres (C, D) float64 for N >= C rows.

    Every class has a row, the others are drawn at random (unequal counts); ``order`` is
    ``"shuffled"`` or ``"contiguous"`` (class-sorted rows).  A large shared offset, as real
    backbone features have, makes the tests exercise cancellation in the flows.
    """
    gen = torch.Generator().manual_seed(seed)
    offset = 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    centers = offset + torch.randn(c, d, generator=gen, dtype=torch.float64)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels.sort().values if order == "contiguous" else labels[torch.randperm(n, generator=gen)]
    feats = centers[labels] + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype), labels.to(device), centers.to(device)
