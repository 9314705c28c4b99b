"""The `nstd` command: `run` (the daemon), `stylize` (one job), `validate` and `status`.

Bad input ends in one line on stderr and a non-zero exit, never a traceback:
exit 2 for a bad argument, image or config; 3 when the weights cannot be loaded; 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from nstd.errors import ExitCode, NstdError


class UsageError(NstdError):
    """A bad combination of arguments."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nstd", description="Neural style transfer: a watch-folder daemon and a CLI.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stylize", help="stylize one image", description="Stylize CONTENT in the style of STYLE(s).")
    s.add_argument("content", help="content image")
    s.add_argument("styles", nargs="+", metavar="STYLE", help="style image(s); several are blended")
    s.add_argument("-o", "--output", required=True, help="result file (.png, .jpg or .webp), written atomically")
    s.add_argument("--config", help="take defaults and engine settings from this config.yaml")
    s.add_argument("--size", type=int, help="long edge of the result, px (default 512)")
    s.add_argument("--steps", type=int, help="optimisation steps (default 300)")
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
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("run", help="the watch-folder daemon")
    r.add_argument("--config", default="config.yaml", help="config file (default: ./config.yaml)")

    v = sub.add_parser("validate", help="check a job file without running it")
    v.add_argument("sidecar", help="the job's .yaml file (its paths are checked against its own folder)")
    v.add_argument("--config", help="take job defaults and limits from this config.yaml")

    st = sub.add_parser("status", help="what the daemon is doing")
    st.add_argument("--config", default="config.yaml", help="config file (default: ./config.yaml)")
    st.add_argument("--json", action="store_true", help="print state/status.json as it is")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "stylize":
            return cmd_stylize(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "status":
            return cmd_status(args)
    except NstdError as exc:  # anything a user can cause: one line, its own exit code
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("nstd: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
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
    print(f"nstd: error: {message}", file=sys.stderr)
    return int(code)


def cmd_stylize(args: argparse.Namespace) -> int:
    # Imports here keep `nstd --help` fast.
    from nstd.config import load_config
    from nstd.engine import Engine, images
    from nstd.jobkeys import merge, style_params
    from nstd.schema import validate

    with _as_bad_input():
        cfg = load_config(args.config)
        job, engine_cfg = _job_from_args(args, cfg, merge, validate)
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
    with _as_bad_input(RuntimeError):  # a CUDA driver error, out of memory loading the network
        engine = Engine(**engine_cfg)  # DeviceError: exit 2, WeightsError: exit 3 (by main())
    t0 = time.perf_counter()
    bar = _progress(params.steps, disabled=args.quiet)
    try:
        with _as_bad_input():
            result = engine.stylize(content, styles, params, init_image=init_image, progress=bar)
    finally:
        bar.close()
    images.save(result.image, out, out_format)
    if args.gif and result.frames:
        images.save_gif(result.frames, args.gif, job["gif"]["fps"] if job["gif"] else 12.0)
    w, h = result.size
    took = time.perf_counter() - t0
    losses = ", ".join(f"{k} {v:.4g}" for k, v in result.losses.items())
    print(f"wrote {out} ({w}x{h}, {result.steps} steps, {took:.1f} s on {result.device}, {result.precision}; {losses})")
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from nstd.config import load_config
    from nstd.daemon.daemon import run_daemon

    return run_daemon(load_config(args.config), lambda: load_config(args.config))


def cmd_validate(args: argparse.Namespace) -> int:
    """The daemon's intake checks on one sidecar: keys, paths, inputs present, images decodable."""
    from nstd.config import load_config
    from nstd.daemon.jobfile import check_job, read_sidecar, resolve_files
    from nstd.errors import JobError

    sidecar = Path(args.sidecar)
    cfg = load_config(args.config)
    try:
        data = read_sidecar(sidecar, cfg["limits"]["max_sidecar_bytes"])
        checked = check_job(data, resolve_files(data, sidecar, sidecar.parent), cfg["defaults"],
                            cfg["limits"]["max_pixels"], max_bytes=cfg["limits"]["max_input_bytes"])
    except JobError as exc:
        return _fail(f"{sidecar.name}: {exc.kind}: {exc}", exc.exit_code)
    files, settings, sizes = checked.files, checked.settings, checked.sizes
    print(f"{sidecar.name}: ok")
    print(f"  content  {files.content.name} ({'x'.join(map(str, sizes[files.content]))})")
    for path, weight in files.styles:
        print(f"  style    {path.name} ({'x'.join(map(str, sizes[path]))}), weight {weight:g}")
    gif = settings["gif"]
    print(f"  size {settings['size']}, steps {settings['steps']}, {settings['optimizer']}, "
          f"content_weight {settings['content_weight']:g}, style_weight {settings['style_weight']:g}, "
          f"tv_weight {settings['tv_weight']:g}, init {settings['init']}, pooling {settings['pooling']}, "
          f"seed {settings['seed']}, gif {'every %d steps' % gif['every'] if gif else 'off'}, "
          f"output {settings['output']['format']}, priority {settings['priority']}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from nstd.config import load_config
    from nstd.daemon.status import describe, read_status

    cfg = load_config(args.config)
    data = read_status(Path(cfg["paths"]["state"]))
    text, alive = describe(data)
    if args.json:
        print(json.dumps({**(data or {}), "daemon_running": alive}, indent=1))
    else:
        print(text)
    return ExitCode.OK if alive else ExitCode.NOT_RUNNING


def _job_from_args(args, cfg, merge, validate) -> tuple[dict, dict]:
    """The effective job (config defaults + flags, validated like a sidecar) and engine settings."""
    overrides = {
        key: getattr(args, attr)
        for key, attr in (
            ("size", "size"),
            ("steps", "steps"),
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
    job = merge(cfg["defaults"], overrides)
    engine = dict(cfg["engine"])
    for key in ("device", "weights", "weights_file", "precision"):
        if getattr(args, key) is not None:
            engine[key] = getattr(args, key)
    from nstd.config import CONFIG_FIELDS

    engine = validate(engine, CONFIG_FIELDS["engine"], "engine")
    return job, engine


class _progress:
    """A tqdm bar as the engine's Progress; losses are read only every few steps."""

    checkpoint_every = 0

    def __init__(self, total: int, disabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=disabled or None, dynamic_ncols=True, leave=False)
        self.every = max(1, total // 50)

    def on_checkpoint(self, checkpoint) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_step(self, info) -> None:
        self.bar.update(1)
        if info.step % self.every == 0 or info.step == info.steps:
            self.bar.set_postfix(loss=f"{info.losses()['total']:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
