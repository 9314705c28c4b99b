"""Run the fault, hostile-input and load tests and print the README's Reliability table.

    .venv/bin/python bench/reliability.py

Each row is one test: what was tried, what must hold (the test's assertions), and what happened.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: test id -> (what was tried, what must hold)
ROWS = {
    "test_faults.py::test_kill_9_at_random_moments_every_job_lands_once":
        ("kill -9 at 5 seeded random moments of an 8-job batch, restarting each time",
         "every job lands exactly once; audit clean; a folder outside the root untouched"),
    "test_daemon_crash.py::test_kill_9_during_a_job_then_restart":
        ("kill -9 in the middle of a job, restart", "lands once, attempts 2, resumed from its last checkpoint"),
    "test_daemon_crash.py::test_a_job_that_keeps_crashing_the_daemon_is_quarantined":
        ("a job running at each of 2 kills (queue.max_attempts 2)", "quarantined as crashed with its inputs; next job lands"),
    "test_daemon_service.py::test_sigterm_mid_job_stops_at_a_step_and_resumes_later":
        ("SIGTERM mid-job with a 0.5 s grace, restart", "exit 0; job stays claimed; resumes at step k, runs only the rest"),
    "test_faults.py::test_style_deleted_before_the_claim_then_missing":
        ("style image deleted between detection and claim", "quarantined as missing input with what remains"),
    "test_faults.py::test_style_replaced_before_the_claim_uses_the_new_file":
        ("style image replaced between detection and claim", "settles again; lands with the new file"),
    "test_faults.py::test_inbox_removed_and_recreated":
        ("inbox folder removed, then recreated (a share dropping out)", "daemon stays up, re-watches; next job lands"),
    "test_faults.py::test_unreadable_image_is_a_clear_error":
        ("an image the service user may not read", "ImageError 'permission denied' (a bad-image verdict)"),
    "test_faults_disk.py::test_full_outbox_quarantines_with_the_reason":
        ("outbox on a full 256 KB tmpfs", "half-written folder rolled back; quarantined: No space left on device"),
    "test_faults_disk.py::test_when_nothing_can_be_written_the_job_waits_in_state_and_lands_later":
        ("outbox and quarantine both full", "job stays in state, retried; lands once space returns"),
    "test_worker.py::test_oom_retries_smaller_on_the_gpu":
        ("out of memory injected above a pixel count", "retried at 3/4 size until it fits; report says so"),
    "test_worker.py::test_then_falls_back_to_the_cpu":
        ("out of memory at every GPU size", "finished on the CPU (gpu.cpu_fallback)"),
    "test_worker.py::test_else_quarantined_as_out_of_memory":
        ("out of memory, no CPU fallback", "quarantined as out of memory with its inputs"),
    "test_daemon_bad_input.py::test_bad_input_is_quarantined_and_the_daemon_runs_on":
        ("65 hostile and odd inputs in one batch: bad YAML, every key wrong, bombs, tags, paths out "
         "(.., absolute, symlinks, a linked job file), corrupt/truncated/empty/non-images, huge dimensions, "
         "CMYK, 16-bit, alpha, animated, EXIF, odd names (spaces, unicode, newline, 240 chars, case)",
         "each gets the expected verdict and reason; daemon up; audit clean; escaping paths never opened"),
    "test_load.py::test_forty_jobs_dropped_at_once":
        ("40 jobs dropped at once (CI's small version of bench/load.py)", "all land, audit clean, RSS growth < 50 MB"),
}


def main() -> int:
    files = sorted({k.split("::")[0] for k in ROWS})
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}", *[f"tests/{f}" for f in files]],
                       cwd=REPO, stdout=subprocess.DEVNULL)
        took = time.time() - t0
        results = {}
        for case in ET.parse(junit).iter("testcase"):
            key = f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            results[key] = ("FAILED" if failed else "skipped" if skipped else "held", float(case.get("time", 0)))
    print(f"Run {time.strftime('%Y-%m-%d')} on {platform.machine()} Linux, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, by `bench/reliability.py` ({took:.0f} s).\n")
    print("| what was tried | what must hold | result |\n| --- | --- | --- |")
    bad = 0
    for key, (tried, must) in ROWS.items():
        outcome, secs = results.get(key, ("not run", 0.0))
        bad += outcome in ("FAILED", "not run")
        print(f"| {tried} | {must} | {outcome} ({secs:.0f} s) |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
