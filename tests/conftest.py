"""Test setup: run Triton kernels in the CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton, hence here, first.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, autotuning every odd test shape would dominate the run; benches autotune.
os.environ.setdefault("FASTSFM_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device the Triton kernels run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_problem(n: int, c: int, d: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Features (N, D), labels (N,) and means (C, D) with a large shared offset, as real
    backbone features have, so that tests exercise the cancellation the kernels guard against."""
    gen = torch.Generator().manual_seed(seed)
    offset = 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    means = offset + torch.randn(c, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=gen)
    feats = means[labels] + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype), labels.to(device), means.to(device=device, dtype=torch.float32)
