"""`nstd stylize`: one job without the daemon, its budget policy, its report and its last line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nstd.commands.base import UsageError, as_bad_input, config_of
from nstd.config import CONFIG_FIELDS, memory_budget
from nstd.engine.images import format_for_suffix
from nstd.engine.options import NAMED_INITS, mask_ratio_problem
from nstd.errors import ExitCode
from nstd.fsutil import atomic_write_text
from nstd.job.keys import GIF_FIELDS, merge
from nstd.job.spec import Job
from nstd.report import run_fields
from nstd.schema import SchemaError, validate
from nstd.terminal import Bar, peak_rss, reporter


def main(args: argparse.Namespace) -> int:
    # Imports here keep `nstd --help` fast.
    from nstd.engine import Engine, StyleImage, images, regions

    with as_bad_input():
        cfg = config_of(args, required=False)
        settings, engine_cfg = _job_from_args(args, cfg)
        job = Job.of(settings)
        out = Path(args.output)
        out_format = images.format_for_suffix(out)
        if args.gif and Path(args.gif).suffix.lower() != ".gif":
            raise UsageError(f"--gif {args.gif}: the animation's file name must end in .gif")
        if args.style_blend and len(args.style_blend) != len(args.styles):
            raise UsageError(
                f"--style-blend has {len(args.style_blend)} weights for {len(args.styles)} style images"
            )
        inputs = [args.content, *args.styles, *(m for m in args.mask or [] if m != "-"),
                  *([args.keep] if args.keep else []), *([job.init] if job.init not in NAMED_INITS else [])]
        for written in [args.output, *(w for w in (args.gif, args.report) if w)]:
            if any(_same_file(written, given) for given in inputs):
                raise UsageError(f"{written}: that is one of the inputs; nstd never writes over what it reads")
        if args.mask and len(args.mask) != len(args.styles):
            raise UsageError(f"--mask has {len(args.mask)} file(s) for {len(args.styles)} style image(s): give one "
                             "per style, in the styles' order ('-' for a style without a mask)")
        max_pixels = cfg["limits"]["max_pixels"]
        content = images.open_image(args.content, max_pixels)
        blend = args.style_blend or [1.0] * len(args.styles)
        masks = [_mask(m, "--mask", content.size, max_pixels) for m in args.mask or ["-"] * len(args.styles)]
        keep = _mask(args.keep, "--keep", content.size, max_pixels)
        styles = [StyleImage(images.open_image(path, max_pixels), w, mask=m)
                  for path, w, m in zip(args.styles, blend, masks)]
        init_image = None
        if job.init not in NAMED_INITS:
            init_image = images.open_image(job.init, max_pixels)
        params = job.params()
        if args.budget_mb is not None and args.budget_mb < 64:
            raise UsageError(f"--budget-mb {args.budget_mb}: expected at least 64")
    with as_bad_input(RuntimeError):  # a CUDA driver error, out of memory loading the network
        engine = Engine(**engine_cfg)  # DeviceError: exit 2, WeightsError: exit 3 (by main())

    if args.budget_mb is not None:
        budget_mb = args.budget_mb
    elif engine.device.is_cuda:  # one run, nothing to share the card with: its memory, less 1 GiB for the context
        budget_mb = max(64, ((engine.device.total_memory or 0) >> 20) - 1024)
    else:
        budget_mb = memory_budget(cfg, False)[0] >> 20
    size_requested = params.size
    params = _fit_budget(engine, content, params, budget_mb, regions.count(styles, keep))
    t0 = time.perf_counter()
    with as_bad_input():
        stages = engine.plan(content, styles, params)
    bar = reporter(sum(st.steps for st in stages), stages, args.quiet, args.progress_every,
                   peak=engine.device.peak_bytes if engine.device.is_cuda else peak_rss,
                   peak_name="peak GPU memory" if engine.device.is_cuda else "peak RSS")
    try:
        with as_bad_input():
            result = engine.stylize(content, styles, params, init_image=init_image, progress=bar, keep=keep,
                                    budget_bytes=budget_mb * 2**20 if budget_mb else None)
    finally:
        bar.close()
    optimised = time.perf_counter() - t0
    images.save(result.image, out, out_format, job.output.quality, result.image16)
    if args.gif and result.frames:
        images.save_gif(result.frames, args.gif, job.gif.fps)
    w, h = result.size
    took = time.perf_counter() - t0
    if isinstance(bar, Bar) and not args.quiet and len(result.stages) > 1:  # the lines said it already
        for i, st in enumerate(result.stages, 1):
            peak = st["peak_memory_bytes"]
            print(f"nstd: stage {i}/{len(result.stages)}: {st['size'][0]}x{st['size'][1]}, {st['steps_run']} steps in "
                  f"{st['seconds']:.1f} s" + (f", peak {peak / 2**20:.0f} MiB" if peak else ""), file=sys.stderr)
    if args.report:
        report = {"job": out.stem, "status": "done", "attempts": 1,
                  "timings": {"optimised": round(optimised, 3), "total": round(took, 3)}, **run_fields(result, job.steps),
                  "preserve_color": job.preserve_color, "size_requested": size_requested,
                  "peak_rss_bytes": peak_rss(), "memory_budget_bytes": budget_mb * 2**20 if budget_mb else None,
                  "weights": engine_cfg["weights"], "output": str(out)}
        atomic_write_text(Path(args.report), json.dumps(report, indent=1) + "\n")
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items())
    gif_note = f" and {args.gif}" if args.gif and result.frames else ""
    print(f"wrote {out}{gif_note} ({w}x{h}, {result.steps} steps{_stages_note(result)}, {took:.1f} s on {result.device}, {result.precision}, {_e512(result.e512)} E512; {losses})")
    return ExitCode.OK


def _same_file(a: str, b: str) -> bool:
    """Whether paths `a` and `b` name one file (through links too), or would once `a` is written."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (yet): the same path, written two ways?
        return Path(a).resolve() == Path(b).resolve()


