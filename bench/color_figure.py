"""The README's colour figure: one pair in the three `preserve_color` modes, side by side.

    .venv/bin/python bench/color_figure.py [--size 256] [--steps 150] [-o docs/preserve_color.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nstd.engine import Engine, StyleParams, images  # noqa: E402

IMAGES = Path(os.environ.get("NSTD_IMAGES") or Path(__file__).resolve().parent.parent.parent / "shared" / "images")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--content", default="tubingen.jpg")
    ap.add_argument("--style", default="starry_night.jpg")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("-o", "--output", default="docs/preserve_color.png")
    args = ap.parse_args()
    engine = Engine(device="auto", precision="fp32")
    content, style = images.open_image(IMAGES / args.content), images.open_image(IMAGES / args.style)
    panels = []
    for mode in ("none", "luminance", "histogram"):
        t0 = time.perf_counter()
        r = engine.stylize(content, [(style, 1.0)], StyleParams(size=args.size, steps=args.steps, frame_every=0,
                                                                preserve_color=mode))
        print(f"{mode}: {time.perf_counter() - t0:.1f} s, losses {r.losses}", flush=True)
        panels.append((f"preserve_color: {mode}", r.image))
    w, h = panels[0][1].size
    thumb = images.resize_long_edge(style, h // 2)
    sheet = Image.new("RGB", (3 * w + thumb.width + 40, h + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        sheet.paste(img, (i * (w + 10), 24))
        draw.text((i * (w + 10) + 4, 6), label, fill="black")
    x = 3 * (w + 10) + 10
    sheet.paste(images.resize_long_edge(content, h // 2), (x, 24))
    sheet.paste(thumb, (x, 24 + h // 2))
    draw.text((x, 6), "content / style", fill="black")
    sheet.save(args.output, optimize=True)
    print(f"wrote {args.output} ({sheet.size[0]}x{sheet.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
