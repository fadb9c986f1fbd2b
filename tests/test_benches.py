"""The benchmark scripts and the GPU acceptance run work end to end on tiny CPU shapes (numbers are
not checked, only that they are produced): a benchmark that is never run rots."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def test_bench_loss_runs_on_cpu(tmp_path):
    rows = _bench("bench_loss").main(
        ["--device", "cpu", "--shapes", "5:2:3:16,3:1:1:8", "--no-compile", "--out", str(tmp_path / "loss.csv")]
    )
    assert {r["method"] for r in rows} == {"torch (eager)", "reference (eager)"}
    assert all(r["fwd+bwd ms"] > 0 and r["GB/s"] > 0 for r in rows) and rows[0]["N"] == 30
    assert (tmp_path / "loss.csv").read_text().startswith("C,IPC,views,N,D")


def test_bench_distill_runs_on_cpu_and_records_failures(tmp_path):
    base = {"backbone": "vit_tiny_patch16_224", "image_size": 16, "resolution": 16, "classes": 3, "ipc": 2}
    runs = [
        {**base, "method": "sfm"},
        {**base, "method": "lgm", "views": 2},
        {**base, "method": "sfm", "chunk": 4, "offload": True},
        {**base, "method": "sfm", "backbone": "no_such_model"},
        {**base, "method": "sfm", "backbone": ["vit_tiny_patch16_224", "test_vit"]},  # SFM against K = 2 backbones
    ]
    args = ["--device", "cpu", "--runs", json.dumps(runs), "--steps", "1", "--profile", "--growth", "3:2:16"]
    rows = _bench("bench_distill").main([*args, "--out", str(tmp_path / "d.csv")])
    assert [r["method"] for r in rows] == ["sfm", "lgm", "sfm", "sfm", "sfm", "offload growth"] and rows[2][
        "chunk"
    ] == 4
    assert all(r["step ms"] > 0 and r["peak MiB"] > 0 and r["5001 steps h"] > 0 for r in rows[:3])
    assert rows[1]["time LGM/SFM"] > 0 and abs(sum(v for k, v in rows[0].items() if k.startswith("% ")) - 100) < 1e-6
    assert "error" in rows[3] and "no_such_model" in rows[3]["error"]  # a failed configuration is a row
    assert rows[4]["K"] == 2 and rows[4]["time /K=1"] > 0 and rows[4]["memory /K=1"] > 0 and rows[0]["K"] == 1
    assert (tmp_path / "d.png").exists() and len(json.loads((tmp_path / "d.json").read_text())) == 6


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    module = _bench("gpu_check")
    report = module.main(["--smoke", "--out", str(tmp_path)])
    sections = {s["section"]: s["status"] for s in report.sections}
    assert list(sections) == [name for name, _ in module.SECTIONS] and set(sections.values()) == {"done"}, sections
    assert json.loads((tmp_path / "profile_loss.json").read_text())[0]["host us"] > 0
    assert not [c for c in report.checks if c["passed"] is False]
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["environment"]["device"] == "cpu (smoke)" and (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_profile_loss_host_part_runs_without_a_gpu(tmp_path):
    """``profile_loss.py --host``: the host cost of one fused forward+backward with launches stubbed,
    three launches per call, beside the empty autograd.Function floor (numbers are not judged here)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benches" / "profile_loss.py"
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(script), "--host", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    host = json.loads(out.read_text())["host"]
    if "skipped" in host:
        pytest.skip(host["skipped"])
    assert host["launches per call"] == 3 and host["host us"] > 0 and host["empty autograd.Function us"] > 0


@pytest.mark.slow
def test_profile_step_smoke(tmp_path):
    """``profile_step.py --smoke``: the step, its stages and the alternatives on CPU (only the shape
    of the report is checked; the numbers are a GPU's to give)."""
    result = _bench("profile_step").main(["--smoke", "--out", str(tmp_path / "step.json")])
    step = result["steps"][0]
    assert (
        step["C"] == 4
        and step["step ms"] > 0
        and [s["stage"] for s in step["stages"]][:3]
        == [
            "render",
            "augment",
            "backbone",
        ]
    )
    names = [r["what"] for r in result["alternatives"]]
    assert "render: F.interpolate (atomic backward)" in names and "crop: grid_sample (atomic backward)" in names
    assert json.loads((tmp_path / "step.json").read_text())["steps"][0]["C"] == 4


def test_demo_variants_held_out_runs_every_pairing(tmp_path):
    """The multi-backbone experiment: each shipped backbone held out, its two others alone and together."""
    args = ["--held-out", "--seeds", "1", "--steps", "2", "--eval-epochs", "1", "--out", str(tmp_path / "v")]
    rows = _bench("demo_variants").main(args)
    assert len(rows) == 3 * 5 and {r["held out"] for r in rows} == {"digits_vit", "digits_vit8", "digits_resnet"}
    assert {r["set"] for r in rows if r["held out"] == "digits_resnet"} >= {"digits_vit + digits_vit8", "digits_vit"}
    assert all(r["probe"] and r["inherit"] for r in rows) and (tmp_path / "held_out.md").exists()
