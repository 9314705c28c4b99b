"""What can go wrong, as names: exit codes for commands and error kinds for error.yaml.

Every exception a user can cause carries its exit code (`NstdError.exit_code`), so a command
maps any of them to one line and the right status without a table of its own (as OCRmyPDF's
exceptions do). A leaf module: it imports nothing of nstd, so the engine may use it too.
"""
from __future__ import annotations

from enum import Enum, IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: `nstd status`: no daemon is running
    NOT_RUNNING = 1
    #: a bad argument, image, job file, config or device
    BAD_INPUT = 2
    #: the weights cannot be loaded
    WEIGHTS = 3
    #: `nstd cancel` / `nstd retry`: no such job
    NO_SUCH_JOB = 4
    #: `nstd status`: a daemon holds the root but has not updated its status (stopped? hung?)
    NOT_RESPONDING = 5
    #: `nstd cancel`: asked; the daemon or the job's worker had not confirmed within --wait
    PENDING = 6
    INTERRUPTED = 130


class _Word(str, Enum):
    """An enum whose members print as their value (in messages, YAML and JSON)."""

    def __str__(self) -> str:
        return self.value


class ErrorKind(_Word):
    """The `kind:` of error.yaml: a short phrase a person reads, stable for scripts."""

    INVALID_JOB_FILE = "invalid job file"
    PATH_OUTSIDE_INBOX = "path outside inbox"
    BAD_IMAGE = "bad image"
    MISSING_INPUT = "missing input"
    UNREADABLE = "unreadable"
    #: a claimed input no longer decodes: it changed after intake checked it
    INPUT_CHANGED = "input changed"
    OUT_OF_MEMORY = "out of memory"
    CRASHED = "crashed"
    INTERNAL_ERROR = "internal error"
    CANNOT_WRITE_OUTBOX = "cannot write outbox"
    #: `nstd cancel`
    CANCELLED = "cancelled"
    #: over the operator's `limits:` (steps, stages, styles, priority, pixels, max_job_seconds)
    OVER_LIMIT = "over limit"


class Stage(_Word):
    """Where a job failed: before its claim, while running, while encoding or delivering."""

    INTAKE = "intake"
    #: claimed, waiting for a worker
    QUEUE = "queue"
    RUN = "run"
    ENCODE = "encode"
    DELIVER = "deliver"


class NstdError(Exception):
    """Base of the errors a user can cause; `exit_code` is what a command exits with."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class JobError(NstdError):
    """A job that cannot run: `kind` for error.yaml, `message` says what to fix; `problems` lists
    each thing to fix when there are several (`nstd validate` prints one a line)."""

    def __init__(self, kind: ErrorKind, message: str, stage: Stage = Stage.INTAKE,
                 problems: list[str] | None = None):
        self.kind = ErrorKind(kind)
        self.message = message
        self.stage = Stage(stage)
        self.problems = problems if problems is not None else [message]
        super().__init__(message)
