"""Times as the operator reads them: error.yaml's and reports' stamps, the commands' durations."""
from __future__ import annotations

import time


def iso(t: float) -> str:
    """Local time with offset, for error.yaml and reports."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float | None) -> str:
    """'42 s', '17 min', '3 h 5 min'."""
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
