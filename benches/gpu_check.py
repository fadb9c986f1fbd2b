"""The GPU acceptance run: everything a CPU cannot prove, in one command, in at most 8 minutes on one
H100/H200.  **Run it first whenever a GPU is lent.**

    python benches/gpu_check.py --out DIR            # on a GPU
    python benches/gpu_check.py --smoke --out DIR    # the same sequence on CPU, tiny sizes (in the test suite)

In one process, in this order (each section is timed, and skipped when ``--budget`` seconds have
passed, so the report always comes back):

1. environment: device, driver, torch/Triton/CUDA versions, and the two ceilings measured now
   (device-to-device copy bandwidth, bf16 matrix-product rate);
2. ``pytest -m gpu``: every CUDA-only test, each under a time limit, each result written as it
   finishes (``--smoke``: collected and skipped on the CPU);
3. the fused loss against :mod:`fastsfm.loss.reference` (float64) on CUDA: fp32/bf16/fp16, both
   objectives, class-contiguous and shuffled labels, N up to 50,000; the gradient's error is
   judged beyond the dtype's own rounding of the exact gradient (float16's is large at C = 1000);
4. no host synchronisation in ``SFMLoss`` forward+backward (``set_sync_debug_mode("error")``),
   CUDA-graph capture and replay equal to eager;
5. ``benches/bench_loss.py`` at the target sizes (fused vs eager vs ``torch.compile``), and
   ``benches/profile_loss.py``: device time per kernel and host time per call;
6. ``benches/bench_distill.py``, a reduced paper preset (ViT-B/16 and DINOv2-B/14 at 224 px,
   random weights), each row written as it finishes: ``sfm vs lgm`` at C = 100, IPC 1 (LGM: 10
   views); ``distill at scale``: SFM at C = 1000, IPC 1 and 10 (chunked), and an offloaded set
   grown through every pyramid level (pinned bytes vs held bytes);
7. a digits distillation on CUDA in bf16, whole vs chunked vs offloaded (equal up to bf16 rounding).

``DIR/report.md`` and ``DIR/report.json`` put each target of ``benches/RESULTS.md`` beside its
measurement with pass/fail; they are rewritten after every section.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prepare_smoke(argv: list[str] | None) -> None:
    """``--smoke`` on a machine without CUDA runs the kernels in Triton's interpreter: set it before triton loads."""
    if "--smoke" in (argv if argv is not None else sys.argv) and not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class Report:
    """Checks as they are made, written to ``out`` after each section."""

    out: Path
    environment: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    sections: list[dict] = field(default_factory=list)

    def check(self, section: str, name: str, target: str, measured: str, passed: bool | None) -> None:
        self.checks.append(
            {"section": section, "check": name, "target": target, "measured": measured, "passed": passed}
        )

    def write(self) -> None:
        from fastsfm.bench.benchmark import markdown_table
        from fastsfm.io import atomic_write_json, atomic_write_text

        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": self.environment, "sections": self.sections, "checks": self.checks}
        atomic_write_json(self.out / "report.json", payload)
        verdict = {True: "pass", False: "**FAIL**", None: "info"}
        rows = [{**c, "passed": verdict[c["passed"]]} for c in self.checks]
        env = "\n".join(f"- {k}: {v}" for k, v in self.environment.items())
        times = markdown_table(self.sections) if self.sections else ""
        atomic_write_text(
            self.out / "report.md",
            f"# GPU acceptance report\n\n{env}\n\n## Sections\n\n{times}\n\n## Checks\n\n{markdown_table(rows)}\n",
        )


@dataclass
class Context:
    device: object
    smoke: bool
    budget: float
    report: Report
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def target(self, ok: bool) -> bool | None:
        """A performance target's verdict: none in ``--smoke`` (tiny CPU sizes say nothing about GPU targets)."""
        return None if self.smoke else ok


