"""Big prints, measured: issue #13's three figures, each against a baseline run in the same invocation.

    .venv/bin/python bench/big_prints.py schedule [--size 512] [--stages 2] [--device cpu]
        One stage vs coarse to fine (`--stages`, default 2: 256 then 512 px at 512) at the same
        size: the coarse-to-fine run's time to reach the one-stage run's final total loss (its
        loss read every step, timed), and the ratio.

    .venv/bin/python bench/big_prints.py quality --outdir docs/big [--size 2048] [--small 512]
        The default run at 512 px and at 2048 px; the 2048 px result downscaled to 512 and its
        style and content losses measured there with the 512 px run's own targets (one definition
        for both pictures), the ratio; a side-by-side picture and same-place crops for the README.
        A result already in OUTDIR (512.png, 2048.png) is reused, not run again.

    .venv/bin/python bench/big_prints.py peak --size 4096 [--budget-mb 4096] [--steps 2]
        One run in a child process: its peak (torch.cuda.max_memory_allocated on CUDA, peak RSS
        on the CPU), its time, and the techniques each stage took, from report-like records.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGES = Path(os.environ.get("NSTD_IMAGES") or ROOT.parent / "shared" / "images")


def _pair():
    from nstd.engine import open_image

    return open_image(IMAGES / "tubingen.jpg"), open_image(IMAGES / "starry_night.jpg")


def schedule(args) -> None:
    from nstd.engine import Engine, StyleParams

    engine = Engine(device=args.device, precision=args.precision)
    content, style = _pair()
    print(f"{engine.device} ({engine.device.name}), {engine.precision}, {args.size} px, {args.steps} steps a first stage")
    curves = {}
    from nstd.engine.schedule import Stage

    if ":" in args.stages:  # SIZE:STEPS,... as nstd stylize --stages takes it
        staged = tuple(Stage(int(a), int(b)) for a, b in (x.split(":") for x in args.stages.split(",")))
    else:
        staged = int(args.stages) if args.stages.isdigit() else args.stages
    for name, stages in (("one stage", 1), ("coarse to fine", staged)):
        p = StyleParams(size=args.size, steps=args.steps, stages=stages, frame_every=0)
        t0, curve = time.perf_counter(), []
        result = engine.stylize(content, [(style, 1.0)], p,
                                progress=lambda i: curve.append((time.perf_counter() - t0, i.losses()["total"], i.step)))
        took = time.perf_counter() - t0
        curves[name] = (curve, result, took)
        print(f"{name:>15}: {took:6.1f} s, stages {[(max(s['size']), s['steps']) for s in result.stages]}, "
              f"final losses {', '.join(f'{k} {v:.4f}' for k, v in result.losses.items())}")
    goal = curves["one stage"][1].losses["total"]
    staged_curve, staged, took = curves["coarse to fine"]
    last_stage_from = sum(s["steps"] for s in staged.stages[:-1])
    reached = next((t for t, loss, step in staged_curve if step > last_stage_from and loss <= goal), None)
    base = curves["one stage"][2]
    if reached is None:
        print(f"coarse to fine did not reach the one-stage final loss {goal:.4f} (its own final "
              f"{staged.losses['total']:.4f}, {staged.losses['total'] / goal:.3f}x) in {took:.1f} s vs {base:.1f} s: "
              f"time ratio {took / base:.2f}")
    else:
        print(f"coarse to fine reached the one-stage final loss {goal:.4f} after {reached:.1f} s; one stage took "
              f"{base:.1f} s: ratio {reached / base:.2f} (whole runs: {took / base:.2f})")


def _measure(engine, picture, targets_style, content_small, p) -> dict[str, float]:
    """Content and style losses of `picture` at 512 px with the 512 px run's own targets."""
    import torch

    from nstd.engine import images
    from nstd.engine.losses import Objective, gram

    layers = tuple(dict.fromkeys((*p.content_layers, *p.style_layers)))
    ext = engine.network.extractor(layers, p.pooling)
    with torch.no_grad():
        c = ext(images.to_tensor(content_small))
        objective = Objective({k: c[k] for k in p.content_layers}, {k: targets_style[k] for k in p.style_layers},
                              p.content_weight, p.style_weight, 0.0)
        x = images.to_tensor(picture)
        return objective(ext(x), x).as_floats()


