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
    import bench_distill

    rows = bench_distill.main(
        [
            "--device",
            "cpu",
            "--backbone",
            "vit_tiny_patch16_224",
            "--image-size",
            "16",
            "--classes",
            "3",
            "--ipcs",
            "1",
            "--steps",
            "1",
            "--lgm-augs",
            "2",
            "--no-accuracy",
            "--out",
            str(tmp_path / "d.csv"),
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    assert [r["method"] for r in rows] == ["sfm", "lgm"]
    assert all(r["step ms"] > 0 and r["peak MiB"] > 0 for r in rows) and "time LGM/SFM" in rows[1]
    assert (tmp_path / "p.png").exists()
