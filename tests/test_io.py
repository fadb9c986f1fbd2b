"""Files: atomic writes that never leave half a file, streamed concatenation of safetensors shards."""

import os

import pytest
import torch

from fastsfm.io import (
    atomic_save_safetensors,
    atomic_write_json,
    concat_safetensors,
    read_json,
    read_safetensors,
)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"x": Boom()})
    assert read_json(tmp_path / "a.json", "test file") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_shards_concatenate_into_one_readable_file(tmp_path):
    parts = []
    for r, n in enumerate((3, 1, 2)):
        tensors = {"images": torch.rand(n, 3, 4, 4), "labels": torch.arange(n) + 10 * r}
        atomic_save_safetensors(tensors, tmp_path / f"p{r}.safetensors", {"rank": str(r)})
        parts.append(tensors)
    concat_safetensors([tmp_path / f"p{r}.safetensors" for r in range(3)], tmp_path / "all.safetensors", {"a": "b"})
    tensors, meta = read_safetensors(tmp_path / "all.safetensors")
    assert meta == {"a": "b"}
    for key in ("images", "labels"):
        assert torch.equal(tensors[key], torch.cat([p[key] for p in parts]))
