"""A small version of bench/load.py: many jobs dropped at once all land, memory stays flat."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_forty_jobs_dropped_at_once():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "load.py"), "40", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["landed"] == 40 and figures["quarantined"] == 0 and figures["audit_problems"] == []
    assert figures["rss_growth_mb"] < 50, figures  # no per-job leak (a leak of 1 MB a job would show)
