"""Registers, spills, shared memory and global access widths of every kernel specialisation, per GPU
architecture, compiled here without a GPU (:mod:`fastsfm.bench.kernel_report`).

    python benches/compile_report.py                       # sm_90 and sm_80, C = 1000, IPC = 10
    python benches/compile_report.py --arch 90 --json benches/out/compile.json

Prints a summary per (kernel, architecture) -- the largest register count, spill and shared
memory over all its specialisations, and the global accesses and bytes kept in flight per SM
(software-pipelined loads) of the hot path (one loss
forward+backward at C = 1000, N = 10,000, D = 768, shuffled labels, for bfloat16 features and
for the float32 ones a distillation step passes) -- then the programs of each launch of those
forward+backward passes.  The
full table (one row per launch and architecture) goes to ``--csv`` and ``--json``.  Needs a
process without ``TRITON_INTERPRET=1``; prints why and exits 0 where the installed Triton
cannot compile for NVIDIA GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def summarise(rows: list[dict], hot: str) -> list[dict]:
    """One row per (kernel, arch): the worst registers, spills and shared memory over all its
    specialisations, and the global accesses of its launch in each scenario starting with ``hot``
    (16-byte ones in parentheses; one column per dtype, the scenario's last word)."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        s = out.setdefault(
            (r["kernel"], r["arch"]),
            {"kernel": r["kernel"], "arch": r["arch"], "specialisations": 0, "max registers": 0, "spill B": 0},
        )
        s["specialisations"] += 1
        s["max registers"] = max(s["max registers"], r["registers"])
        s["spill B"] = max(s["spill B"], r["spill_stores"] + r["spill_loads"])
        s["max smem B"] = max(s.get("max smem B", 0), r["shared_bytes"])
        if r["scenario"].startswith(hot):
            dtype = r["scenario"].split()[-1]
            s[f"{dtype} loads (16 B)"] = f"{r['global_loads']} ({r['wide_loads']})"
            s[f"{dtype} stores (16 B)"] = f"{r['global_stores']} ({r['wide_stores']})"
            s[f"{dtype} KB in flight / SM"] = f"{r['in_flight_kb_sm']:.0f}"
    return list(out.values())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("benches/out/compile_report.json"))
    parser.add_argument("--csv", type=Path, default=Path("benches/out/compile_report.csv"))
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (by the next import)
    from fastsfm.bench import kernel_report
    from fastsfm.bench.benchmark import environment, print_table, write_csv

    reason = kernel_report.unavailable()
    if reason:
        print(f"compile report skipped: {reason}")
        return []
    import torch

    rows = [r.as_dict() for r in kernel_report.report(tuple(args.arch), args.classes, args.ipc)]
    print(f"# compile_report: {environment(torch.device('cpu'))}, targets {[f'sm_{a}' for a in args.arch]}")
    print_table(summarise(rows, kernel_report.LOSS_SCENARIO))
    loss = [r for r in rows if r["scenario"].startswith(kernel_report.LOSS_SCENARIO)]
    print(f"\nlaunches of one {kernel_report.LOSS_SCENARIO}:")
    columns = ["scenario", "kernel", "arch", "programs", "registers", "global_loads", "wide_loads", "in_flight_kb_sm"]
    print_table(loss, columns)
    write_csv(rows, args.csv)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.csv} and {args.json}")
    return rows


if __name__ == "__main__":
    main()
