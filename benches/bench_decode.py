"""Image decode throughput of this machine: PIL vs ``torchvision.io.decode_jpeg`` on its CPU cores, and
``decode_jpeg`` on the GPU where there is one -- what bounds a statistics pass's images per second.

    python benches/bench_decode.py                 # 256 JPEGs of 500 x 375 (ImageNet's typical size)
    python benches/bench_decode.py --images 64 --smoke

JPEGs are made here (random smooth images, quality 90), held in memory (no disk in the timing).
Per decoder: images/s on one core and with every core (``--workers`` processes, PIL), and the
hours one ImageNet-1k pass (1,281,167 images) would take at that rate.  Writes nothing unless ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsfm.bench.benchmark import environment, print_table

IMAGENET_TRAIN = 1_281_167


def jpegs(count: int, width: int, height: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _pil(blobs: list[bytes]) -> int:
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").load()
    return len(blobs)


def _torchvision(blobs: list[bytes], device: str = "cpu") -> int:
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    if device == "cpu":
        for d in data:
            decode_jpeg(d)
    else:
        decode_jpeg(data, device=device)  # one batched call on the GPU
        torch.cuda.synchronize()
    return len(blobs)


def _rate(fn, blobs: list[bytes]) -> float:
    fn(blobs[:4])  # warm-up
    began = time.perf_counter()
    n = fn(blobs)
    return n / (time.perf_counter() - began)


def _pooled(blobs: list[bytes], workers: int) -> float:
    parts = [blobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_pil, [p[:2] for p in parts]))
        began = time.perf_counter()
        n = sum(pool.map(_pil, parts))
    return n / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--smoke", action="store_true", help="small images, few of them")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    size = (64, 48) if args.smoke else (500, 375)
    blobs = jpegs(min(args.images, 16) if args.smoke else args.images, *size)
    cuda = torch.cuda.is_available()
    print(environment(torch.device("cuda" if cuda else "cpu")))
    rows = [
        {"decoder": "PIL, 1 core", "images/s": _rate(_pil, blobs)},
        {"decoder": "torchvision decode_jpeg, 1 core", "images/s": _rate(_torchvision, blobs)},
        {"decoder": f"PIL, {args.workers} processes", "images/s": _pooled(blobs, args.workers)},
    ]
    if cuda:
        rows.append(
            {
                "decoder": "torchvision decode_jpeg, GPU (batched)",
                "images/s": _rate(lambda b: _torchvision(b, "cuda"), blobs),
            }
        )
    for row in rows:
        row["ImageNet-1k pass h"] = IMAGENET_TRAIN / row["images/s"] / 3600
        row["image"] = f"{size[0]}x{size[1]} JPEG"
    print_table(rows)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
