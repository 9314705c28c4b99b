"""How many network passes a picture needs (#30): each setting run once for --e512 passes, its
picture judged every --every steps (held-out S_held and C_held, nstd/engine/quality.py), so one
run gives the whole curve of quality against E512.

    .venv/bin/python bench/passes.py --size 512 --e512 1000 --every 25 --out /tmp/p    # the reference
    .venv/bin/python bench/passes.py --size 512 --ref-e512 1000 --e512 100 --every 25 --out /tmp/p \
        ref "c2f:stages=[{size: 128, steps: 200}, {size: 512, steps: 100}]"   # against it (reused)

For each pair and setting: the curve into --out/passes.json (at each judged step: E512, S_held,
C_held, moiré, clipped and the optimised loss; the run's last point also holds every step's
losses, for trying stop rules offline; `--pictures` keeps the judged pictures), and the
E512 at which the run first reached 98 % of the first setting's last S_held improvement (from the
starting picture: the content, as the default `init` starts) with C_held at most 2 % over its
last (the issue's target as docs/quality.md reads it: a picture nearer the content at the same
style is no worse), and beside it with C_held within 2 % either way; '-' if never.
A setting is NAME or NAME:KEY=VALUE;... as in bench/quality.py (its keys are job keys; `steps`
is set from --e512 unless given; a list of `stages` runs as it says, whatever --e512 and --size;
only pictures at the last stage's size count as reaching). Judging a checkpoint costs two passes
of the judge's network outside the run: it is not counted in E512 and no seconds are printed.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: The share of the reference's S_held improvement a run must reach, and how far its C_held may be
#: from the reference's (#30's targets).
REACH, C_WITHIN = 0.98, 0.02


def curve(engine, judge, content, style, size: int, keys: dict, e512: float, every: int,
          pictures: Path | None = None) -> list[dict]:
    """[{step, e512, s_held, c_held, ...}] of one run of `keys` (job keys over the defaults) for
    `e512`; each judged picture also saved into `pictures` (a folder) if given."""
    from nstd.engine import Progress, images
    from nstd.engine.quality import clipped, moire
    from nstd.engine.params import E512_PIXELS
    from nstd.job import keys as jobkeys
    from nstd.job.spec import Job

    w, h = images.fit_long_edge(content.size, size)
    steps = max(1, math.ceil(e512 * E512_PIXELS / (w * h)))
    defaults = {k: f.default for k, f in jobkeys.JOB_FIELDS.items()}
    given = {"size": size, "steps": steps} if not isinstance(keys.get("stages"), list) else {}  # a list says both
    job = Job.of(jobkeys.merge(defaults, {**given, **keys, "gif": False}))
    p = job.params()
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
    points: list[dict] = []
    spent = {"e512": 0.0, "step": 0}
    losses: list[dict] = []  # the optimised losses after each step: what a stop rule could see

    class Judged(Progress):
        checkpoint_every = every

        def on_step(self, info) -> None:
            spent["e512"], spent["step"] = info.e512, info.step
            losses.append({k: round(v, 6) for k, v in info.losses().items()})

        def on_checkpoint(self, cp) -> None:
            if cp.image is None or cp.image.shape[1] != 3:
                raise SystemExit("bench/passes.py: a checkpoint without a colour picture (a colour mode?)")
            img = images.to_pil(cp.image)
            if pictures is not None:
                img.save(pictures / f"step{cp.step:05d}.png")
            points.append({"step": cp.step, "e512": round(spent["e512"], 4), "size": list(img.size),
                           "s_held": judge.style_distance(img, style), "c_held": judge.content_distance(img, content),
                           "loss": losses[-1]["total"], "moire": moire(img), "clipped": clipped(img)})

    init_image = images.open_image(Path(job.init)) if p.init == "image" else None  # `init:` a file
    result = engine.stylize(content, [(style, 1.0)], p, init_image=init_image, progress=Judged())
    if pictures is not None:
        result.image.save(pictures / f"step{spent['step']:05d}.png")
    if not points or points[-1]["step"] != spent["step"]:
        points.append({"step": spent["step"], "e512": round(spent["e512"], 4), "size": list(result.image.size),
                       "s_held": judge.style_distance(result.image, style),
                       "c_held": judge.content_distance(result.image, content), "loss": losses[-1]["total"],
                       "moire": moire(result.image), "clipped": clipped(result.image)})
    points[-1]["losses"] = losses
    return points


def reached(points: list[dict], s_start: float, ref: dict, both_ways: bool = False) -> float | None:
    """The first E512 at which `points` (at their last size) reach REACH of the improvement from
    s_start to ref's S_held, with C_held at most C_WITHIN over ref's (both_ways: within C_WITHIN
    of it either way); None if never."""
    goal = s_start - REACH * (s_start - ref["s_held"])
    for pt in points:
        off = (pt["c_held"] - ref["c_held"]) / ref["c_held"]
        if pt.get("size") == points[-1].get("size") and pt["s_held"] <= goal and \
                (abs(off) if both_ways else off) <= C_WITHIN:
            return pt["e512"]
    return None


def median(got: list) -> float | None:
    """The median of `got`, None if any is None (a pair that never reached counts as never)."""
    return None if any(g is None for g in got) else statistics.median(got)


def shown(e512: float | None) -> str:
    return "-" if e512 is None else f"{e512:.1f}"


def main(argv: list[str] | None = None) -> int:
    from quality import IMAGES, PAIRS, parse_setting, write_figures

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="*", default=["default"], help="the first is the reference (default: the job defaults)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--e512", type=float, default=100.0, help="passes per run, in E512 (sets `steps`)")
    ap.add_argument("--ref-e512", type=float, default=None, help="the reference's (the first setting's) passes (default: --e512)")
    ap.add_argument("--every", type=int, default=10, help="judge the picture every this many steps")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--out", required=True, help="folder for passes.json (runs already there are reused)")
    ap.add_argument("--pictures", action="store_true", help="also save each judged picture under --out/PAIR/SETTING/")
    ap.add_argument("--curves", action="store_true", help="also print each run's judged points (E512, S_held, C_held, "
                    "moiré, clipped, loss)")
    ap.add_argument("--figure", default="", help="with --pictures: 1:1 crops of each run at these steps (comma-separated), "
                    "as bench/quality.py draws them, into --out/PAIR.SETTING.crops.png")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    ref_e512 = args.e512 if args.ref_e512 is None else args.ref_e512
    if args.every < 1 or args.e512 <= 0 or ref_e512 <= 0:
        ap.error("--every, --e512 and --ref-e512 must be positive")

    from PIL import Image

    from nstd.engine import Engine, images
    from nstd.engine.quality import Judge

    settings = [parse_setting(s) for s in args.settings]
    if any(kind != "nstd" for _, kind, _ in settings):
        ap.error("only nstd settings have checkpoints to judge")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "passes.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    engine = Engine(device=args.device, precision=args.precision)
    judge = Judge(engine.network)
    print(f"# bench/passes.py: {args.size} px, {args.e512:g} E512 per run ({settings[0][0]}: {ref_e512:g}), "
          f"judged every {args.every} steps, "
          f"{engine.device} ({engine.device.name}), {engine.precision}\n")
    print(f"| pair | setting | S_held start | S_held last | C_held last | E512 to {REACH:.0%} of {settings[0][0]}'s, "
          f"C_held at most +{C_WITHIN:.0%} | the same, C_held within ±{C_WITHIN:.0%} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    hits: dict[str, list] = {name: [] for name, _, _ in settings}
    hits2: dict[str, list] = {name: [] for name, _, _ in settings}
    runs: list[tuple[str, str, list[dict]]] = []
    for pair in [p for p in args.pairs.split(",") if p]:
        content_file, style_file = PAIRS[pair]
        content, style = images.open_image(IMAGES / content_file), images.open_image(IMAGES / style_file)
        start = judge.style_distance(images.resize_long_edge(content, args.size), style)
        ref = None
        for i, (name, _, keys) in enumerate(settings):
            e512 = ref_e512 if i == 0 else args.e512
            key = f"{pair}|{name}|{args.size}|{e512:g}|{args.every}|{json.dumps(keys, sort_keys=True)}"
            shot_dir = out / pair / f"{name}-{args.size}-{e512:g}"  # --pictures keeps the run's pictures here
            if key not in record:
                record[key] = curve(engine, judge, content, style, args.size, keys, e512, args.every,
                                    shot_dir if args.pictures else None)
                record_path.write_text(json.dumps(record, indent=1))
            points = record[key]
            ref = ref or points[-1]
            hit, hit2 = reached(points, start, ref), reached(points, start, ref, both_ways=True)
            hits[name].append(hit)
            hits2[name].append(hit2)
            print(f"| {pair} | {name} | {start:.4f} | {points[-1]['s_held']:.4f} | {points[-1]['c_held']:.4f} | "
                  f"{shown(hit)} | {shown(hit2)} |", flush=True)
            runs.append((pair, name, points))
            if args.figure:
                shots = {f"{name}, {n} steps": Image.open(shot_dir / f"step{int(n):05d}.png").convert("RGB")
                         for n in args.figure.split(",") if (shot_dir / f"step{int(n):05d}.png").is_file()}
                if shots:
                    write_figures(out, f"{pair}.{name}", shots)
    print("\n| setting | E512 to reach (C_held at most +2 %), median over pairs | the same, within ±2 % |\n| --- | --- | --- |")
    for name in hits:
        print(f"| {name} | {shown(median(hits[name]))} | {shown(median(hits2[name]))} |")
    for pair, name, points in runs if args.curves else []:
        print(f"\n{pair}, {name}:\n\n| step | E512 | S_held | C_held | moiré | clipped % | loss |\n| --- | --- | --- | --- | --- | --- | --- |")
        for pt in points:
            print(f"| {pt['step']} | {pt['e512']:.1f} | {pt['s_held']:.4f} | {pt['c_held']:.3f} | {pt.get('moire', 0):.1f} | "
                  f"{100 * pt.get('clipped', 0):.2f} | {pt.get('loss', 0):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
