"""Logging with loguru: stderr (journald under systemd), logs/nstd.log rotated, and one file per job.

Every line about a job is bound with its name (`logger.bind(job=name)`), so the daemon's log can
be grepped by job, and the job's own lines are copied to its `job.log`.

Under systemd, stderr is the journal: each line then starts with its syslog priority (`<3>` for an
error, as sd-daemon(3) describes), so `journalctl -p err` shows the failures.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[job]} | {message}"
JOB_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"

# loguru level number -> syslog priority: CRITICAL 2, ERROR 3, WARNING 4, SUCCESS 5, INFO 6; lower 7.
PRIORITIES = ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6))


def syslog_priority(level_no: int) -> int:
    """The syslog priority of a loguru level (DEBUG and TRACE: 7)."""
    return next((p for no, p in PRIORITIES if level_no >= no), 7)


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to the journal: JOURNAL_STREAM names its
    device and inode ("<st_dev>:<st_ino>"); a stderr redirected elsewhere does not match."""
    try:
        dev, ino = (int(n) for n in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError, AttributeError):  # unset or malformed; no real stderr
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_prefix(priority: int) -> str:
    """`<priority>` to lead a line written to stderr when it is the journal, else ""."""
    return f"<{priority}>" if stderr_is_journal() else ""


def _journal_sink(stream):
    """A sink writing every line of a record to `stream` led by the record's priority (a traceback's
    lines too: journald reads each line as its own entry)."""
    def write(message) -> None:
        prefix = f"<{syslog_priority(message.record['level'].no)}>"
        lines = str(message).rstrip("\n").split("\n")
        stream.write("".join(f"{prefix}{line}\n" for line in lines))
        stream.flush()
    return write


#: Control characters a line must not carry: a job (file) name holding a newline would otherwise
#: start a forged line in the log ("... | ERROR | ..."), and an escape sequence would drive the
#: terminal of whoever reads it. Tabs stay.
#: Control characters, Unicode's line/paragraph separators and bidi controls (U+202E would turn a
#: line around), and the lone surrogates that stand for a file name's undecodable bytes (0x9b is
#: the 8-bit CSI: written raw, a terminal takes it as an escape sequence).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u061c\u200e\u200f\u2028\u2029"
                      "\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def _escape(m: re.Match) -> str:
    c = m.group()
    if "\udc80" <= c <= "\udcff":
        return f"\\x{ord(c) - 0xDC00:02x}"  # the byte the file name holds
    return repr(c)[1:-1] if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def one_line(text: str) -> str:
    """`text` with each control character written as its escape (a newline as `\\n`), so that
    a name can neither start a line of its own nor drive the terminal."""
    return _CONTROL.sub(_escape, text)


def _patch(record) -> None:
    """Every record becomes one line whatever a user's name put in it (a traceback, which
    loguru adds after the message, keeps its lines)."""
    record["message"] = one_line(record["message"])
    job = record["extra"].get("job")
    if isinstance(job, str):
        record["extra"]["job"] = one_line(job)


def setup(logging_cfg: dict, logs_dir: Path | None, filename: str = "nstd.log", stderr: bool = True) -> None:
    """Replace loguru's default sink with ours; safe to call again (SIGHUP). Each `nstd worker`
    writes a file of its own (`worker-<name>.log`): several machines rotating one file would not.
    `stderr` False: the file only (a command that says what it did in its own words)."""
    logger.remove()
    logger.configure(extra={"job": "-", "job_id": None}, patcher=_patch)
    level = logging_cfg["level"]
    if stderr:  # lines bound with file_only=True (a start-up error the command prints itself) skip it
        sink = _journal_sink(sys.stderr) if stderr_is_journal() else sys.stderr
        logger.add(sink, level=level, format=FORMAT, backtrace=False, diagnose=False,
                   filter=lambda record: not record["extra"].get("file_only"))
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        logger.add(
            logs_dir / filename,
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
