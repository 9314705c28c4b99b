"""Logging with loguru: stderr (journald under systemd), logs/nstd.log rotated, and one file per job.

Every line about a job is bound with its name (`logger.bind(job=name)`), so the daemon's log can
be grepped by job, and the job's own lines are copied to its `job.log`.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[job]} | {message}"
JOB_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def setup(logging_cfg: dict, logs_dir: Path | None) -> None:
    """Replace loguru's default sink with ours; safe to call again (SIGHUP)."""
    logger.remove()
    logger.configure(extra={"job": "-", "job_id": None})
    level = logging_cfg["level"]
    # Lines bound with file_only=True (a start-up error the command prints itself) skip stderr.
    logger.add(sys.stderr, level=level, format=FORMAT, backtrace=False, diagnose=False,
               filter=lambda record: not record["extra"].get("file_only"))
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        logger.add(
            logs_dir / "nstd.log",
            level=level,
            format=FORMAT,
            rotation=logging_cfg["rotation"],
            retention=logging_cfg["retention"],
            serialize=logging_cfg["json"],
            backtrace=False,
            diagnose=False,
            encoding="utf-8", errors="backslashreplace",
        )


@contextmanager
def job_file(job_id: str, path: Path) -> Iterator[None]:
    """Copy the lines bound to `job_id` into `path` (appending: a retried job keeps its history)."""
    sink = logger.add(
        path, level="DEBUG", format=JOB_FORMAT, filter=lambda r: r["extra"].get("job_id") == job_id,
        encoding="utf-8", errors="backslashreplace",  # a file name may hold a lone surrogate
    )
    try:
        yield
    finally:
        logger.remove(sink)


@contextmanager
def captured(job_id: str) -> Iterator[list[str]]:
    """Collect the lines bound to `job_id` in memory (jobs judged before they are claimed)."""
    lines: list[str] = []
    sink = logger.add(
        lambda m: lines.append(str(m)), level="DEBUG", format=JOB_FORMAT,
        filter=lambda r: r["extra"].get("job_id") == job_id,
    )
    try:
        yield lines
    finally:
        logger.remove(sink)
