"""Large IPC on one device: SFM step time and peak memory vs IPC, chunked vs unchunked.

Chunking (``DistillConfig.chunk_size``) back-propagates the synthetic set a block of whole
classes at a time, so peak memory follows the chunk instead of C x IPC while the gradient
stays the unchunked one.  "unchunked" rows that run out of memory are reported as such.

    python benches/bench_scale.py                                   # CPU, tiny ViT
    python benches/bench_scale.py --backbone vit_base_patch16_224 --image-size 224 --classes 100 \\
        --ipcs 1,5,10,20 --chunk 200                                # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import measure_isolated  # noqa: E402
from common import device_name, print_table, write_csv  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipcs", default="1,4,16")
    parser.add_argument("--chunk", type=int, default=10, help="images per chunk in the chunked runs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benches/out/bench_scale.csv"))
    args = parser.parse_args(argv)
    print(f"# bench_scale on {device_name(torch.device(args.device))}, {args.backbone} at {args.image_size}px, "
          f"C={args.classes}")
    rows = []
    for ipc in (int(v) for v in args.ipcs.split(",")):
        for label, chunk in (("unchunked", 10**9), (f"chunks of {args.chunk}", args.chunk)):
            run = argparse.Namespace(device=args.device, backbone=args.backbone, image_size=args.image_size,
                                     resolution=args.image_size, classes=args.classes, steps=args.steps,
                                     sfm_chunk=chunk, lgm_augs=1)
            row = measure_isolated("sfm", ipc, run)
            row["images"] = ipc * args.classes
            row["chunking"] = label
            if row["step ms"]:
                row["images/s"] = 1e3 * row["images"] / row["step ms"]
            rows.append(row)
    print_table(rows)
    write_csv(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
