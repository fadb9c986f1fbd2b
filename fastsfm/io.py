"""safetensors files with string metadata: atomic writes and one-pass reads.

Statistics, synthetic sets and checkpoints are all such files; this is their only reader
and writer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_save_safetensors", "read_safetensors"]


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary file in the same folder and ``os.replace``:
    a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the permissions of any newly written file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file, opened once.

    Raises ``safetensors.SafetensorError`` or ``OSError`` for unreadable files; callers turn
    them into errors that name what the file was supposed to be.
    """
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