def quality(args) -> None:
    from PIL import Image

    from nstd.engine import Engine, StyleParams, images

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(device=args.device, precision=args.precision)
    content, style = _pair()
    runs = {}
    for size in (args.small, args.size):
        path = out / f"{size}.png"
        if path.exists():
            print(f"{size} px: reusing {path}")
            runs[size] = Image.open(path).convert("RGB")
            continue
        t0 = time.perf_counter()
        result = engine.stylize(content, [(style, 1.0)], StyleParams(size=size, frame_every=0))
        print(f"{size} px: {time.perf_counter() - t0:.1f} s, stages "
              f"{[(max(s['size']), s['steps']) for s in result.stages]}, losses {result.losses}")
        images.save(result.image, path)
        runs[size] = result.image
    p = StyleParams(size=args.small, stages=1)
    small_content = images.resize_long_edge(content, args.small)
    targets = engine.style_grams(style, max(small_content.size), p.style_layers, p.pooling)
    big_down = runs[args.size].resize(runs[args.small].size, Image.Resampling.LANCZOS)
    a = _measure(engine, runs[args.small], targets, small_content, p)
    b = _measure(engine, big_down, targets, small_content, p)
    print(f"measured at {args.small} px with the {args.small} px run's targets:")
    print(f"  {args.small} px result:            style {a['style']:.4f}, content {a['content']:.4f}")
    print(f"  {args.size} px result, downscaled: style {b['style']:.4f}, content {b['content']:.4f}")
    print(f"  style loss ratio {b['style'] / a['style']:.3f} (target: within 20 %), content {b['content'] / a['content']:.3f}")
    _figure(runs[args.small], runs[args.size], out, args.small, args.size)


def _figure(small, big, out: Path, small_size: int, big_size: int) -> None:
    """Side by side at one display size, and the same place cropped from each at its own pixels."""
    from PIL import Image

    w, h = small.size
    side = Image.new("RGB", (2 * w + 8, h), "white")
    side.paste(small, (0, 0))
    side.paste(big.resize((w, h), Image.Resampling.LANCZOS), (w + 8, 0))
    side.save(out / f"side_by_side_{small_size}_{big_size}.jpg", quality=90)
    # The same region (a quarter of the width, around the middle): at 512 px it is 128 px wide, at
    # 2048 px 512; both shown 384 px wide so a stroke's size relative to the picture can be compared.
    fx, fy, fw = 0.38, 0.30, 0.25
    crops = []
    for img in (small, big):
        W, H = img.size
        x0, y0, side_px = round(fx * W), round(fy * H), round(fw * W)
        box = (x0, y0, x0 + side_px, y0 + side_px)
        crops.append(img.crop(box).resize((384, 384), Image.Resampling.LANCZOS))
    sheet = Image.new("RGB", (384 * 2 + 8, 384), "white")
    sheet.paste(crops[0], (0, 0))
    sheet.paste(crops[1], (392, 0))
    sheet.save(out / f"crops_{small_size}_{big_size}.jpg", quality=90)
    print(f"wrote {out / f'side_by_side_{small_size}_{big_size}.jpg'} and {out / f'crops_{small_size}_{big_size}.jpg'}")


def peak(args) -> None:
    """Run one job in a child process (so its peak RSS is its own) and print what it used."""
    if args.child:
        _peak_child(args)
        return
    cmd = [sys.executable, __file__, "peak", "--child", "--size", str(args.size), "--steps", str(args.steps),
           "--device", args.device, "--precision", args.precision, "--stages", args.stages]
    if args.budget_mb:
        cmd += ["--budget-mb", str(args.budget_mb)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    print(done.stdout.strip())
    if done.returncode:
        print(done.stderr[-3000:])
        sys.exit(done.returncode)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"size {args.size}, budget {args.budget_mb or 'none'} MiB: process {took:.1f} s, peak RSS {rss / 2**20:.0f} MiB")


def _peak_child(args) -> None:
    from nstd.engine import Engine, StyleParams

    engine = Engine(device=args.device, precision=args.precision)
    content, style = _pair()
    stages = int(args.stages) if args.stages.isdigit() else args.stages
    p = StyleParams(size=args.size, steps=args.steps, stages=stages, frame_every=0)
    t0 = time.perf_counter()
    result = engine.stylize(content, [(style, 1.0)], p, budget_bytes=args.budget_mb * 2**20 if args.budget_mb else None)
    took = time.perf_counter() - t0
    print(json.dumps({"size": result.size, "seconds": round(took, 1), "device": result.device,
                      "device_name": result.device_name, "precision": result.precision,
                      "peak_memory_mib": result.peak_memory_bytes and round(result.peak_memory_bytes / 2**20),
                      "stages": [{k: s[k] for k in ("size", "steps", "seconds", "techniques", "lbfgs_history", "why")}
                                 | {"peak_mib": s["peak_memory_bytes"] and round(s["peak_memory_bytes"] / 2**20)}
                                 for s in result.stages]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("schedule", "quality", "peak"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="auto")
        s.add_argument("--precision", default="auto")
        s.add_argument("--steps", type=int, default=300)
    sub.choices["schedule"].add_argument("--size", type=int, default=512)
    sub.choices["schedule"].add_argument("--stages", default="2")
    q = sub.choices["quality"]
    q.add_argument("--size", type=int, default=2048)
    q.add_argument("--small", type=int, default=512)
    q.add_argument("--outdir", required=True)
    k = sub.choices["peak"]
    k.add_argument("--size", type=int, default=4096)
    k.add_argument("--budget-mb", type=int, default=0)
    k.add_argument("--stages", default="auto")
    k.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    {"schedule": schedule, "quality": quality, "peak": peak}[args.what](args)


if __name__ == "__main__":
    main()
