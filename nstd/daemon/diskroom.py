"""Room on disk before a job starts: its result, GIF and checkpoints must fit, or it waits.

A job that starts on a nearly full disk runs for hours and then fails to deliver (or fills the
disk for every other process on the way). So before it starts, the free space of the outbox's
and the state folder's file systems is compared with what the job will write there, estimated
from its own keys (`limits.min_free_mb: auto`) or a fixed number of MiB; a job short of room is
held, with the reason in `nstd status` and the log, and tried again every RETRY_SECONDS, never
failed: freeing space (or `outbox.keep_days`) lets it go on.
"""
from __future__ import annotations

import os
from pathlib import Path

from nstd.job.spec import Job

#: What `auto` keeps free besides a job's own files: logs, status, the page, other processes.
MARGIN_BYTES = 64 * 2**20


def estimate(job: Job) -> dict[str, int]:
    """Bytes a job writes, by folder: the outbox (the result at most raw, the GIF) and the state
    folder (a float checkpoint twice, as a new one is written beside the old, and the GIF's raw
    frames). The picture is taken as square at its long edge: an upper bound."""
    from nstd.engine.readbehind import FRAME_EDGE_MAX, FRAMES_MAX

    side = job.size
    pixels = side * side
    frames = frame_pixels = 0
    if job.gif:
        frames = min(FRAMES_MAX, job.total_steps // max(1, job.gif.every) + 1)
        edge = min(side, job.gif.max_size, FRAME_EDGE_MAX)
        frame_pixels = edge * edge
    return {"outbox": pixels * 3 + frames * frame_pixels,
            "state": 2 * pixels * 3 * 4 + frames * frame_pixels * 3}


def shortfall(outbox: Path, state: Path, job: Job, min_free_mb: int | str) -> str | None:
    """Why the job cannot start for want of room, or None. `min_free_mb`: "auto" (the job's own
    estimate plus MARGIN_BYTES) or MiB to keep free on each file system (0: no check)."""
    if min_free_mb == 0:
        return None
    need = estimate(job)
    wanted: dict[int, tuple[int, list[str]]] = {}
    for name, folder in (("outbox", outbox), ("state", state)):
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue  # the move itself will say what is wrong with the folder
        own = need[name] if min_free_mb == "auto" else 0
        have, names = wanted.get(dev, (0, []))
        wanted[dev] = (have + own, [*names, name])
    for dev, (own, names) in wanted.items():
        folder = outbox if names[0] == "outbox" else state
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        required = own + MARGIN_BYTES if min_free_mb == "auto" else int(min_free_mb) * 2**20
        if free < required:
            what = (f"about {_mib(own)} for its result, GIF and checkpoints plus {_mib(MARGIN_BYTES)}"
                    if min_free_mb == "auto" else f"limits.min_free_mb={min_free_mb}")
            return (f"waiting for disk space: {_mib(free)} free where the {' and '.join(names)} "
                    f"{'are' if len(names) > 1 else 'is'}, it needs {what}")
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
