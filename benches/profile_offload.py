"""How much of an offloaded set's host<->GPU traffic the copy streams hide behind compute.

The same chunked SFM step (random-init backbone, every pyramid level grown, a fixed chunk size so both
runs do the same work) with the set resident on the GPU and offloaded to page-locked host memory
(:mod:`fastsfm.distill.streams`), for each ``--optimizer-state``: step time (median), bytes copied per
step (levels in both passes, moments' stored rows and write-backs in pass 2), the effective copy
bandwidth, and the *exposed* copy time -- offloaded minus resident step time -- against the time the
copies would take alone at that bandwidth.  ``--trace FILE`` writes a profiler trace of one offloaded
fp32 step (chrome://tracing, Perfetto) that shows the three streams.

    python benches/profile_offload.py --trace benches/out/offload_trace.json   # a GPU: C = 100, IPC 10, 256 px
    python benches/profile_offload.py --smoke               # tiny, on CPU (copies are synchronous there)

Prints a Markdown table; ``--out`` also writes the rows as JSON (after each mode); never touches tracked files.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fastsfm.bench.benchmark import markdown_table
from fastsfm.bench.timing import distill_setup, run_step, step_seconds
from fastsfm.config import BackboneConfig, DistillConfig, OptimizerState, choices
from fastsfm.io import atomic_write_json
from fastsfm.memory import profiler
from fastsfm.models.backbones import from_config


def _copied_bytes(synset, optim) -> int:
    """Bytes one chunked step moves: every level up in both passes, moments up and levels and moments down in pass 2."""
    levels = sum(t.numel() * t.element_size() for t in synset.levels)
    return 2 * levels + 2 * (levels + optim.nbytes())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny, on CPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows (default: the table on stdout only)")
    parser.add_argument("--trace", type=Path, default=None, help="a profiler trace of one offloaded fp32 step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.classes, args.ipc, args.resolution, args.chunk_size, args.steps = (
            "vit_tiny_patch16_224",
            3,
            2,
            16,
            2,
            2,
        )
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    options = BackboneConfig(random_init=True, image_size=16 if args.smoke else None)
    backbone = from_config(options, device, args.backbone)
    base = DistillConfig(ipc=args.ipc, resolution=args.resolution, chunk_size=args.chunk_size)
    rows, result = [], {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["torch"], result["rows"] = torch.__version__, rows
    for mode in choices(OptimizerState):
        times = {}
        for offload in (False, True):
            config = replace(base, offload=offload, optimizer_state=mode)
            synset, optim, objective = distill_setup(backbone, config, args.classes, device)
            times[offload] = statistics.median(step_seconds(objective, synset, optim, args.steps, device))
            if offload:
                copied = _copied_bytes(synset, optim)
                if mode == "fp32" and args.trace is not None:
                    with profiler(device) as prof:
                        run_step(objective, synset, optim, 99)
                    args.trace.parent.mkdir(parents=True, exist_ok=True)
                    prof.export_chrome_trace(str(args.trace))
            del synset, optim, objective
        exposed = max(times[True] - times[False], 0.0)
        rows.append(
            {
                "optimizer_state": mode,
                "resident ms": 1e3 * times[False],
                "offloaded ms": 1e3 * times[True],
                "copied MB/step": copied / 1e6,
                "copy GB/s (over the offloaded step)": copied / times[True] / 1e9,
                "exposed copy ms": 1e3 * exposed,
            }
        )
        if args.out is not None:
            atomic_write_json(args.out, result)
    print(f"offloaded vs resident chunked steps on {result['device']} ({vars(args)})\n")
    print(markdown_table(rows))
    return result


if __name__ == "__main__":
    main()