def _mask(path: str | None, option: str, content_size: tuple[int, int], max_pixels: int):
    """A --mask or --keep image, its aspect ratio checked against the content's; None for none ('-')."""
    from nstd.engine import images

    if path is None or path == "-":
        return None
    mask = images.open_image(path, max_pixels)
    why = mask_ratio_problem(option, Path(path).name, mask.size, content_size)
    if why:
        raise UsageError(why)
    return mask


def _fit_budget(engine, content, params, budget_mb: int, masked: int = 0):
    """The size asked, unless no memory techniques make it fit `budget_mb`: then the largest that
    fits, said on stderr (the daemon does the same); `masked`: the run's masked regions."""
    with as_bad_input():  # style_loss sliced over the budget: it cannot run in tiles (StyleLossError)
        size = engine.fit(content.size, params, budget_mb * 2**20, regions=masked)
    if size < params.size:
        print(f"nstd: size {params.size} lowered to {size} to fit the memory budget of {budget_mb} MiB", file=sys.stderr)
        return params.at_size(size)
    return params


def _e512(e512: float) -> str:
    """Passes in E512 as a person reads them: whole above 10, two figures below (a 64 px test is 0.06, not 0)."""
    return f"{e512:.0f}" if e512 >= 10 else f"{e512:.2g}"


def _stages_note(result) -> str:
    """' in 3 stages (256, 512, 1024 px)' for a coarse-to-fine run; nothing for one stage."""
    if len(result.stages) < 2:
        return ""
    return f" in {len(result.stages)} stages ({', '.join(str(max(s['size'])) for s in result.stages)} px)"


#: `nstd stylize`'s options by job key: its errors name the option the user typed.
OPTION_OF_KEY = {
    "size": "--size", "steps": "--steps", "stages": "--stages", "stage_start": "--stage-start",
    "stage_factor": "--stage-factor", "stage_steps": "--stage-steps", "anchor_size": "--anchor-size", "grain": "--grain", "jitter": "--jitter", "optimizer": "--optimizer", "style_loss": "--style-loss", "content_weight": "--content-weight",
    "style_weight": "--style-weight", "tv_weight": "--tv-weight", "style_scale": "--style-scale",
    "preserve_color": "--preserve-color", "init": "--init", "pooling": "--pooling", "seed": "--seed",
    "gif.every": "--gif-every", "engine.device": "--device", "engine.weights": "--weights",
    "engine.weights_file": "--weights-file", "engine.precision": "--precision",
    "output.quality": "--quality", "output.bits": "--bits", "output.format": "-o",
}


def _job_from_args(args, cfg) -> tuple[dict, dict]:
    """The effective job (config defaults + flags, validated like a sidecar) and engine settings."""
    try:
        return _job_and_engine(args, cfg)
    except SchemaError as exc:
        raise exc.renamed(OPTION_OF_KEY) from None


def _job_and_engine(args, cfg) -> tuple[dict, dict]:
    overrides = {
        key: getattr(args, attr)
        for key, attr in (
            ("size", "size"),
            ("steps", "steps"),
            ("stages", "stages"),
            ("stage_start", "stage_start"),
            ("stage_factor", "stage_factor"),
            ("stage_steps", "stage_steps"),
            ("anchor_size", "anchor_size"),
            ("grain", "grain"),
            ("jitter", "jitter"),
            ("optimizer", "optimizer"),
            ("style_loss", "style_loss"),
            ("content_weight", "content_weight"),
            ("style_weight", "style_weight"),
            ("tv_weight", "tv_weight"),
            ("style_scale", "style_scale"),
            ("preserve_color", "preserve_color"),
            ("init", "init"),
            ("pooling", "pooling"),
            ("seed", "seed"),
        )
        if getattr(args, attr) is not None
    }
    gif = dict(cfg["defaults"]["gif"] or {key: f.default for key, f in GIF_FIELDS.items()})
    if args.gif_every is not None:
        gif["every"] = args.gif_every
    overrides["gif"] = gif if args.gif else False  # frames cost time: only collect them when asked

    try:
        fmt = format_for_suffix(Path(args.output))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    overrides["output"] = {"format": fmt, "quality": args.quality, "bits": args.bits if args.bits is not None else 8}
    job = merge(cfg["defaults"], overrides)
    engine = dict(cfg["engine"])
    for key in ("device", "weights", "weights_file", "precision"):
        if getattr(args, key) is not None:
            engine[key] = getattr(args, key)
    engine = validate(engine, CONFIG_FIELDS["engine"], "engine")
    return job, engine


