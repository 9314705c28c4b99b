"""The `nstd` command: `run` (the daemon), `stylize` (one job), `validate`, `status`, `retry`, `cancel`.

Bad input ends in one line on stderr and a non-zero exit, never a traceback: exit 2 for a bad
argument, image, job file or config; 3 when the weights cannot be loaded; 4 for no such job;
130 on Ctrl-C. Every command finds its config the same way (nstd/config.py, `find_config`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Callable, Sequence

from nstd import __version__
from nstd.errors import ExitCode, NstdError
from nstd.job.keys import JOB_FIELDS

CONFIG_HELP = "config file (default: $NSTD_CONFIG, else ./config.yaml, else /etc/nstd/config.yaml)"


def stages_option(text: str):
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


def _parser() -> argparse.ArgumentParser:
    D = {key: f.default for key, f in JOB_FIELDS.items()}  # the one source of a job key's default
    p = argparse.ArgumentParser(prog="nstd", description="Neural style transfer: a watch-folder daemon and a CLI.")
    p.add_argument("--version", action="version", version=f"nstd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stylize", help="stylize one image", description="Stylize CONTENT in the style of STYLE(s).")
    s.add_argument("content", help="content image")
    s.add_argument("styles", nargs="+", metavar="STYLE", help="style image(s); several are blended")
    s.add_argument("-o", "--output", required=True, help="result file (.png, .jpg, .webp or .tif), written atomically")
    s.add_argument("--quality", type=int, help="jpg and webp: 1-100 (default 95)")
    s.add_argument("--bits", type=int, help=f"bits per channel: 8 or 16 for a .tif (prints) (default {D['output']['bits']})")
    s.add_argument("--config", help=CONFIG_HELP + "; without one, the built-in defaults")
    s.add_argument("--size", type=int, help=f"long edge of the result, px (default {D['size']})")
    s.add_argument("--steps", type=int, help=f"optimisation steps of the first stage (default {D['steps']})")
    s.add_argument("--stages", type=stages_option, metavar="auto|N|SIZE:STEPS,...",
                   help=f"coarse-to-fine stages: auto, a number (1 = one scale), or e.g. 256:300,512:150 (default {D['stages']})")
    s.add_argument("--stage-start", type=int, help=f"long edge the first stage starts near (default {D['stage_start']})")
    s.add_argument("--stage-factor", type=float, help=f"each stage's long edge over the one before's (default {D['stage_factor']:g})")
    s.add_argument("--stage-steps", type=float, help=f"each later stage's steps over the one before's (default {D['stage_steps']:g})")
    s.add_argument("--anchor-size", type=int, help="stages larger than this also match the style scaled down to it, "
                                                    f"keeping strokes' size relative to the picture (default {D['anchor_size']}; 0: off)")
    s.add_argument("--grain", type=float, help="rms of the grain added to each stage's start, 8-bit levels "
                                               f"(default {D['grain']:g}; 0: none; docs/quality.md)")
    s.add_argument("--jitter", type=int, help="each step sees the picture shifted by up to N px, so the pools leave "
                                              f"no grid (default {D['jitter']}; 0: none; docs/quality.md)")
    s.add_argument("--optimizer", help=f"lbfgs or adam (default {D['optimizer']})")
    s.add_argument("--style-loss", help=f"gram, w2 or sliced: how the style's statistics are matched "
                                        f"(default {D['style_loss']}; docs/quality.md)")
    s.add_argument("--content-weight", type=float, help=f"alpha (default {D['content_weight']:g})")
    s.add_argument("--style-weight", type=float, help=f"beta (default {D['style_weight']:g})")
    s.add_argument("--tv-weight", type=float, help=f"total-variation weight (default {D['tv_weight']:g})")
    s.add_argument("--style-blend", type=float, nargs="+", metavar="W", help="one weight per style (normalised)")
    s.add_argument("--mask", nargs="+", metavar="FILE",
                   help="one mask per style, in the styles' order: where that style goes (white: this style, grey: a "
                        "weight; where no mask reaches stays the content); - for a style without one")
    s.add_argument("--keep", metavar="FILE", help="a mask of what stays the content (white: kept)")
    s.add_argument("--style-scale", type=float, help=f"style size relative to the result (default {D['style_scale']:g})")
    s.add_argument("--init", help=f"content, color-matched, noise, or an image file (default {D['init']})")
    s.add_argument("--preserve-color", help=f"none, luminance or histogram: keep the content's colours (default {D['preserve_color']})")
    s.add_argument("--pooling", help=f"avg, max or mix (default {D['pooling']})")
    s.add_argument("--seed", type=int, help=f"random seed (default {D['seed']})")
    s.add_argument("--gif", metavar="PATH", help="also write the progress animation here")
    s.add_argument("--gif-every", type=int, help=f"a GIF frame every N steps (default {D['gif']['every']})")
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


def one_line(text: str) -> str:
    from nstd.logs import one_line as escaped  # loguru: only for the operator's commands

    return escaped(text)


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The command's entry point, imported only when it runs (`nstd --help` stays fast)."""
    if name == "worker":
        from nstd.commands.run import worker

        return worker
    module = importlib.import_module(f"nstd.commands.{name}")
    return module.main


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return _command(args.command)(args)
    except NstdError as exc:  # anything a user can cause: one line, its own exit code
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("nstd: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `nstd status | head -1`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    return ExitCode.OK


def _fail(message: str, code: int) -> int:
    from nstd.logs import journal_prefix

    print(f"{journal_prefix(3)}nstd: error: {one_line(message)}", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
