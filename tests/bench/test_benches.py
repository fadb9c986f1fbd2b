"""The benchmark scripts and the GPU acceptance run work end to end on tiny CPU shapes (numbers are
not checked, only that they are produced): a benchmark that is never run rots."""

import argparse
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from helpers import BENCHES, FakeCuda, bench, tiny_backbone

from fastsfm.bench.timing import distill_setup
from fastsfm.config import DistillConfig
from fastsfm.distill.objectives.graphed import GraphedStep


def test_bench_loss_runs_on_cpu(tmp_path):
    rows = bench("bench_loss").main(
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
    module = bench("bench_distill")
    rows = module.main([*args, "--no-isolate", "--out", str(tmp_path / "d.csv")])
    assert [r["method"] for r in rows] == ["sfm", "lgm", "sfm", "sfm", "sfm", "offload growth"] and rows[2][
        "chunk"
    ] == 4
    assert all(r["step ms"] > 0 and r["peak MiB"] > 0 and r["5001 steps h"] > 0 for r in rows[:3])
    assert rows[1]["time LGM/SFM"] > 0 and abs(sum(v for k, v in rows[0].items() if k.startswith("% ")) - 100) < 1e-6
    assert "error" in rows[3] and "no_such_model" in rows[3]["error"]  # a failed configuration is a row
    assert rows[4]["K"] == 2 and rows[4]["time /K=1"] > 0 and rows[4]["memory /K=1"] > 0 and rows[0]["K"] == 1
    assert (tmp_path / "d.png").exists() and len(json.loads((tmp_path / "d.json").read_text())) == 6
    isolated = module.measure_isolated(
        runs[0],
        argparse.Namespace(device="cpu", isolate=True, steps=1, profile=False, precision="auto", peak_tflops=989.0),
    )
    assert isolated["step ms"] > 0 and isolated["peak MiB"] > 0  # its own process: its own peak RSS


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    module = bench("gpu_check")
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
    script = BENCHES / "profile_loss.py"
    out = tmp_path / "host.json"
    cmd = [sys.executable, str(script), "--host", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    host = json.loads(out.read_text())["host"]
    if "skipped" in host:
        pytest.skip(host["skipped"])
    assert host["launches per call"] == 3 and host["host us"] > 0 and host["empty autograd.Function us"] > 0


@pytest.mark.slow
def test_gpu_session_rehearses_on_cpu_and_leaves_what_the_device_tool_returns(tmp_path):
    """``benches/gpu_session.sh`` (a GPU loan's two calls) with ``FASTSFM_SMOKE=1``: every part exits 0
    inside its call's deadline, ``profile_loss.py``, ``profile_step.py``, ``bench_gca.py``,
    ``profile_offload.py`` report (only the shape of
    the reports is checked; the numbers are a GPU's to give), the CUDA-only tests run under their
    limits, and each call's folder holds at most 8 files no more than 2 folders down -- what the
    device tool brings back."""
    env = {**os.environ, "FASTSFM_SMOKE": "1", "PYTHON": sys.executable}
    for call, parts in (("1", 2), ("2", 4)):
        folder = tmp_path / call
        done = subprocess.run(
            ["bash", str(BENCHES / "gpu_session.sh"), str(folder), call],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = (folder / f"session{call}.log").read_text()
        assert done.returncode == 0 and f"call {call} done" in log, done.stdout + done.stderr
        exits = [line for line in log.splitlines() if ": exit " in line]
        assert len(exits) == parts and all(line.split(": exit ")[1].startswith("0 ") for line in exits), exits
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert len(files) <= 8 and all(len(f.relative_to(folder).parts) <= 3 for f in files), files
    assert json.loads((tmp_path / "1" / "loss.json").read_text())["device"]
    assert {r["method"] for r in json.loads((tmp_path / "2" / "gca.json").read_text())["rows"]} >= {"dense (eager)"}
    offload = (tmp_path / "2" / "session2.log").read_text()
    assert "offloaded vs resident chunked steps" in offload and all(f"| {m} |" in offload for m in ("bf16", "8bit"))
    result = json.loads((tmp_path / "1" / "profile_step.json").read_text())
    saved = result["saved for backward"]
    assert saved["saved MiB per image"] > 0 and saved["saved GiB at C = 4"] > 0
    step = result["steps"][0]
    assert step["C"] == 4 and step["step ms"] > 0
    assert [s["stage"] for s in step["stages"]][:3] == ["render", "augment", "backbone"]
    names = [r["what"] for r in result["alternatives"]]
    for name in (
        "render: F.interpolate",
        "crop: grid_sample",
        "render: one matrix product, TF32",
        "real side: fp32 backbone forward, TF32",
        "SDPA MATH 257",
    ):
        assert any(n.startswith(name) for n in names), (name, names)
    rows = json.loads((tmp_path / "2" / "sfm_vs_lgm" / "sfm_vs_lgm.json").read_text())
    assert [r["method"] for r in rows] == ["sfm", "lgm"] and rows[1]["time LGM/SFM"] > 0
    tests = json.loads((tmp_path / "2" / "tests" / "report.json").read_text())["checks"]
    assert tests[0]["check"] == "collected and skipped (smoke)" and tests[0]["passed"]
    assert (tmp_path / "2" / "tests" / "gpu_tests.jsonl").read_text().count('"skipped"') > 10


def test_gpu_session_stops_when_the_install_fails(tmp_path):
    """A failed editable install ends the call with a clear line and a non-zero exit: no part measures
    the code that was installed before."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\n[ "$1" = "-m" ] && [ "$2" = "pip" ] && exit 3\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "FASTSFM_SMOKE": "1", "FASTSFM_SKIP_INSTALL": "0", "PYTHON": str(fake)}
    for call in ("1", "2"):
        done = subprocess.run(
            ["bash", str(BENCHES / "gpu_session.sh"), str(tmp_path / call), call],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        log = (tmp_path / call / f"session{call}.log").read_text()
        assert done.returncode == 1, log
        assert "== install: exit 3" in log and "install failed: the session stops here" in log
        assert "(a)" not in log and "(c)" not in log and "gpu tests" not in log


def test_profile_step_reads_the_budgets_from_kernel_names_and_times():
    """Kernel names of cuBLAS, CUTLASS, inductor, flash, memory-efficient and cuDNN attention fall in their
    class (attention before matrix products: efficient attention's kernels are CUTLASS's), and the
    budgets follow from the device times: rate = FLOPs / time, bytes = time x bandwidth."""
    from types import SimpleNamespace

    from fastsfm.bench.benchmark import BackboneFlops

    module = bench("profile_step")
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matrix products",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matrix products",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_tn": "matrix products",
        "triton_tem_fused_mm_0": "matrix products",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": module.OTHER,
        "triton_poi_fused_add_mul_native_layer_norm_0": module.OTHER,
        "_class_sums_kernel": module.OTHER,
    }
    for name, kind in names.items():
        assert module.kernel_class(name) == kind, name
    events = [SimpleNamespace(key=name, self_device_time_total=1000.0) for name in names]  # 1 ms each
    flops = BackboneFlops(forward=3e9, backward=6e9, attention=1e9)
    stages = [{"stage": "render", "ms": 1.0}, {"stage": "backbone", "ms": 50.0}, {"stage": "loss", "ms": 0.5}]
    rows = {r["budget"]: r["measured"] for r in module.budgets(events, flops, 100, stages, 4.0, 20.0, 80.0)}
    assert rows["matrix products, device ms"] == 4.0 and rows["attention, device ms"] == 3.0
    assert rows["backbone matrix products, TFLOP/s"] == pytest.approx(8e9 * 100 / 4e-3 / 1e12)
    assert rows["elementwise and other, MB per image at the copy bandwidth"] == pytest.approx(3e-3 * 4e12 / 100 / 1e6)
    assert rows["render + augment + loss alone, ms"] == 1.5 and rows["host enqueue / step time"] == 0.25


def test_demo_variants_held_out_runs_every_pairing(tmp_path):
    """The multi-backbone experiment: each shipped backbone held out, its two others alone and together."""
    args = ["--held-out", "--seeds", "1", "--steps", "2", "--eval-epochs", "1", "--out", str(tmp_path / "v")]
    rows = bench("demo_variants").main(args)
    assert len(rows) == 3 * 5 and {r["held out"] for r in rows} == {"digits_vit", "digits_vit8", "digits_resnet"}
    assert {r["set"] for r in rows if r["held out"] == "digits_resnet"} >= {"digits_vit + digits_vit8", "digits_vit"}
    assert all(r["probe"] and r["inherit"] for r in rows) and (tmp_path / "held_out.md").exists()


def test_profile_step_frees_the_graph_before_the_next_section(monkeypatch):
    """``graphed_step_ms`` (the step as a CUDA graph, CUDA stubbed): its steps warm up, capture and
    replay, and when it returns nothing holds the graph (whose pool would crowd out the next section)."""
    module = bench("profile_step")
    cpu = torch.device("cpu")
    synset, optim, objective = distill_setup(tiny_backbone(), DistillConfig(ipc=1, resolution=16), 3, cpu)
    fake = FakeCuda(optim, monkeypatch)
    graphs = []
    made = fake.graph_class()

    class Tracked(made):
        def __init__(self):
            graphs.append(weakref.ref(self))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Tracked)
    monkeypatch.setattr(GraphedStep, "_graphable", lambda self, synset, optim: True)
    freed = []  # whether the graph was gone when the device memory was handed back

    def free_device(device):
        gc.collect()
        freed.append(graphs[0]() is None)

    monkeypatch.setattr(module, "free_device", free_device)
    assert module.graphed_step_ms(objective, synset, optim, 2, cpu) > 0
    assert len(graphs) == 1 and freed == [True] and fake.replays


def test_bench_decode_smoke_reports_every_cpu_decoder():
    rows = bench("bench_decode").main(["--smoke", "--workers", "1"])
    assert [r["decoder"] for r in rows][:3] == ["PIL, 1 core", "torchvision decode_jpeg, 1 core", "PIL, 1 processes"]
    assert all(r["images/s"] > 0 and r["ImageNet-1k pass h"] > 0 for r in rows)


def test_bench_gca_runs_on_cpu_and_its_baseline_is_the_loss(tmp_path):
    """The smoke run produces fused and dense rows; the dense baseline computes the same loss as
    fastsfm's PyTorch path for every kind (else the comparison would time something else)."""
    from fastsfm.config import GCAOptions
    from fastsfm.loss.gca_torch import gca_loss_torch

    module = bench("bench_gca")
    rows = module.main(["--device", "cpu", "--smoke", "--dtypes", "float32", "--out", str(tmp_path / "gca.json")])
    assert {r["method"] for r in rows} == {"fused (triton)", "dense (eager)"}
    assert all(r["fwd+bwd ms"] > 0 for r in rows)
    assert json.loads((tmp_path / "gca.json").read_text())["rows"] == json.loads(json.dumps(rows, default=str))
    z = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    for kind in ("ince", "rince", "uot"):
        options = GCAOptions(kind=kind)
        want = gca_loss_torch(z.double(), options)
        assert abs(float(module.dense_formulation(z, options)) - float(want)) < 1e-5 * abs(float(want)), kind
    assert module.fused_flops(16384, 128, 10) == 2.0 * 16384**2 * (128 * 43 + 2 * 32)


def test_bench_optimizer_state_compares_every_mode_with_fp32(tmp_path):
    rows = bench("bench_optimizer_state").main(["--steps", "3", "--ipc", "1", "--out", str(tmp_path / "o.json")])
    assert [r["optimizer_state"] for r in rows] == ["fp32", "bf16", "8bit"]
    assert rows[0]["images: rel. distance to fp32"] == 0 and rows[0]["state vs fp32"] == 1
    assert rows[1]["state vs fp32"] < 1 and rows[2]["state vs fp32"] < rows[1]["state vs fp32"]
    assert json.loads((tmp_path / "o.json").read_text())["rows"] == rows
