"""`nstd run`: the watch-folder daemon's loop, one module a stage.

inbox.py (what is a job, when it is ready) -> intake.py (the one job check, then claim or
quarantine) -> queue.py (priority order, the retry policy) -> worker.py (one job at a time on a
device; jobprogress.py: what a running job reports) -> outcome.py (deliver, quarantine, cancel:
error.yaml, report.json, counts and hooks). daemon.py starts and stops it all, behind the seam of
backend.py (who runs the jobs); watcher.py, notify.py, hooks.py, diskroom.py and expiry.py serve
it. What it reads and writes on disk is nstd/state/'s.
"""