def _bench(name: str):
    """A sibling script of ``benches/`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benches" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def _fmt(value: float, unit: str = "") -> str:
    return f"{value:.3g}{unit}"


def environment(ctx: Context) -> None:
    import torch
    import triton

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "device": "cpu (smoke)",
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env["device"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["driver"] = f"unknown ({err})"
        from fastsfm.bench.benchmark import ceilings

        env.update(ceilings(ctx.device))
    ctx.report.environment = env
    for key, value in env.items():
        print(f"{key}: {value}", flush=True)


GPU_TEST_SECONDS = 90.0
"""Time limit of one CUDA-only test (the slowest, the loss against float64 at N = 50,000, takes ~20 s)."""


def gpu_tests(ctx: Context) -> None:
    """``pytest -m gpu`` in a child process, each test under :data:`GPU_TEST_SECONDS`, every result
    written as it finishes (``gpu_tests.jsonl``), a hung test recorded and the rest run again
    without it (:func:`fastsfm.bench.pytest_limits.run_tests`).  ``--smoke``: the same run on the
    CPU, where every CUDA-only test is collected and skipped (so they cannot rot)."""
    from fastsfm.bench.pytest_limits import run_tests

    left = max(ctx.budget - ctx.elapsed(), 1.0)
    summary = run_tests(
        ["-q", "-m", "gpu", str(REPO / "tests")], ctx.report.out / "gpu_tests.jsonl", GPU_TEST_SECONDS, left
    )
    if ctx.smoke:
        count = len(summary["skipped"])
        ctx.report.check("gpu tests", "collected and skipped (smoke)", "> 0 gpu tests", str(count), count > 0)
        return
    bad = summary["failed"] + summary["hung"] + summary["unfinished"]
    measured = (
        f"{len(summary['passed'])} passed, {len(summary['failed'])} failed, {len(summary['hung'])} hung, "
        f"{len(summary['unfinished'])} cut by the budget ({', '.join(bad)[:400] or 'none'})"
    )
    ctx.report.check("gpu tests", "pytest -m gpu, each test <= 90 s", "all pass", measured, not bad)


def loss_correctness(ctx: Context) -> None:
    import torch

    from fastsfm import sfm_loss
    from fastsfm.bench.benchmark import loss_problem
    from fastsfm.loss.reference import sfm_reference

    sizes = [(5, 20, 24)] if ctx.smoke else [(100, 1000, 384), (1000, 10_000, 768), (1000, 50_000, 768)]
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}  # beyond the rounding floor
    worst: dict[str, tuple[float, float]] = {}  # dtype -> (largest error beyond the floor, that floor)
    for (c, n, d), dtype, objective, order in _product(
        sizes, list(tol), ("flow", "decouple"), ("contiguous", "shuffled")
    ):
        z, y, mu = loss_problem(n, c, d, device=ctx.device, order=order, seed=n + c)
        x = z.to(dtype).detach().requires_grad_()  # a leaf of its own even where ``z`` is already ``dtype``
        loss = sfm_loss(x, y, mu, objective=objective, backend="triton")
        (1024.0 * loss).backward()
        ref_in = x.detach().double().requires_grad_()
        want = sfm_reference(ref_in, y, mu, objective)
        (1024.0 * want).backward()
        loss_err = abs(loss.item() - want.item()) / max(abs(want.item()), 1e-6)
        exact = ref_in.grad
        grad_err = ((x.grad.double() - exact).norm() / exact.norm()).item()
        floor = ((exact.to(dtype).double() - exact).norm() / exact.norm()).item()
        key = str(dtype).replace("torch.", "")
        worst[key] = max(worst.get(key, (0.0, 0.0)), (grad_err - floor, floor))
        ok = loss_err < 1e-4 and grad_err - floor < tol[dtype]
        if not ok:
            name = f"C={c} N={n} D={d} {key} {objective} {order}"
            measured = f"loss {_fmt(loss_err)}, dL/dz {_fmt(grad_err)} (rounding floor {_fmt(floor)})"
            ctx.report.check("loss vs reference", name, f"dL/dz err - floor < {tol[dtype]}", measured, False)
    for key, (excess, floor) in worst.items():
        target = tol[getattr(torch, key)]
        ctx.report.check(
            "loss vs reference",
            f"{key}, both objectives and label orders, N up to {sizes[-1][1]:,}",
            f"relative L2 error of dL/dz beyond the {key} rounding of the exact gradient < {target}",
            f"{_fmt(excess)} beyond a floor of {_fmt(floor)}",
            excess < target,
        )


def _product(*lists):
    import itertools

    return itertools.product(*lists)


def sync_and_graphs(ctx: Context) -> None:
    if ctx.device.type != "cuda":
        ctx.report.check("host syncs, CUDA graphs", "SFMLoss", "CUDA only", "n/a on CPU", None)
        return
    import torch

    from fastsfm import SFMLoss
    from fastsfm.bench.benchmark import loss_problem

    z, y, mu = loss_problem(10_000, 1000, 768, device=ctx.device, seed=1)
    module = SFMLoss(mu).to(ctx.device)
    x = z.to(torch.bfloat16).requires_grad_()
    module(x, y).backward()  # validation and plan: the one call allowed to synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.grad = None
        module(x, y).backward()
        synced = "none"
    except RuntimeError as err:
        synced = str(err).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ctx.report.check(
        "host syncs, CUDA graphs", "SFMLoss fwd+bwd after the first call", "no host sync", synced, synced == "none"
    )
    eager = x.grad.clone()
    static_x = x.detach().clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(static_x, y).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        module(static_x, y).backward()
    graph.replay()
    same = torch.equal(static_x.grad, eager)
    ctx.report.check("host syncs, CUDA graphs", "graph capture + replay", "gradient equal to eager", str(same), same)


def bench_loss_section(ctx: Context) -> None:
    import torch

    bench_loss = _bench("bench_loss")

    shapes = [(5, 2, 2, 16)] if ctx.smoke else [(1000, 1, 1, 768), (1000, 10, 1, 768), (1000, 50, 1, 768)]
    rows = []
    for c, ipc, views, d in shapes:
        rows += bench_loss.bench_shape(
            c, ipc, views, d, torch.bfloat16 if not ctx.smoke else torch.float32, ctx.device, not ctx.smoke, 3.35
        )
    (ctx.report.out / "bench_loss.json").write_text(json.dumps(rows, indent=1))
    fused = {r["N"]: r for r in rows if r["method"] == "triton (fused)"}
    if not fused:
        ctx.report.check("loss benchmark", "ran", "rows", f"{len(rows)} rows (no fused kernel off CUDA)", len(rows) > 0)
        return
    by = {(r["N"], r["method"]): r for r in rows}
    big = max(fused)
    r = fused[big]
    ctx.report.check(
        "loss benchmark",
        f"fwd+bwd bf16 N={big:,} D=768 (floor: {_fmt(r['copy ms'] * 1e3, ' us')} copy of the same bytes here)",
        "<= 69 us (1.5x the H100 HBM floor)",
        f"{_fmt(r['fwd+bwd ms'] * 1e3, ' us')} (graph replay {_fmt(r['graph ms'] * 1e3, ' us')}, "
        f"{_fmt(r['fwd+bwd ms'] / r['copy ms'], 'x')} the copy)",
        ctx.target(r["fwd+bwd ms"] * 1e3 <= 69),
    )
    small = [n for n in fused if n <= 10_000]
    slowest = max(fused[n]["fwd+bwd ms"] for n in small) * 1e3
    graph = max(fused[n]["graph ms"] for n in small) * 1e3
    ctx.report.check(
        "loss benchmark",
        f"fwd+bwd bf16, N <= 10,000 (N = {sorted(small)})",
        "<= 40 us",
        f"{_fmt(slowest, ' us')} (graph replay {_fmt(graph, ' us')})",
        ctx.target(slowest <= 40),
    )
    for other, target in (("torch (eager)", 3.0), ("torch (compile)", 1.5)):
        if (big, other) in by:
            speedup = by[(big, other)]["fwd+bwd ms"] / r["fwd+bwd ms"]
            ctx.report.check(
                "loss benchmark",
                f"speed-up over {other}, N={big:,}",
                f">= {target}x",
                _fmt(speedup, "x"),
                speedup >= target,
            )
    extra = max(v["extra MiB"] for v in fused.values()) * 2**20
    ctx.report.check(
        "loss benchmark",
        "extra memory (C = 1000, D = 768)",
        f"<= 8*C*D = {8 * 1000 * 768 / 2**20:.2f} MiB",
        _fmt(extra / 2**20, " MiB"),
        extra <= 8 * 1000 * 768,
    )


def loss_profile_section(ctx: Context) -> None:
    """Device time per kernel and host time per call of the fused loss (``benches/profile_loss.py``):
    the loss benchmark times a step from the host, which on a slow host is launch overhead."""
    import torch

    profile_loss = _bench("profile_loss")
    shapes = [(5, 2, 24)] if ctx.smoke else [(1000, 1, 768), (1000, 50, 768)]
    results = []
    for c, ipc, d in shapes:
        result = profile_loss.profile_loss(c, ipc, d, torch.bfloat16, ctx.device, steps=2 if ctx.smoke else 50)
        results.append(result)
        kernels = ", ".join(f"{k['name'][:24]} {k['us']:.1f}" for k in result["kernels"][:4])
        ctx.report.check(
            "loss profile",
            f"bf16 C={c} N={result['N']:,} D={d}: device us per step (largest: {kernels or 'none on CPU'})",
            "information: the share of a copy of the same bytes",
            f"{_fmt(result['device us'])} us ({_fmt(result['x copy'] or 0.0)}x a copy of {_fmt(result['copy us'])} us)",
            None,
        )
        ctx.report.check(
            "loss profile",
            f"bf16 C={c} N={result['N']:,} D={d}: host us per step (cProfile on)",
            "information: launch and Python overhead",
            f"{_fmt(result['host us'])} us",
            None,
        )
    (ctx.report.out / "profile_loss.json").write_text(json.dumps(results, indent=1))


def sfm_vs_lgm_section(ctx: Context) -> None:
    """SFM vs LGM (10 views) at C = 100, IPC 1, ViT-B/16 and DINOv2-B/14 at 224 px (the issue's
    time and memory ratios); ``--smoke``: C = 3, 16 px, 2 views."""
    if ctx.smoke:
        base = {"backbone": "vit_tiny_patch16_224", "image_size": 16, "resolution": 16, "classes": 3, "ipc": 1}
        runs = [{**base, "method": "sfm"}, {**base, "method": "lgm", "views": 2}]
    else:
        runs = []
        for backbone in ("vit_base_patch16_224", "dinov2_vitb14"):
            base = {"backbone": backbone, "image_size": 224, "resolution": 256, "classes": 100, "ipc": 1}
            runs += [{**base, "method": "sfm"}, {**base, "method": "lgm", "views": 10}]
    rows = _distill_rows(ctx, runs, "sfm_vs_lgm.json")
    for r in (r for r in rows if r.get("time LGM/SFM")):
        name = f"LGM/SFM, {r['backbone']}, C={r['classes']}, IPC={r['ipc']}, LGM views={r['views']}"
        for what, target in (("time", 12), ("memory", 10)):
            ratio = r[f"{what} LGM/SFM"]
            ctx.report.check(
                "sfm vs lgm", f"{name}: {what}", f">= {target}x", _fmt(ratio, "x"), ctx.target(ratio >= target)
            )


def distill_at_scale_section(ctx: Context) -> None:
    """SFM at C = 1000 (DINOv2-B/14, 224 px), IPC 1 and 10 (chunked), and an offloaded set grown
    through every pyramid level (page-locked vs held bytes); ``--smoke``: C = 3 at 16 px."""
    bench_distill = _bench("bench_distill")
    if ctx.smoke:
        base = {"backbone": "vit_tiny_patch16_224", "image_size": 16, "resolution": 16, "classes": 3}
        runs, growth = [{**base, "method": "sfm", "ipc": 1}], (3, 2, 16)
    else:
        base = {"backbone": "dinov2_vitb14", "image_size": 224, "resolution": 256, "method": "sfm", "classes": 1000}
        runs, growth = [{**base, "ipc": 1}, {**base, "ipc": 10}], (100, 10, 256)
    rows = _distill_rows(ctx, runs, "distill_at_scale.json")
    for r in (r for r in rows if r.get("step ms")):
        minutes = r["step ms"] * 5000 / 6e4
        share = _fmt(r["tensor-core %"] or 0.0, "%")
        run = f"SFM {r['backbone']} C={r['classes']} IPC={r['ipc']}"
        name = f"{run}: 5000 steps (chunk {r['chunk']}, {share} of tensor peak)"
        target = "<= 20 min" if r["ipc"] == 1 else "runs chunked on one GPU"
        ok = minutes <= 20 if r["ipc"] == 1 else r["chunk"] < r["classes"] * r["ipc"]
        ctx.report.check("distill at scale", name, target, _fmt(minutes, " min"), ctx.target(ok))
    g = bench_distill.growth_row(*growth)
    ratio = g.get("pinned/data")
    ctx.report.check(
        "distill at scale",
        f"offloaded C={g['classes']} IPC={g['ipc']} set + Adam moments, every level ({_fmt(g['held GiB'], ' GiB')})",
        "page-locked <= 1.1x held",
        "n/a (no CUDA)" if ratio is None else _fmt(ratio, "x"),
        None if ratio is None else ratio <= 1.1,
    )


def _distill_rows(ctx: Context, runs: list[dict], name: str) -> list[dict]:
    """``benches/bench_distill.py``'s rows of ``runs`` (two timed steps each), each printed and
    written to ``name`` as it finishes, until the budget is spent; a run that fails is a check."""
    import argparse as ap

    bench_distill = _bench("bench_distill")
    args = ap.Namespace(device=str(ctx.device), precision="auto", steps=2, profile=not ctx.smoke, peak_tflops=989.0)
    rows = []
    for run in runs:
        if ctx.elapsed() > ctx.budget:
            break
        rows.append(bench_distill.measure(run, args))
        bench_distill.add_ratios(rows)
        print(json.dumps(rows[-1]), flush=True)
        (ctx.report.out / name).write_text(json.dumps(rows, indent=1))
    for r in (r for r in rows if "error" in r):
        ctx.report.check(
            "distill benchmark",
            f"{r['method']} {r['backbone']} C={r['classes']} IPC={r['ipc']}",
            "runs",
            r["error"],
            False,
        )
    return rows


def digits_section(ctx: Context) -> None:
    import tempfile

    from fastsfm.cli.demo import DEMO_CLASSIFIER, DEMO_DISTILL
    from fastsfm.data.datasets import digits
    from fastsfm.distill.loop import distill
    from fastsfm.models.backbones import load_backbone
    from fastsfm.stats import dataset_stats

    precision = "fp32" if ctx.smoke else "bf16"
    backbone = load_backbone("digits_vit", precision=precision, device=ctx.device)
    data = digits(32)
    stats = dataset_stats(backbone, data, DEMO_CLASSIFIER, ctx.device, workers=0, progress=False)
    config = replace(DEMO_DISTILL, steps=3 if ctx.smoke else 30, checkpoint_every=1000)  # the backbone's precision
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in (("whole", {}), ("chunked", {"chunk_size": 3}), ("offloaded", {"offload": True})):
            synset = distill(
                backbone, stats, replace(config, **variant), Path(tmp) / name, device=ctx.device, progress=False
            )
            images[name] = synset.render(device=ctx.device).float().cpu()
    tol = 1e-5 if ctx.smoke else 2e-2
    for name in ("chunked", "offloaded"):
        diff = (images[name] - images["whole"]).abs()
        ctx.report.check(
            "digits distillation",
            f"{precision}, {config.steps} steps: {name} vs whole (images in [0, 1])",
            f"mean |diff| <= {tol}",
            f"mean {_fmt(diff.mean().item())}, max {_fmt(diff.max().item())}",
            diff.mean().item() <= tol,
        )


SECTIONS = [
    ("environment", environment),
    ("pytest -m gpu", gpu_tests),
    ("loss vs reference", loss_correctness),
    ("host syncs, CUDA graphs", sync_and_graphs),
    ("loss benchmark", bench_loss_section),
    ("loss profile", loss_profile_section),
    ("sfm vs lgm", sfm_vs_lgm_section),
    ("distill at scale", distill_at_scale_section),
    ("digits distillation", digits_section),
]


def main(argv: list[str] | None = None) -> Report:
    _prepare_smoke(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benches/out/gpu_check"))
    parser.add_argument("--smoke", action="store_true", help="the same sequence on CPU with tiny sizes")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds after which remaining sections are skipped"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only these sections (names as in the report)")
    args = parser.parse_args(argv)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_check needs a CUDA device; use --smoke for the CPU rehearsal")
    ctx = Context(device, args.smoke, args.budget, Report(args.out))
    for name, section in SECTIONS:
        if args.only and name not in args.only and name != "environment":
            continue
        began = time.perf_counter()
        if ctx.elapsed() > ctx.budget:
            status = "skipped: time budget spent"
        else:
            print(f"\n== {name} ({ctx.elapsed():.0f} s)", flush=True)
            try:
                section(ctx)
                status = "done"
            except Exception as err:  # noqa: BLE001 - a broken section is reported, the others still run
                status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                ctx.report.check(name, "section ran", "no error", status, False)
        ctx.report.sections.append(
            {"section": name, "status": status, "seconds": round(time.perf_counter() - began, 1)}
        )
        ctx.report.write()
    failed = [c for c in ctx.report.checks if c["passed"] is False]
    print(f"\n{len(ctx.report.checks)} checks, {len(failed)} failed; wrote {args.out / 'report.md'} and report.json")
    verdict = {True: "pass", False: "FAIL", None: "info"}
    for c in ctx.report.checks:
        print(f"[{verdict[c['passed']]}] {c['section']}: {c['check']}: {c['measured']} (target {c['target']})")
    return ctx.report


if __name__ == "__main__":
    main()
