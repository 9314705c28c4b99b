"""The one check of a job, for the intake and `nstd validate` alike: every input there, every
image decodable, the pictures large enough for the network, and the keys within the operator's
`limits:` (config.yaml checks its own defaults against them too)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nstd.engine import schedule
from nstd.engine.images import fit_long_edge
from nstd.engine.options import mask_ratio_problem
from nstd.errors import ErrorKind, JobError
from nstd.job.file import ParsedJob, waiting_for
from nstd.job.spec import Job
from nstd.state import safefs
from nstd.state.claim import JobFiles


@dataclass
class CheckedJob:
    """A job that passed the check: its files, its effective settings and its images' sizes."""

    files: JobFiles
    settings: dict
    job: Job
    sizes: dict[Path, tuple[int, int]]


def over_limits(job: Job, limits: dict, n_styles: int | None = None,
                content: tuple[int, int] | None = None) -> list[str]:
    """What in a job's keys is over the operator's `limits:` (config.yaml), each with the limit
    named: steps and stages as planned, styles, priority, and (once the content's size is known)
    the result's pixels. A job over any of them is refused, never cut down in silence."""
    out: list[str] = []
    stages = job.stages
    steps = schedule.total_steps(stages)
    if steps > limits["max_steps"]:
        out.append(f"steps: {steps:,} in all ({len(stages)} stage(s)), over limits.max_steps={limits['max_steps']:,}")
    if len(stages) > limits["max_stages"]:
        out.append(f"stages: {len(stages)}, over limits.max_stages={limits['max_stages']}")
    if n_styles is not None and n_styles > limits["max_styles"]:
        out.append(f"style: {n_styles} styles, over limits.max_styles={limits['max_styles']}")
    priority = job.priority
    if not limits["min_priority"] <= priority <= limits["max_priority"]:
        out.append(f"priority: {priority}, outside limits.min_priority..max_priority "
                   f"({limits['min_priority']}..{limits['max_priority']})")
    if content is not None:
        w, h = fit_long_edge(content, job.size)
        if w * h > limits["max_job_pixels"]:
            out.append(f"size: {job.size} makes a {w}x{h} result ({w * h:,} pixels), over "
                       f"limits.max_job_pixels={limits['max_job_pixels']:,}")
    return out


def check_job(job: ParsedJob, limits: dict, pins: dict[Path, safefs.Pinned] | None = None) -> CheckedJob:
    """The second half of the one verdict, for intake and `nstd validate` alike: every input is
    there, every image decodes (a bad image never reaches a worker) and the job is within the
    operator's `limits:`. Every problem is named at once. With `pins` (intake) the images are
    read from the pinned files, each once however often it is named."""
    from nstd.engine.images import ImageError, open_image  # torch: only for a real check

    files, spec = job.files, job.job
    max_pixels, max_bytes = limits["max_pixels"], limits["max_input_bytes"]
    problems: list[JobError] = []
    if files.missing:
        problems.append(JobError(ErrorKind.MISSING_INPUT, f"not found: {waiting_for(files) or files.sidecar.name}"))
    sizes = {}
    for path in files.inputs()[:-1]:
        if path in files.missing:
            continue
        try:
            size = pins[path].st.st_size if pins is not None else path.stat().st_size
            if size > max_bytes:  # a sparse file would multiply on disk
                raise ImageError(path, f"{size:,} bytes, over the limit of {max_bytes:,} (limits.max_input_bytes)")
            if pins is None:
                sizes[path] = open_image(path, max_pixels).size
            else:
                with pins[path].reader() as fh:
                    sizes[path] = open_image(path, max_pixels, fileobj=fh).size
        except ImageError as exc:
            problems.append(JobError(ErrorKind.BAD_IMAGE, str(exc)))
    if files.content in sizes:
        problems.extend(JobError(ErrorKind.BAD_IMAGE, why) for key, path in files.mask_keys() if path in sizes
                        and (why := mask_ratio_problem(key, path.name, sizes[path], sizes[files.content])))
    if not problems and files.content in sizes:
        why = _too_small(spec, sizes[files.content], [sizes[p] for p, _ in files.styles if p in sizes])
        if why:
            problems.append(JobError(ErrorKind.BAD_IMAGE, why))
    over = over_limits(spec, limits, len(files.styles), sizes.get(files.content))
    problems.extend(JobError(ErrorKind.OVER_LIMIT, why) for why in over)
    if problems:
        messages = [p.message for p in problems]
        raise JobError(problems[0].kind, "; ".join(messages), problems=messages)
    return CheckedJob(files, job.settings, spec, sizes)


def _too_small(job: Job, content: tuple[int, int], styles: list[tuple[int, int]]) -> str | None:
    """The engine's own check (schedule.too_small) on this job's pictures and keys: a job that
    validates runs, whatever its shapes."""
    if not styles:
        return None
    return schedule.too_small(content, styles, job.stages, job.style_scale, job.anchor_size, job.layers,
                              list(job.style_layers))
