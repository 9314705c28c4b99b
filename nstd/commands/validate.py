"""`nstd validate`: the daemon's own check on job files, without running them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nstd.commands.base import config_of, one_line
from nstd.engine import schedule
from nstd.errors import ErrorKind, ExitCode, JobError
from nstd.job.check import check_job
from nstd.job.file import parse_job


def main(args: argparse.Namespace) -> int:
    """The daemon's own check on each job file (nstd/job/file.py), with the config the daemon
    would read: keys, paths, inputs present, images decodable. Every problem is listed; each
    verdict goes to stdout (a job's problems are the answer asked for, not a diagnostic), and the
    exit code is the worst job's."""
    cfg = config_of(args, required=False)
    verdicts = [check_one(Path(sidecar), cfg) for sidecar in args.sidecars]
    lines = [v.pop("_lines") for v in verdicts]
    if args.json:
        print(json.dumps(verdicts, indent=1, default=str))
    else:
        print("\n".join(one_line(line) for job in lines for line in job))
    return max(v["exit_code"] for v in verdicts)


def _see_through(mask: Path) -> str:
    """A warning for a mask with transparency (it counts as white: a shape drawn only in the alpha
    channel would be a mask of all white), else ''."""
    from PIL import Image

    from nstd.engine.images import see_through

    try:
        with Image.open(mask) as img:
            alpha = see_through(img)
    except Exception:  # judged already: a file that changed since says so when the job runs
        return ""
    return "; it has transparency: transparent parts count as white" if alpha else ""


def check_one(sidecar: Path, cfg: dict) -> dict:
    """One job file's verdict: the keys of --json, and its text in "_lines"."""

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
    files, settings, spec, sizes = checked.files, checked.settings, checked.job, checked.sizes
    style_sizes = [sizes[path] for path, _ in files.styles]
    stages = schedule.runnable(sizes[files.content], style_sizes, spec.stages, spec.style_scale, spec.layers)
    lines = [f"{sidecar.name}: ok", f"  content  {files.content.name} ({'x'.join(map(str, sizes[files.content]))})"]
    dims = lambda path: 'x'.join(map(str, sizes[path]))  # noqa: E731
    for i, (path, weight) in enumerate(files.styles):
        mask = files.mask(i)
        lines.append(f"  style    {path.name} ({dims(path)}), weight {weight:.3g}"
                     + (f", mask {mask.name} ({dims(mask)}){_see_through(mask)}" if mask else ""))
    if files.keep is not None:
        lines.append(f"  keep     {files.keep.name} ({dims(files.keep)}): its white stays the content"
                     + _see_through(files.keep))
    if all(files.mask(i) for i in range(len(files.styles))):
        lines.append("  (where no style's mask reaches, the picture stays the content)")
    masked = any(files.mask(i) for i in range(len(files.styles)))
    if masked and len(files.styles) > 1:
        lines.append("  (each mask's region takes its style at full strength; weights blend styles given the same mask file)")
    elif len(files.styles) > 1 and files.weight_sum != 1.0:
        lines.append(f"  (blend weights are normalised to add up to 1: as written they add up to {files.weight_sum:g})")
    lines.append(f"  size {spec.size}, steps {spec.steps}, {spec.optimizer}, style_loss {spec.style_loss}, "
                 f"content_weight {spec.content_weight:g}, style_weight {spec.style_weight:g}, "
                 f"tv_weight {spec.tv_weight:g}, init {spec.init}, pooling {spec.pooling}, "
                 f"preserve_color {spec.preserve_color}, seed {spec.seed}, "
                 f"gif {'every %d steps' % spec.gif.every if spec.gif else 'off'}, "
                 f"output {spec.output.format}, priority {spec.priority}")
    if len(stages) > 1:
        lines.append(f"  stages   {', '.join(f'{st.size} px x {st.steps}' for st in stages)} "
                     f"({schedule.total_steps(stages)} steps in all)")
    return {"job": str(sidecar), "ok": True, "kind": None, "problems": [], "exit_code": int(ExitCode.OK),
            "content": {"file": files.content.name, "size": list(sizes[files.content])},
            "styles": [{"file": path.name, "size": list(sizes[path]), "weight": weight, "mask": _file(files.mask(i), sizes)}
                       for i, (path, weight) in enumerate(files.styles)],
            "keep": _file(files.keep, sizes),
            "stages": [{"size": st.size, "steps": st.steps} for st in stages],
            "settings": settings, "_lines": lines}




def _file(path, sizes: dict) -> dict | None:
    """A mask in --json: its file name and size; None when there is none."""
    return None if path is None else {"file": path.name, "size": list(sizes[path])}
