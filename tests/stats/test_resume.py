"""The statistics pass over real files: stopped by a signal and resumed, it equals an uninterrupted
pass bit for bit; an undecodable image stops it with one line naming the file, or is skipped and
recorded; the command line reports both in one line."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import TOY_CLASSIFIER, class_folders, tiny_backbone

from fastsfm.data.datasets import image_folder
from fastsfm.data.images import BadImageError
from fastsfm.stats import ClassStats, dataset_stats
from fastsfm.stats.resume import PassCheckpoint, checkpoint_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return class_folders(tmp_path_factory.mktemp("imgs") / "train", per_class=5)


def _pass(bb, root, **kwargs):
    data = image_folder(root, 16, 16)
    return dataset_stats(bb, data, TOY_CLASSIFIER, batch_size=4, workers=0, progress=False, **kwargs)


def _equal(a: ClassStats, b: ClassStats) -> None:
    for name in ("means", "counts", "classifier_weight", "classifier_bias"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_pass_stopped_by_sigterm_resumes_to_the_uninterrupted_result(folder, tmp_path, monkeypatch):
    bb = tiny_backbone()
    whole = _pass(bb, folder)
    calls = [0]
    forward = bb.forward

    def preempted(x):  # the scheduler's SIGTERM arrives during the third batch
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(x)

    monkeypatch.setattr(bb, "forward", preempted)
    ckpt = tmp_path / "stats.safetensors.partial"
    with pytest.raises(SystemExit) as stopped:
        _pass(bb, folder, checkpoint_folder=ckpt, checkpoint_minutes=60)
    assert stopped.value.code == 143 and (ckpt / "rank0" / "state.safetensors").exists()
    monkeypatch.setattr(bb, "forward", forward)
    with pytest.raises(FileExistsError, match="--resume"):  # a leftover pass is never silently restarted
        _pass(bb, folder, checkpoint_folder=ckpt)
    calls[0] = 0
    monkeypatch.setattr(bb, "forward", lambda x: calls.__setitem__(0, calls[0] + 1) or forward(x))
    resumed = _pass(bb, folder, checkpoint_folder=ckpt, resume=True)
    assert calls[0] == 1  # 15 images in batches of 4: three were done before the stop, one is left
    _equal(resumed, whole)
    assert not ckpt.exists()  # removed once the statistics are computed


def test_checkpoints_by_time_write_only_new_features_and_refuse_another_pass(folder, tmp_path):
    bb = tiny_backbone()
    ckpt = tmp_path / "every-batch"
    with_ckpt = _pass(bb, folder, checkpoint_folder=ckpt, checkpoint_minutes=0)  # a save after every batch
    _equal(with_ckpt, _pass(bb, folder))
    other = PassCheckpoint(ckpt, {"batch_size": "8"})
    other.folder.mkdir(parents=True)
    (other.folder / "state.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="damaged"):
        other.load("cpu")
    assert checkpoint_folder("out/stats.safetensors").name == "stats.safetensors.partial"
    assert checkpoint_folder("out/stats").as_posix() == "out/stats/.partial"


def _with_truncated_jpeg(tmp_path):
    root = class_folders(tmp_path / "train", per_class=3)
    good = root / "a" / "0.png"
    from PIL import Image

    Image.open(good).convert("RGB").save(root / "b" / "cut.jpg", quality=90)
    data = (root / "b" / "cut.jpg").read_bytes()
    (root / "b" / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated download
    return root, root / "b" / "cut.jpg"


def test_an_undecodable_image_is_named_or_skipped_and_recorded(tmp_path):
    root, bad = _with_truncated_jpeg(tmp_path)
    bb = tiny_backbone()
    with pytest.raises(BadImageError, match=f"cannot decode image {bad}") as err:
        _pass(bb, root)
    assert "\n" not in str(err.value) and "--skip-bad-images" in str(err.value)
    stats = _pass(bb, root, skip_bad=True)
    assert stats.meta["num_images"] == "9" and str(bad) in stats.meta["skipped_images"]
    assert stats.counts.tolist() == [3, 3, 3]


def test_the_command_line_names_a_bad_file_in_one_line_and_debug_keeps_the_traceback(tmp_path):
    root, bad = _with_truncated_jpeg(tmp_path)
    cmd = [sys.executable, "-m", "fastsfm.cli", "stats", "--data", str(root), "--backbone", "vit_tiny_patch16_224"]
    cmd += ["--random-init", "--image-size", "16", "--device", "cpu", "--resolution", "16", "--workers", "1"]
    cmd += ["--out", str(tmp_path / "s.safetensors"), "--classifier-epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"fastsfm stats: error: cannot decode image {bad}: "), lines
    assert "Traceback" not in done.stderr and not (tmp_path / "s.safetensors").exists()
    skipped = subprocess.run(cmd + ["--skip-bad-images"], capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "1 undecodable images left out" in skipped.stderr
    debug = subprocess.run([cmd[0], *cmd[1:3], "--debug", *cmd[3:]], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_loader_workers_hand_over_uint8_and_the_statistics_equal_the_float_path(folder, monkeypatch):
    """The pass's workers return uint8 pixels (a quarter of the shared-memory bytes), made float on
    the device exactly as the float view makes them: the statistics equal a pass over float batches.
    A /dev/shm too small for the batches in flight switches the workers to file-system sharing."""
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader

    from fastsfm.data import images
    from fastsfm.stats import compute_stats

    bb = tiny_backbone()
    data = image_folder(folder, 16, 16)
    item = images.uint8_views(data.train_eval)[0][0]
    assert item.dtype == torch.uint8 and torch.equal(images.to_float(item), data.train_eval[0][0])
    floats = DataLoader(data.train_eval, batch_size=4)
    want = compute_stats(bb, floats, data.class_names, "x", TOY_CLASSIFIER, progress=False)
    got = _pass(bb, folder)
    _equal(got, want)
    tensors = torch.utils.data.TensorDataset(torch.zeros(1))
    assert images.uint8_views(tensors) is tensors  # images held as tensors: unchanged
    before = mp.get_sharing_strategy()
    monkeypatch.setattr(images, "shm_items", lambda *a, **k: 0)
    try:
        images.check_shared_memory(10**9, workers=2)
        assert mp.get_sharing_strategy() == "file_system"
    finally:
        mp.set_sharing_strategy(before)
