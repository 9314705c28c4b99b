"""Regions, measured (bench/quality.py --regions): two styles, each in its soft-edged region, and
a part kept as the content, on a frozen set of setups (never tune a default to them).

    .venv/bin/python bench/quality.py --regions --size 256 --out /tmp/regions
    .venv/bin/python bench/quality.py --regions --size 256 "w2:style_loss=w2"   # other job keys

For each two-region setup: the masked run (job defaults, a mask per style) and an unmasked run of
each style. Inside each region (map positions the mask covers whole, nstd/engine/quality.py
`inside`), S_held of the masked result to that region's style over S_held of the unmasked run of
that style, measured at the same positions (the issue's target: at most 1.10). Along the edge,
`seam` (gradient energy in the mask's edge band over the regions' interiors; target at most 1.1)
of the masked result, and for reference of the two unmasked runs blended by the mask (what one
would do by hand) and of the content itself (what the picture's own edges give there).

For the kept part (a soft-edged ellipse that stays the content): nstd's way (kept whole in what
the network sees, its grey blended at the end) beside a blend at the end alone (the unmasked run
blended with the content by the mask): S_held outside the ellipse and the seam at its edge.

Writes into --out every result, the masks, regions.json and regions.jpg (per setup: the mask,
the masked result, the hand blend, and 1:1 crops of both at the edge, drawn 2x).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: name: (content, style in the white of the mask, style in the black, mask shape)
SETUPS = {
    "tubingen-starry|scream": ("tubingen.jpg", "starry_night.jpg", "the_scream.jpg", "split_v"),
    "golden_gate-shipwreck|matisse": ("golden_gate.jpg", "shipwreck.jpg", "woman-with-hat-matisse.jpg", "split_h"),
    "hoover-scream|starry": ("hoovertowernight.jpg", "the_scream.jpg", "starry_night.jpg", "ellipse"),
}
#: The kept part: (content, style, the mask of what stays the content)
KEEP = ("tubingen.jpg", "starry_night.jpg", "ellipse")
#: The masks' soft edge: a linear ramp this fraction of the long edge wide.
RAMP = 1 / 16
CROP = 96


def mask(shape: str, size: tuple[int, int]) -> Image.Image:
    """A soft-edged mask of `size` (w, h): white on the left (split_v), at the top (split_h) or
    inside a centred ellipse (ellipse)."""
    w, h = size
    ramp = RAMP * max(w, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if shape == "split_v":
        d = w / 2 - xx
    elif shape == "split_h":
        d = h / 2 - yy
    elif shape == "ellipse":
        ax, ay = 0.3 * w, 0.35 * h
        r = np.sqrt(((xx - w / 2) / ax) ** 2 + ((yy - h / 2) / ay) ** 2)
        d = (1 - r) * min(ax, ay)  # about the distance inside the edge, in pixels
    else:
        raise ValueError(shape)
    grey = np.clip(d / ramp + 0.5, 0, 1)
    return Image.fromarray((grey * 255).round().astype(np.uint8), "L")


def invert(m: Image.Image) -> Image.Image:
    return Image.eval(m, lambda v: 255 - v)


def blend(painted: Image.Image, content: Image.Image, keep: Image.Image) -> Image.Image:
    """`painted` where `keep` is black, `content` where white, mixed by its grey."""
    size = painted.size
    return Image.composite(content.resize(size, Image.Resampling.LANCZOS), painted,
                           keep.resize(size, Image.Resampling.BILINEAR))


def edge_window(m: Image.Image, size: tuple[int, int]) -> tuple[int, int, int]:
    """(left, top, side) of the square window (CROP, or half the picture's short edge if less)
    centred on the mask's edge point nearest the picture's centre."""
    a = np.asarray(m.resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255
    ys, xs = np.nonzero((a >= 0.25) & (a <= 0.75))
    w, h = size
    side = min(CROP, w // 2, h // 2)
    i = int(np.argmin((xs - w / 2) ** 2 + (ys - h / 2) ** 2))
    return int(np.clip(xs[i] - side // 2, 0, w - side)), int(np.clip(ys[i] - side // 2, 0, h - side)), side


def run(args, engine, judge, images_dir: Path, out: Path, keys: dict | None = None) -> int:
    """Every setup at --size with the job defaults and `keys` (the first setting's), judged."""
    from nstd.engine import StyleImage, images
    from nstd.engine.quality import seam
    from nstd.job import keys as jobkeys
    from nstd.job.spec import Job

    defaults = {k: f.default for k, f in jobkeys.JOB_FIELDS.items()}
    p = Job.of(jobkeys.merge(defaults, {**(keys or {}), "size": args.size, "gif": False})).params()
    record_path = out / "regions.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    opened: dict[str, Image.Image] = {}

    def open_(name: str) -> Image.Image:
        if name not in opened:
            opened[name] = images.open_image(images_dir / name)
        return opened[name]

    def result(name: str, content: str, styles: list, keep: Image.Image | None = None) -> Image.Image:
        path = out / f"{name}.{args.size}.png"
        if path.exists() and not args.fresh and record.get(name, {}).get("keys") == (keys or {}):
            return images.open_image(path)  # run before with the same keys (a seed, a loss...)
        t0 = time.perf_counter()
        r = engine.stylize(open_(content), styles, p, keep=keep)
        images.save(r.image, path)
        record[name] = {"seconds": round(time.perf_counter() - t0, 1), "e512": r.e512, "regions": r.regions,
                        "keys": keys or {}}
        record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
        return r.image

    print(f"# bench/quality.py --regions: {args.size} px, {engine.device} ({engine.device.name}), {engine.precision}; "
          f"job defaults; masks with a soft edge {RAMP:.4g} of the long edge; results in {out}\n")
    print("| setup | S_held A: masked / alone | S_held B: masked / alone | seam: masked | hand blend | content |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows, figure = [], []
    for name, (content_file, a_file, b_file, shape) in SETUPS.items():
        content = open_(content_file)
        ma = mask(shape, content.size)
        mb = invert(ma)
        ma.save(out / f"{name}.mask.png")
        masked = result(name, content_file, [StyleImage(open_(a_file), 1.0, mask=ma.convert("RGB")),
                                             StyleImage(open_(b_file), 1.0, mask=mb.convert("RGB"))])
        alone_a = result(f"{content_file[:-4]}+{a_file[:-4]}", content_file, [StyleImage(open_(a_file), 1.0)])
        alone_b = result(f"{content_file[:-4]}+{b_file[:-4]}", content_file, [StyleImage(open_(b_file), 1.0)])
        by_hand = Image.composite(alone_a, alone_b, ma.resize(masked.size, Image.Resampling.BILINEAR))
        row = {"setup": name}
        for key, style, m, alone in (("a", a_file, ma, alone_a), ("b", b_file, mb, alone_b)):
            got = judge.style_distance(masked, open_(style), where=m)
            ref = judge.style_distance(alone, open_(style), where=m)
            row[key] = {"masked": got, "alone": ref, "ratio": got / ref}
        row["seam"] = {"masked": seam(masked, ma), "by_hand": seam(by_hand, ma),
                       "content": seam(content.resize(masked.size, Image.Resampling.LANCZOS), ma)}
        rows.append(row)
        print(f"| {name} | {row['a']['masked']:.4f} / {row['a']['alone']:.4f} = {row['a']['ratio']:.3f} | "
              f"{row['b']['masked']:.4f} / {row['b']['alone']:.4f} = {row['b']['ratio']:.3f} | "
              f"{row['seam']['masked']:.3f} | {row['seam']['by_hand']:.3f} | {row['seam']['content']:.3f} |", flush=True)
        figure.append((name, ma, {"masked run": masked, "by hand": by_hand}))

    content_file, style_file, shape = KEEP
    content = open_(content_file)
    keep = mask(shape, content.size)
    keep.save(out / "keep.mask.png")
    ours = result("keep", content_file, [StyleImage(open_(style_file), 1.0)], keep=keep.convert("RGB"))
    at_end = blend(result(f"{content_file[:-4]}+{style_file[:-4]}", content_file, [StyleImage(open_(style_file), 1.0)]),
                   content, keep)
    outside = invert(keep)
    kept = {}
    for label, img in (("kept in the run", ours), ("blended at the end", at_end)):
        kept[label] = {"s_held_outside": judge.style_distance(img, open_(style_file), where=outside),
                       "seam": seam(img, keep)}
    print(f"\n## kept: {content_file} + {style_file}, a soft-edged ellipse kept\n")
    print("| how | S_held outside | seam at the edge |")
    print("| --- | --- | --- |")
    for label, v in kept.items():
        print(f"| {label} | {v['s_held_outside']:.4f} | {v['seam']:.3f} |")
    figure.append(("keep", keep, {"kept in the run": ours, "blended at the end": at_end}))

    ratios = [r[k]["ratio"] for r in rows for k in ("a", "b")]
    seams = [r["seam"]["masked"] for r in rows]
    print(f"\nS_held masked / alone: median {statistics.median(ratios):.3f}, worst {max(ratios):.3f} (target <= 1.10); "
          f"seam: median {statistics.median(seams):.3f}, worst {max(seams):.3f} (target <= 1.1)")
    (out / "regions.measures.json").write_text(json.dumps({"size": args.size, "setups": rows, "keep": kept}, indent=1))
    draw_figure(out / "regions.jpg", figure)
    return 0


def draw_figure(path: Path, rows: list) -> None:
    """Per row: the mask, the pictures, then each picture's CROP window at the edge drawn 2x."""
    cells = []
    for name, m, shots in rows:
        first = next(iter(shots.values()))
        left, top, side = edge_window(m, first.size)
        row = [("mask" if name != "keep" else "keep mask", m.resize(first.size, Image.Resampling.BILINEAR).convert("RGB"))]
        row += [(label, img) for label, img in shots.items()]
        row += [(f"{label}, 1:1 at the edge (2x)", img.crop((left, top, left + side, top + side)).resize(
            (2 * side, 2 * side), Image.Resampling.NEAREST)) for label, img in shots.items()]
        cells.append((name, row, (left, top, side)))
    width = max(sum(img.size[0] + 6 for _, img in row) for _, row, _ in cells)
    heights = [max(img.size[1] for _, img in row) + 30 for _, row, _ in cells]
    sheet = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (name, row, (left, top, side)), h in zip(cells, heights):
        draw.text((4, y + 2), name, fill="black")
        x = 0
        for i, (label, img) in enumerate(row):
            sheet.paste(img, (x, y + 26))
            draw.text((x + 2, y + 14), label, fill="black")
            if 0 < i <= (len(row) - 1) // 2:  # where the crops come from
                draw.rectangle((x + left, y + 26 + top, x + left + side - 1, y + 26 + top + side - 1), outline="red")
            x += img.size[0] + 6
        y += h
    sheet.save(path, quality=90)
