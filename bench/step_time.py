"""Time per step of the optimisation: eager against a replayed CUDA graph, fp32 against bf16.

    .venv/bin/python bench/step_time.py --device cuda --sizes 256 512 1024 --steps 300
    .venv/bin/python bench/step_time.py --device cpu --sizes 256 --steps 100

One process, one network; each setting runs the same job (tubingen + starry_night, content init,
seed 0, a GIF frame every 5 steps as the issue's target has) and reports the optimisation's wall
time (`timings.optimise`, including the warm-up, the capture and the frames), ms per step, the
final losses, and against the first row of its size (eager fp32: the baseline, run in the same
invocation) the speed and the final losses' ratios, "ok" where both are within 2 %. On the CPU there is no graph,
so only the precisions differ.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NSTD_IMAGES") or ROOT.parent / "shared" / "images")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gif-every", type=int, default=5, help="a GIF frame every N steps (0: none), as the target has")
    args = p.parse_args()

    from nstd.engine import Engine, StyleParams, open_image

    content, style = open_image(IMAGES / "tubingen.jpg"), open_image(IMAGES / "starry_night.jpg")
    settings = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    if not args.device.startswith("cuda"):
        settings = [("fp32", False), ("bf16", False)]
    engines = {}
    print(f"| size | precision | graph | optimise s | stylize() s | ms/step | content | style | speed vs eager fp32 | "
          f"content, style vs eager fp32 | quality (2 %) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        base = base_losses = None
        for precision, graphs in settings:
            key = (precision, graphs)
            if key not in engines:
                engines[key] = Engine(device=args.device, precision=precision, cuda_graphs=graphs)
            engine = engines[key]
            params = StyleParams(size=size, steps=args.steps, stages=1, frame_every=args.gif_every)
            engine.stylize(content, [(style, 1.0)], StyleParams(size=size, steps=8, stages=1, frame_every=0))  # warm
            t0 = time.perf_counter()
            r = engine.stylize(content, [(style, 1.0)], params)
            whole = time.perf_counter() - t0  # + targets, + the frames still to convert after the loop
            t = r.timings["optimise"]
            base = base or t
            base_losses = base_losses or r.losses
            rc, rs = (r.losses[k] / base_losses[k] for k in ("content", "style"))
            verdict = "ok" if max(abs(rc - 1), abs(rs - 1)) <= 0.02 else "OVER 2 %"
            print(f"| {size} | {precision} | {'yes' if r.cuda_graph else 'no'} | {t:.2f} | {whole:.2f} | {1000 * t / args.steps:.2f} | "
                  f"{r.losses['content']:.4g} | {r.losses['style']:.4g} | {base / t:.2f}x | {rc:.3f}, {rs:.3f} | "
                  f"{verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
