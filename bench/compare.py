"""nstd stylize vs pastiche, side by side: same content, style, size, steps, pooling (avg), L-BFGS,
init (the content image) and seed, as whole processes, alternating, several rounds.

    .venv/bin/python bench/compare.py [--size 256] [--steps 100] [--rounds 3] [--device cpu]
    .venv/bin/python bench/compare.py --device cuda --size 512 --steps 300 --gif    # the GPU figure

Prints each tool's median wall time and the ratio, peak memory, and one quality figure computed the
same way for both results: nstd's relative content and style losses (caffe VGG-19, the default
layers) of each result image against the same inputs. Peak memory comes from one more run of each
tool through bench/peak.py: torch.cuda.max_memory_allocated on CUDA, peak RSS on the CPU.
`--gif` adds progress output to both: nstd's GIF (a frame every 5 steps), pastiche's workspace
PNGs every 5 steps (it writes no GIF).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(os.environ.get("NSTD_IMAGES") or REPO.parent / "shared" / "images")
BIN = Path(sys.executable).parent


def timed(cmd: list[str]) -> float:
    """Wall seconds of one child process."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def quality(result: Path, content: Path, style: Path, size: int) -> dict[str, float]:
    import torch

    from nstd.engine import Engine, images
    from nstd.engine.losses import Target, gram
    from nstd.engine.options import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS

    e = Engine(device="cpu", precision="fp32")
    img = images.open_image(result)
    layers = (*DEFAULT_CONTENT_LAYERS, *DEFAULT_STYLE_LAYERS)
    ext = e.network.extractor(layers, "avg")
    with torch.no_grad():
        x = ext(images.to_tensor(img))
        c = ext(images.to_tensor(images.resize_long_edge(images.open_image(content), size).resize(img.size)))
        grams = e.style_grams(images.open_image(style), max(img.size), DEFAULT_STYLE_LAYERS, "avg")
    content_loss = float(Target.of(c["conv4_2"]).loss(x["conv4_2"]))
    style_loss = sum(float(Target.of(grams[k]).loss(gram(x[k]))) for k in DEFAULT_STYLE_LAYERS) / len(DEFAULT_STYLE_LAYERS)
    return {"content": content_loss, "style": style_loss}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--content", default=str(IMAGES / "tubingen.jpg"))
    ap.add_argument("--style", default=str(IMAGES / "starry_night.jpg"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gif", action="store_true", help="progress output on both sides (see above)")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs (a GPU check short of time)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="nstd-compare-"))
    tools = {
        "nstd": [str(BIN / "nstd"), "stylize", args.content, args.style, "-o", str(out / "nstd.png"),
                 "--size", str(args.size), "--steps", str(args.steps), "--stages", "1", "--pooling", "avg", "--optimizer", "lbfgs",
                 "--seed", "0", "--device", args.device, "-q"],
        "pastiche": [str(BIN / "pastiche"), "--content", args.content, "--styles", args.style,
                     "--output", str(out / "pastiche.png"), "--size", str(args.size), "--style-size", str(args.size),
                     "--num-steps", str(args.steps), "--pooling", "avg", "--optimizer", "lbfgs", "--seed", "0",
                     "--device", args.device, "--no-verbose"],
    }
    if args.gif:
        tools["nstd"] += ["--gif", str(out / "nstd.gif"), "--gif-every", "5"]
        tools["pastiche"] += ["--workspace", str(out / "workspace"), "--workspace-step", "5"]
    times: dict[str, list[float]] = {k: [] for k in tools}
    peaks: dict[str, int] = {}
    for r in range(args.rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            wall = timed(tools[name])
            times[name].append(wall)
            print(f"round {r + 1}: {name:<8} {wall:7.1f} s", flush=True)
    cuda = args.device.startswith("cuda")
    for name, cmd in ({} if args.no_peak else tools).items():  # peak memory: one more run each, alone
        r = subprocess.run([sys.executable, str(REPO / "bench" / "peak.py"), *cmd], capture_output=True, text=True,
                           check=True)
        fields = dict(kv.split("=") for kv in r.stderr.strip().splitlines()[-1].split()[1:])
        peaks[name] = int(fields["cuda_bytes" if cuda else "rss_bytes"])
    q = {name: quality(out / f"{name}.png", Path(args.content), Path(args.style), args.size) for name in tools}
    med = {k: statistics.median(v) for k, v in times.items()}
    where = args.device
    if cuda:
        from nstd.engine.device import resolve

        where = f"{resolve(args.device)} ({resolve(args.device).name})"
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, device {where}, "
          f"{args.size} px, {args.steps} steps, {args.rounds} rounds alternating{', progress output on' if args.gif else ''}\n")
    peak = "peak CUDA MB (max_memory_allocated)" if cuda else "peak RSS MB"
    print(f"| tool | median s | {peak} | content loss | style loss |\n| --- | --- | --- | --- | --- |")
    for name in tools:
        mb = f"{peaks[name] / 2**20:.0f}" if name in peaks else "not run"
        print(f"| {name} | {med[name]:.1f} | {mb} | {q[name]['content']:.3f} | {q[name]['style']:.3f} |")
    print(f"\nnstd / pastiche time: {med['nstd'] / med['pastiche']:.2f}  (results in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
