"""`nstd run`: the watch-folder daemon, one module a stage.

inbox.py (what is a job, when it is ready) -> intake.py (the one job check, then claim or
quarantine) -> store.py (every move between folders, crash-safe; claim.py is a claimed job's
record) -> queue.py (priority order, the retry policy) -> worker.py (one job at a time on a
device) -> outcome.py (deliver, quarantine, error.yaml, report.json). daemon.py starts and stops
it all; lock.py keeps it one per root; safefs.py reaches users' files without following links;
watcher.py, status.py and notify.py serve it.
"""
