"""The cost of a step for each style loss (job key style_loss), against Gram's, in one invocation.

    .venv/bin/python bench/style_loss_cost.py --device cpu --size 256 --steps 20

One process, one network; each setting runs the same job (tubingen + starry_night, one stage,
content init, seed 0, no GIF) after a warm-up job, and reports the optimisation's wall time per
step (`timings.optimise`: eager steps on the CPU, a replayed CUDA graph on a GPU), its ratio to
Gram's, the final style loss (each kind's own: not comparable across kinds) and, with --judge,
S_held (docs/quality.md), the held-out style distance, which is. `sliced K=C/2` draws half as many
directions as channels (styleloss.SLICED_RATIO); `sliced 1 set` keeps one set of directions for
every step instead of cycling through SLICED_SETS (styleloss.py). --regions N also runs each
setting with N masked regions (soft vertical bands, the same style in each; engine/regions.py)
and prints its ratio to the same setting unmasked.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NSTD_IMAGES") or ROOT.parent / "shared" / "images")
SETTINGS = (("gram", "gram", 1.0, None), ("w2", "w2", 1.0, None), ("sliced K=C", "sliced", 1.0, None),
            ("sliced K=C/2", "sliced", 0.5, None), ("sliced 1 set", "sliced", 1.0, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--repeat", type=int, default=1, help="runs per setting, the fastest counts")
    p.add_argument("--judge", action="store_true", help="also S_held of each result")
    p.add_argument("--regions", type=int, default=0, help="also each setting with this many masked regions")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from nstd.engine import Engine, StyleImage, StyleParams, open_image
    from nstd.engine import styleloss

    if a.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    engine = Engine(device=a.device, precision=a.precision)
    content, style = open_image(IMAGES / "tubingen.jpg"), open_image(IMAGES / "starry_night.jpg")
    engine.stylize(content, [(style, 1.0)], StyleParams(size=64, steps=3, stages=1, frame_every=0))  # warm-up
    judge = None
    if a.judge:
        from nstd.engine.quality import Judge
        judge = Judge(engine.network)
    print(f"device {engine.device} ({engine.precision}), {a.size} px, {a.steps} steps, one stage")
    print(f"{'style_loss':<14} {'ms/step':>9} {'x gram':>7} {'style':>8}" + (f" {'S_held':>7}" if judge else ""))
    base = None
    plain = [(style, 1.0)]
    masked = [StyleImage(style, 1.0, mask=m) for m in bands(content.size, a.regions)] if a.regions else None
    sets = styleloss.SLICED_SETS
    for name, kind, ratio, one in SETTINGS:
        styleloss.SLICED_RATIO, styleloss.SLICED_SETS = ratio, one or sets
        unmasked = None
        for label, styles in ((name, plain), *(((f"  {a.regions} regions", masked),) if masked else ())):
            best = None
            for _ in range(a.repeat):
                params = StyleParams(size=a.size, steps=a.steps, stages=1, frame_every=0, style_loss=kind)
                r = engine.stylize(content, styles, params)
                ms = r.timings["optimise"] / a.steps * 1000
                best = ms if best is None else min(best, ms)
            base, unmasked = base or best, unmasked or best
            line = f"{label:<14} {best:9.1f} {best / base:7.2f} {r.losses['style']:8.4f}"
            if judge:
                line += f" {judge.style_distance(r.image, style):7.4f}"
            if styles is masked:
                line += f"   x {best / unmasked:.2f} the same setting unmasked"
            print(line, flush=True)
    styleloss.SLICED_RATIO, styleloss.SLICED_SETS = 1.0, sets
    return 0


def bands(size: tuple[int, int], n: int) -> list:
    """`n` soft vertical bands that add up to white everywhere (masks of `size`)."""
    import numpy as np
    from PIL import Image

    w, h = size
    x = (np.arange(w) + 0.5) / w * n
    out = []
    for i in range(n):
        grey = np.clip((0.5 - np.abs(x - (i + 0.5))) / 0.25 + 0.5, 0, 1)  # linear ramps a quarter band wide
        if i == 0:
            grey[x < 0.5] = 1
        if i == n - 1:
            grey[x > n - 0.5] = 1
        out.append(grey)
    total = sum(out)
    return [Image.fromarray(np.tile((g / total * 255).round().astype(np.uint8), (h, 1)), "L").convert("RGB")
            for g in out]


if __name__ == "__main__":
    raise SystemExit(main())
