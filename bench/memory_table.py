"""Predicted vs measured peak memory of one stylization, for the README's table.

On a CUDA device it measures torch.cuda.max_memory_allocated for each size. On the CPU it measures
how far the process's peak RSS rises above its RSS before the job (sizes run in ascending order,
so each new peak is that job's): a coarser figure, as the allocator and thread pools add their own.
Usage:

    .venv/bin/python bench/memory_table.py [--device cuda] [--sizes 256 512 1024] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nstd.engine import Engine, StyleParams, open_image  # noqa: E402
from nstd.engine.images import fit_long_edge  # noqa: E402
from nstd.engine.memory import predict_peak_bytes  # noqa: E402

IMAGES = Path(os.environ.get("NSTD_IMAGES") or Path(__file__).resolve().parent.parent.parent / "shared" / "images")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optimizer", default="lbfgs")
    args = ap.parse_args()
    engine = Engine(device=args.device, precision=args.precision)
    content = open_image(IMAGES / "tubingen.jpg")
    style = open_image(IMAGES / "starry_night.jpg")
    print(f"device {engine.device} ({engine.device.name}), "
          f"precision {engine.precision}, optimizer {args.optimizer}, history {engine.lbfgs_history}")
    # Warm up first: the first job's RSS rise includes one-time library set-up (kernels, thread pools).
    engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=3, optimizer=args.optimizer, frame_every=0))
    print(f"{'size':>6} {'w x h':>11} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}")
    for size in sorted(args.sizes):
        params = StyleParams(size=size, steps=args.steps, optimizer=args.optimizer, stages=1, frame_every=0)
        w, h = fit_long_edge(content.size, size)
        layers = list(dict.fromkeys((*params.content_layers, *params.style_layers)))
        predicted = predict_peak_bytes(h, w, layers, args.optimizer, engine.lbfgs_history, engine.precision,
                                       device=engine.device.type, jitter=params.jitter)
        # L-BFGS's history fills up over `history` steps; run enough for the peak to show.
        steps = max(args.steps, engine.lbfgs_history + 2) if args.optimizer == "lbfgs" else args.steps
        params = StyleParams(size=size, steps=steps, optimizer=args.optimizer, stages=1, frame_every=0)
        if engine.device.is_cuda:
            engine.device.free_cache()
            measured = engine.stylize(content, [(style, 1.0)], params).peak_memory_bytes or 0
        else:
            before = rss_bytes()
            engine.stylize(content, [(style, 1.0)], params)
            measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print(f"{size:>6} {w:>5}x{h:<5} {predicted / 2**20:>14.0f} {measured / 2**20:>13.0f} {predicted / measured:>6.2f}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    main()
