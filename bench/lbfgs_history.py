"""L-BFGS history length: time, final losses and predicted peak memory, in one process.

    .venv/bin/python bench/lbfgs_history.py [--size 256] [--steps 100] [--histories 10 20 50 100]

Each history runs the same stylization (tubingen + starry_night, seed 0, content init) on one
Engine; rounds alternate the order. The memory columns are the model's prediction at 512 and
1024 px (the optimiser's state is 2 x history picture-sized vectors, the part history changes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nstd.engine import Engine, StyleParams, open_image  # noqa: E402
from nstd.engine.images import fit_long_edge  # noqa: E402
from nstd.engine.memory import predict_peak_bytes  # noqa: E402

IMAGES = Path(os.environ.get("NSTD_IMAGES") or Path(__file__).resolve().parent.parent.parent / "shared" / "images")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--histories", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    engine = Engine(device=args.device, precision="fp32")
    content = open_image(IMAGES / "tubingen.jpg")
    style = open_image(IMAGES / "starry_night.jpg")
    p = StyleParams(size=args.size, steps=args.steps, stages=1, frame_every=0)
    times: dict[int, list[float]] = {h: [] for h in args.histories}
    losses: dict[int, dict] = {}
    for r in range(args.rounds):
        for h in (args.histories if r % 2 == 0 else list(reversed(args.histories))):
            engine.lbfgs_history = h
            t0 = time.perf_counter()
            res = engine.stylize(content, [(style, 1.0)], p)
            times[h].append(time.perf_counter() - t0)
            losses[h] = res.losses
            print(f"round {r + 1}: history {h}: {times[h][-1]:.1f} s, losses {res.losses}", file=sys.stderr)
    layers = list(dict.fromkeys((*p.content_layers, *p.style_layers)))
    print(f"\n{engine.device}, {args.size} px, {args.steps} steps, {args.rounds} round(s)\n")
    print("| history | median s | content loss | style loss | total | predicted MiB 512 px | predicted MiB 1024 px |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for h in args.histories:
        mem = []
        for edge in (512, 1024):
            w, hh = fit_long_edge(content.size, edge)
            mem.append(predict_peak_bytes(hh, w, layers, "lbfgs", h, "fp32", "avg") / 2**20)
        l = losses[h]
        print(f"| {h} | {statistics.median(times[h]):.1f} | {l['content']:.3f} | {l['style']:.4f} | {l['total']:.3f} | "
              f"{mem[0]:.0f} | {mem[1]:.0f} |")


if __name__ == "__main__":
    main()
