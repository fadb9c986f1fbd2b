"""Files of fastsfm: safetensors with string metadata, JSON and text, always written atomically.

Statistics, synthetic sets and checkpoints are safetensors files; grid cells, evaluation
results and reports are JSON.  This is their only writer: every write goes to a temporary file
in the same folder and is renamed over the target, so a crash leaves the previous file intact,
never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "check_free_space",
    "atomic_save_safetensors",
    "read_safetensors",
    "atomic_write",
    "atomic_folder",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "concat_safetensors",
]


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path`` (with the
    permissions of a newly written file), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the permissions of any newly written file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (which must not exist, or be an empty folder); on
    success it becomes ``path`` (with the permissions of a newly made folder), on failure it is
    removed -- the folder appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> the permissions of any new folder
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path: str | Path, payload: object) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def read_json(path: str | Path, what: str) -> object:
    """A JSON file, or a ``ValueError`` naming ``what`` it should have been."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable {what} (JSON): {err}") from err


def check_free_space(path: str | Path, nbytes: int) -> None:
    """Refuse (``OSError``, one line) to write ``nbytes`` at ``path`` when its file system has less
    free space (plus 1 % and 64 MiB of margin): an atomic write needs the new file's room while
    the old one is kept, and a full disk mid-write would only fail later."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    need = int(nbytes * 1.01) + 64 * 2**20
    if free < need:
        raise OSError(
            f"not enough free space to write {path}: needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free on "
            f"{folder}; free some or point --out elsewhere (the last checkpoint is kept)"
        )


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (:func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8"}


def concat_safetensors(parts: list[str | Path], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``path`` whose every tensor is the concatenation (along dim 0) of that tensor in each
    of ``parts``, holding one part's tensor in memory at a time (the file is streamed in the
    safetensors layout: an 8-byte little-endian header length, a JSON header, the raw data)."""
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), "pt")) for p in parts]
        keys = list(handles[0].keys())
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for key in keys:
            slices = [h.get_slice(key) for h in handles]
            shape = [sum(s.get_shape()[0] for s in slices), *slices[0].get_shape()[1:]]
            first = slices[0][:1]  # one row: the dtype without reading the tensor
            nbytes = first.element_size() * int(torch.Size(shape).numel())
            header[key] = {"dtype": _DTYPES[first.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with atomic_write(path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for key in keys:
                for handle in handles:
                    out.write(memoryview(handle.get_tensor(key).contiguous().flatten().view(torch.uint8).numpy()))


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file, opened once.

    Raises ``safetensors.SafetensorError`` or ``OSError`` for unreadable files; callers turn
    them into errors that name what the file was supposed to be.
    """
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
