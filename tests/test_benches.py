"""The benchmark scripts run end to end on tiny shapes (numbers are not checked, only that
they are produced): a benchmark that is never run rots."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))


def test_bench_loss_runs_on_cpu(tmp_path):
    import bench_loss

    rows = bench_loss.main(["--device", "cpu", "--shapes", "5:2:16,3:1:8", "--no-compile", "--out",
                            str(tmp_path / "loss.csv")])
    assert {r["method"] for r in rows} == {"lean (eager)", "literal (eager)"}
    assert all(r["fwd+bwd ms"] > 0 for r in rows)
    assert (tmp_path / "loss.csv").read_text().startswith("C,IPC,N,D")
