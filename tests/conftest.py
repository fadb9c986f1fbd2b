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


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    """``fastsfm eval``'s default feature cache in the test's own folder, never in the home directory."""
    monkeypatch.setenv("FASTSFM_FEATURE_CACHE", str(tmp_path / "feature-cache"))


@pytest.fixture
def device() -> torch.device:
    """The device the Triton kernels run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
