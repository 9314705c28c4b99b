"""The `nstd` command: `run` (the daemon), `stylize` (one job), `validate`, `status`, `retry`, `cancel`.

Bad input ends in one line on stderr and a non-zero exit, never a traceback: exit 2 for a bad
argument, image, job file or config; 3 when the weights cannot be loaded; 4 for no such job;
130 on Ctrl-C. Every command finds its config the same way (nstd/config.py, `find_config`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from nstd.errors import ExitCode, NstdError
from nstd.schema import SchemaError


class UsageError(NstdError):
    """A bad combination of arguments."""


CONFIG_HELP = "config file (default: $NSTD_CONFIG, else ./config.yaml, else /etc/nstd/config.yaml)"


def _parser() -> argparse.ArgumentParser:
    from nstd import __version__

    p = argparse.ArgumentParser(prog="nstd", description="Neural style transfer: a watch-folder daemon and a CLI.")
    p.add_argument("--version", action="version", version=f"nstd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stylize", help="stylize one image", description="Stylize CONTENT in the style of STYLE(s).")
    s.add_argument("content", help="content image")
    s.add_argument("styles", nargs="+", metavar="STYLE", help="style image(s); several are blended")
    s.add_argument("-o", "--output", required=True, help="result file (.png, .jpg, .webp or .tif), written atomically")
    s.add_argument("--quality", type=int, help="jpg and webp: 1-100 (default 95)")
    s.add_argument("--bits", type=int, help="bits per channel: 8 (default), or 16 for a .tif (prints)")
    s.add_argument("--config", help=CONFIG_HELP + "; without one, the built-in defaults")
    s.add_argument("--size", type=int, help="long edge of the result, px (default 512)")
    s.add_argument("--steps", type=int, help="optimisation steps of the first stage (default 300)")
    s.add_argument("--stages", type=_stages_option, metavar="auto|N|SIZE:STEPS,...",
                   help="coarse-to-fine stages: auto (default), a number (1 = one scale), or e.g. 256:300,512:150")
    s.add_argument("--stage-start", type=int, help="long edge the first stage starts near (default 256)")
    s.add_argument("--stage-factor", type=float, help="each stage's long edge over the one before's (default 2)")
    s.add_argument("--stage-steps", type=float, help="each later stage's steps over the one before's (default 0.5)")
    s.add_argument("--anchor-size", type=int, help="stages larger than this also match the style scaled down to it, "
                                                    "keeping strokes' size relative to the picture (default 512; 0: off)")
    s.add_argument("--grain", type=float, help="rms of the grain added to each stage's start, 8-bit levels "
                                               "(default 8; 0: none; docs/quality.md)")
    s.add_argument("--optimizer", help="lbfgs (default) or adam")
    s.add_argument("--content-weight", type=float, help="alpha (default 1)")
    s.add_argument("--style-weight", type=float, help="beta (default 1e4)")
    s.add_argument("--tv-weight", type=float, help="total-variation weight (default 0)")
    s.add_argument("--style-blend", type=float, nargs="+", metavar="W", help="one weight per style (normalised)")
    s.add_argument("--style-scale", type=float, help="style size relative to the result (default 1)")
    s.add_argument("--init", help="content (default), noise, or an image file")
    s.add_argument("--preserve-color", help="none (default), luminance or histogram: keep the content's colours")
    s.add_argument("--pooling", help="avg (default) or max")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    s.add_argument("--gif", metavar="PATH", help="also write the progress animation here")
    s.add_argument("--gif-every", type=int, help="a GIF frame every N steps (default 5)")
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--weights", help="vgg19-caffe (default) or torchvision")
    s.add_argument("--weights-file", help="local weights file")
    s.add_argument("--precision", help="auto (default), fp32 or bf16")
    s.add_argument("--budget-mb", type=int, metavar="MIB",
                   help="peak memory each stage must fit, MiB: memory techniques first, then a smaller picture "
                        "(default on a GPU: its memory less 1 GiB; on the CPU: limits.cpu_memory_mb, 0 = half the memory)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no progress lines")
    s.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="without a terminal, a progress line at least this often, besides one per stage (default 30)")
    s.add_argument("--report", metavar="FILE", help="also write the run's report.json here (the daemon's keys)")

    r = sub.add_parser("run", help="the watch-folder daemon")
    r.add_argument("--config", help=CONFIG_HELP)
    r.add_argument("--until-empty", action="store_true",
                   help="process what the inbox holds, then exit 0 (for cron and CI)")

    wk = sub.add_parser("worker", help="run jobs from the cluster's queue on one GPU (queue.backend: celery)",
                        description="One Celery worker for one device: takes the best job nobody holds from the "
                        "shared state folder, runs it, delivers it (docs/distributed.md).")
    wk.add_argument("--config", help=CONFIG_HELP)
    wk.add_argument("--device", help="cpu, cuda or cuda:N (default: engine.device); one worker per GPU")
    wk.add_argument("--name", help="this worker's name in nstd status (default: HOST-DEVICE)")

    v = sub.add_parser("validate", help="check job files as the daemon would, without running them")
    v.add_argument("sidecars", nargs="+", metavar="JOB", help="a job's .yaml file (its paths are checked against its own folder)")
    v.add_argument("--config", help=CONFIG_HELP + "; without one, the built-in defaults")
    v.add_argument("--json", action="store_true", help="the verdicts as a JSON list, one object a job file")

    st = sub.add_parser("status", help="what the daemon is doing")
    st.add_argument("--config", help=CONFIG_HELP)
    st.add_argument("--json", action="store_true", help="print state/status.json as it is")

    rt = sub.add_parser("retry", help="put a quarantined job back into the inbox as a new job",
                        description="Move a quarantined job's inputs back into the inbox with a new job file; "
                        "error.yaml and job.log stay in the quarantine folder, renamed NAME.retried-<time>.")
    rt.add_argument("name", help="the job's folder in the quarantine")
    rt.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="job keys to change, e.g. steps=500 size=768")
    rt.add_argument("--config", help=CONFIG_HELP)
    rt.add_argument("--json", action="store_true", help="what was done, as a JSON object")

    cn = sub.add_parser("cancel", help="cancel a queued job, or stop the running one at its next step",
                        description="A cancelled job goes to the quarantine as 'cancelled' (nstd retry puts it back).")
    cn.add_argument("name", help="the job's name (its job file's name without .yaml) or its id")
    cn.add_argument("--config", help=CONFIG_HELP)
    cn.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for a running daemon to confirm (default 30)")
    cn.add_argument("--json", action="store_true", help="what happened, as a JSON object")
    return p


#: The operator's commands print names that users chose (jobs, files, quarantine folders): every
#: line they write reaches the terminal with control characters escaped, so a name holding
#: `ESC [2J` shows as `\x1b[2J` instead of clearing the screen.
OPERATOR_COMMANDS = ("validate", "status", "retry", "cancel")


def one_line(text: str) -> str:
    from nstd.logs import one_line as escaped

    return escaped(text)


class _Escaped:
    """A text stream that writes control characters (newlines and tabs aside) as escapes."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write("\n".join(one_line(line) for line in text.split("\n")))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in OPERATOR_COMMANDS or isinstance(sys.stdout, _Escaped):
        return _dispatch(args)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Escaped(sys.stdout), _Escaped(sys.stderr)
    try:
        return _dispatch(args)
    finally:
        sys.stdout, sys.stderr = streams


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "stylize":
            return cmd_stylize(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "worker":
            return cmd_worker(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "retry":
            return cmd_retry(args)
        if args.command == "cancel":
            return cmd_cancel(args)
    except NstdError as exc:  # anything a user can cause: one line, its own exit code
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("nstd: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `nstd status | head -1`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    return ExitCode.OK


@contextmanager
def _as_bad_input(*more: type[Exception]) -> Iterator[None]:
    """A plain ValueError (or `more`) from inside is the user's bad input: one line, exit 2."""
    try:
        yield
    except NstdError:
        raise
    except (ValueError, *more) as exc:
        raise UsageError(str(exc)) from None


def _fail(message: str, code: int) -> int:
    from nstd.logs import journal_prefix, one_line

    print(f"{journal_prefix(3)}nstd: error: {one_line(message)}", file=sys.stderr)
    return int(code)


def _config(args: argparse.Namespace, required: bool) -> dict:
    """The config this command uses (see find_config); the built-in defaults when none is found
    and none is `required`."""
    from nstd.config import find_config, load_config

    return load_config(find_config(args.config, required))


def cmd_stylize(args: argparse.Namespace) -> int:
    # Imports here keep `nstd --help` fast.
    from nstd.engine import Engine, StyleImage, images
    from nstd.fsutil import atomic_write_text
    from nstd.jobkeys import style_params
    from nstd.report import run_fields
    from nstd.terminal import Bar, peak_rss, reporter

    with _as_bad_input():
        cfg = _config(args, required=False)
        job, engine_cfg = _job_from_args(args, cfg)
        out = Path(args.output)
        out_format = images.format_for_suffix(out)
        if args.gif and Path(args.gif).suffix.lower() != ".gif":
            raise UsageError(f"--gif {args.gif}: the animation's file name must end in .gif")
        if args.style_blend and len(args.style_blend) != len(args.styles):
            raise UsageError(
                f"--style-blend has {len(args.style_blend)} weights for {len(args.styles)} style images"
            )
        max_pixels = cfg["limits"]["max_pixels"]
        content = images.open_image(args.content, max_pixels)
        blend = args.style_blend or [1.0] * len(args.styles)
        styles = [(images.open_image(path, max_pixels), w) for path, w in zip(args.styles, blend)]
        init_image = None
        if job["init"] not in ("content", "noise"):
            init_image = images.open_image(job["init"], max_pixels)
        params = style_params(job)
        if args.budget_mb is not None and args.budget_mb < 64:
            raise UsageError(f"--budget-mb {args.budget_mb}: expected at least 64")
    with _as_bad_input(RuntimeError):  # a CUDA driver error, out of memory loading the network
        engine = Engine(**engine_cfg)  # DeviceError: exit 2, WeightsError: exit 3 (by main())
    from nstd.config import memory_budget

    if args.budget_mb is not None:
        budget_mb = args.budget_mb
    elif engine.device.is_cuda:  # one run, nothing to share the card with: its memory, less 1 GiB for the context
        budget_mb = max(64, ((engine.device.total_memory or 0) >> 20) - 1024)
    else:
        budget_mb = memory_budget(cfg, False)[0] >> 20
    size_requested = params.size
    params = _fit_budget(engine, content, params, budget_mb)
    t0 = time.perf_counter()
    with _as_bad_input():
        stages = engine.plan(content, [StyleImage(*s) for s in styles], params)
    bar = reporter(sum(st.steps for st in stages), stages, args.quiet, args.progress_every,
                   peak=engine.device.peak_bytes if engine.device.is_cuda else peak_rss,
                   peak_name="peak GPU memory" if engine.device.is_cuda else "peak RSS")
    try:
        with _as_bad_input():
            result = engine.stylize(content, styles, params, init_image=init_image, progress=bar,
                                    budget_bytes=budget_mb * 2**20 if budget_mb else None)
    finally:
        bar.close()
    optimised = time.perf_counter() - t0
    images.save(result.image, out, out_format, job["output"]["quality"], result.image16)
    if args.gif and result.frames:
        images.save_gif(result.frames, args.gif, job["gif"]["fps"] if job["gif"] else 12.0)
    w, h = result.size
    took = time.perf_counter() - t0
    if isinstance(bar, Bar) and not args.quiet and len(result.stages) > 1:  # the lines said it already
        for i, st in enumerate(result.stages, 1):
            peak = st["peak_memory_bytes"]
            print(f"nstd: stage {i}/{len(result.stages)}: {st['size'][0]}x{st['size'][1]}, {st['steps_run']} steps in "
                  f"{st['seconds']:.1f} s" + (f", peak {peak / 2**20:.0f} MiB" if peak else ""), file=sys.stderr)
    if args.report:
        report = {"job": out.stem, "status": "done", "attempts": 1,
                  "timings": {"optimised": round(optimised, 3), "total": round(took, 3)}, **run_fields(result),
                  "preserve_color": job.get("preserve_color", "none"), "size_requested": size_requested,
                  "peak_rss_bytes": peak_rss(), "memory_budget_bytes": budget_mb * 2**20 if budget_mb else None,
                  "weights": engine_cfg["weights"], "output": str(out)}
        atomic_write_text(Path(args.report), json.dumps(report, indent=1) + "\n")
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items())
    gif_note = f" and {args.gif}" if args.gif and result.frames else ""
    print(f"wrote {out}{gif_note} ({w}x{h}, {result.steps} steps{_stages_note(result)}, {took:.1f} s on {result.device}, {result.precision}, {result.e512:.0f} E512; {losses})")
    return ExitCode.OK


def _fit_budget(engine, content, params, budget_mb: int):
    """The size asked, unless no memory techniques make it fit `budget_mb`: then the largest that
    fits, said on stderr (the daemon does the same)."""
    size = engine.fit(content.size, params, budget_mb * 2**20)
    if size < params.size:
        print(f"nstd: size {params.size} lowered to {size} to fit the memory budget of {budget_mb} MiB", file=sys.stderr)
        return params.at_size(size)
    return params


def _stages_note(result) -> str:
    """' in 3 stages (256, 512, 1024 px)' for a coarse-to-fine run; nothing for one stage."""
    if len(result.stages) < 2:
        return ""
    return f" in {len(result.stages)} stages ({', '.join(str(max(s['size'])) for s in result.stages)} px)"


def cmd_run(args: argparse.Namespace) -> int:
    from nstd.config import find_config, load_config
    from nstd.daemon.daemon import run_daemon

    path = find_config(args.config, required=True)
    return run_daemon(load_config(path), lambda: load_config(path), until_empty=args.until_empty)


def cmd_worker(args: argparse.Namespace) -> int:
    cfg = _config(args, required=True)
    if cfg["queue"]["backend"] != "celery":
        raise UsageError("queue.backend is local: `nstd run` runs the jobs on this machine itself; set "
                         "queue.backend: celery and queue.broker for workers on other machines (docs/distributed.md)")
    if args.device is not None:
        from nstd.config import _device

        with _as_bad_input(SchemaError):
            _device(args.device, "--device")
    if args.name is not None and not (0 < len(args.name) <= 64 and all(c.isalnum() or c in "-_." for c in args.name)):
        raise UsageError(f"--name: letters, digits, '-', '_' and '.' only (at most 64), got {args.name!r}")
    try:
        from nstd.distributed.node import serve
    except ImportError as exc:
        raise UsageError(f"the distributed extra is not installed ({exc}): pip install 'nstd[distributed]'") from None
    return serve(cfg, args.device, args.name, cfg["logging"]["level"])


def cmd_validate(args: argparse.Namespace) -> int:
    """The daemon's own check on each job file (nstd/daemon/jobfile.py), with the config the daemon
    would read: keys, paths, inputs present, images decodable. Every problem is listed; each
    verdict goes to stdout (a job's problems are the answer asked for, not a diagnostic), and the
    exit code is the worst job's."""
    cfg = _config(args, required=False)
    verdicts = [_validate_one(Path(sidecar), cfg) for sidecar in args.sidecars]
    lines = [v.pop("_lines") for v in verdicts]
    if args.json:
        print(json.dumps(verdicts, indent=1, default=str))
    else:
        print("\n".join(one_line(line) for job in lines for line in job))
    return max(v["exit_code"] for v in verdicts)


def _validate_one(sidecar: Path, cfg: dict) -> dict:
    """One job file's verdict: the keys of --json, and its text in "_lines"."""
    from nstd.daemon.jobfile import check_job, parse_job
    from nstd.engine import schedule
    from nstd.errors import ErrorKind, JobError

    limits = cfg["limits"]
    try:
        job = parse_job(sidecar, sidecar.parent, cfg["defaults"], limits["max_sidecar_bytes"])
        checked = check_job(job, limits)
    except JobError as exc:
        lines = [f"{sidecar.name}: {exc.kind}", *(f"  {problem}" for problem in exc.problems)]
        if exc.kind is ErrorKind.MISSING_INPUT:
            lines.append(f"  (the daemon waits up to {cfg['watch']['missing_timeout']:g} s for a missing input "
                         "(watch.missing_timeout), then quarantines the job as missing input)")
        return {"job": str(sidecar), "ok": False, "kind": str(exc.kind), "problems": list(exc.problems),
                "exit_code": int(exc.exit_code), "_lines": lines}
    files, settings, sizes = checked.files, checked.settings, checked.sizes
    style_sizes = [sizes[path] for path, _ in files.styles]
    stages = schedule.runnable(sizes[files.content], style_sizes,
                               schedule.plan(settings["size"], settings["steps"], settings["stages"],
                                             settings["stage_start"], settings["stage_factor"], settings["stage_steps"]),
                               settings["style_scale"], [*settings["content_layers"], *settings["style_layers"]])
    lines = [f"{sidecar.name}: ok", f"  content  {files.content.name} ({'x'.join(map(str, sizes[files.content]))})"]
    for path, weight in files.styles:
        lines.append(f"  style    {path.name} ({'x'.join(map(str, sizes[path]))}), weight {weight:.3g}")
    if len(files.styles) > 1 and files.weight_sum != 1.0:
        lines.append(f"  (blend weights are normalised to add up to 1: as written they add up to {files.weight_sum:g})")
    gif = settings["gif"]
    lines.append(f"  size {settings['size']}, steps {settings['steps']}, {settings['optimizer']}, "
                 f"content_weight {settings['content_weight']:g}, style_weight {settings['style_weight']:g}, "
                 f"tv_weight {settings['tv_weight']:g}, init {settings['init']}, pooling {settings['pooling']}, "
                 f"preserve_color {settings['preserve_color']}, seed {settings['seed']}, "
                 f"gif {'every %d steps' % gif['every'] if gif else 'off'}, "
                 f"output {settings['output']['format']}, priority {settings['priority']}")
    if len(stages) > 1:
        lines.append(f"  stages   {', '.join(f'{st.size} px x {st.steps}' for st in stages)} "
                     f"({schedule.total_steps(stages)} steps in all)")
    return {"job": str(sidecar), "ok": True, "kind": None, "problems": [], "exit_code": int(ExitCode.OK),
            "content": {"file": files.content.name, "size": list(sizes[files.content])},
            "styles": [{"file": path.name, "size": list(sizes[path]), "weight": weight} for path, weight in files.styles],
            "stages": [{"size": st.size, "steps": st.steps} for st in stages],
            "settings": settings, "_lines": lines}


def cmd_status(args: argparse.Namespace) -> int:
    from nstd.daemon.lock import RootLock
    from nstd.daemon.status import STALE_SECONDS, describe, read_status, resumable, workers

    cfg = _config(args, required=True)
    state = Path(cfg["paths"]["state"])
    data = read_status(state)
    cluster = workers(state)
    text, alive = describe(data, resumable=resumable(state), lock_held=RootLock.held(state), workers=cluster,
                           lease_seconds=cfg["queue"]["lease_seconds"])
    responding = alive and (data is None or time.time() - data.get("updated_at", 0) <= STALE_SECONDS)
    if args.json:
        print(json.dumps({**(data or {}), "daemon_running": alive, "responding": responding,
                          **({"workers": cluster} if cluster else {})}, indent=1))
    else:
        print(text)
    if not alive:
        return ExitCode.NOT_RUNNING
    return ExitCode.OK if responding else ExitCode.NOT_RESPONDING


def cmd_retry(args: argparse.Namespace) -> int:
    from nstd.daemon.retry import parse_overrides, retry

    cfg = _config(args, required=True)
    try:
        done = retry(cfg, args.name, parse_overrides(args.overrides))
    except OSError as exc:  # the folders themselves: permissions, a full disk
        raise NstdError(f"retry {args.name}: {exc.strerror or exc} ({exc.filename or 'a folder'})") from None
    if args.json:
        print(json.dumps({"retried": args.name, "sidecar": done.sidecar, "moved": done.moved, "kept": str(done.kept),
                          "waits_for": done.waits_for}, indent=1))
        return ExitCode.OK
    print(one_line(f"retrying {args.name} as {done.sidecar} in the inbox ({len(done.moved)} input(s) moved back); "
                   f"error.yaml and job.log kept in {done.kept}"))
    if done.waits_for:
        print(one_line(f"note: the job waits for {', '.join(done.waits_for)}: put them into the inbox "
                       f"(within watch.missing_timeout, or it is quarantined as missing input)"))
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from nstd.daemon.cancel import cancel

    try:
        said = cancel(_config(args, required=True), args.name, args.wait)
    except OSError as exc:
        raise NstdError(f"cancel {args.name}: {exc.strerror or exc} ({exc.filename or 'a folder'})") from None
    if args.json:
        print(json.dumps({"outcome": said.outcome, "job": said.job, "id": said.id, "where": said.where,
                          "message": said.line}, indent=1))
    else:
        print(one_line(said.line))
    return ExitCode.PENDING if said.outcome == "asked" else ExitCode.OK


#: `nstd stylize`'s options by job key: its errors name the option the user typed.
OPTION_OF_KEY = {
    "size": "--size", "steps": "--steps", "stages": "--stages", "stage_start": "--stage-start",
    "stage_factor": "--stage-factor", "stage_steps": "--stage-steps", "anchor_size": "--anchor-size", "grain": "--grain", "optimizer": "--optimizer", "content_weight": "--content-weight",
    "style_weight": "--style-weight", "tv_weight": "--tv-weight", "style_scale": "--style-scale",
    "preserve_color": "--preserve-color", "init": "--init", "pooling": "--pooling", "seed": "--seed",
    "gif.every": "--gif-every", "engine.device": "--device", "engine.weights": "--weights",
    "engine.weights_file": "--weights-file", "engine.precision": "--precision",
    "output.quality": "--quality", "output.bits": "--bits", "output.format": "-o",
}


def _stages_option(text: str):
    """--stages: `auto`, a number, or SIZE:STEPS pairs (the job key's list); the key checks the rest."""
    text = text.strip()
    if text == "auto":
        return text
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    try:
        return [{"size": int(a), "steps": int(b)} for a, b in (pair.split(":") for pair in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, a number, or SIZE:STEPS pairs like 256:300,512:150") from None


def _job_from_args(args, cfg) -> tuple[dict, dict]:
    """The effective job (config defaults + flags, validated like a sidecar) and engine settings."""
    try:
        return _job_and_engine(args, cfg)
    except SchemaError as exc:
        raise exc.renamed(OPTION_OF_KEY) from None


def _job_and_engine(args, cfg) -> tuple[dict, dict]:
    from nstd.config import CONFIG_FIELDS
    from nstd.jobkeys import merge
    from nstd.schema import validate

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
            ("optimizer", "optimizer"),
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
    gif = dict(cfg["defaults"]["gif"] or {"every": 5, "fps": 12.0, "max_size": 512})
    if args.gif_every is not None:
        gif["every"] = args.gif_every
    overrides["gif"] = gif if args.gif else False  # frames cost time: only collect them when asked
    from nstd.engine.images import format_for_suffix

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


if __name__ == "__main__":
    sys.exit(main())
