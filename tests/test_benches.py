"""The benchmark scripts run end to end on tiny shapes (numbers are not checked, only that
they are produced): a benchmark that is never run rots."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))


def test_bench_loss_runs_on_cpu(tmp_path):
    import bench_loss

    rows = bench_loss.main(
        ["--device", "cpu", "--shapes", "5:2:3:16,3:1:1:8", "--no-compile", "--out", str(tmp_path / "loss.csv")]
    )
    assert {r["method"] for r in rows} == {"torch (eager)", "reference (eager)"}
    assert all(r["fwd+bwd ms"] > 0 and r["GB/s"] > 0 for r in rows) and rows[0]["N"] == 30
    assert (tmp_path / "loss.csv").read_text().startswith("C,IPC,views,N,D")


def test_bench_distill_runs_on_cpu(tmp_path):
    import json

    import bench_distill

    base = {"backbone": "vit_tiny_patch16_224", "image_size": 16, "resolution": 16, "classes": 3, "ipc": 2}
    runs = [
        {**base, "method": "sfm"},
        {**base, "method": "lgm", "augs": 2},
        {**base, "method": "sfm", "chunk": 4, "offload": True},
    ]
    rows = bench_distill.main(
        ["--device", "cpu", "--runs", json.dumps(runs), "--steps", "1", "--profile", "--out", str(tmp_path / "d.csv")]
    )
    assert [r["method"] for r in rows] == ["sfm", "lgm", "sfm"] and rows[2]["chunk"] == 4
    assert all(r["step ms"] > 0 and r["peak MiB"] > 0 and r["5001 steps h"] > 0 for r in rows)
    assert rows[1]["time LGM/SFM"] > 0 and abs(sum(v for k, v in rows[0].items() if k.startswith("% ")) - 100) < 1e-6
    assert (tmp_path / "d.png").exists() and (tmp_path / "d.json").exists()
