"""The status page's cost to the worker: step times with and without a flood of requests.

One daemon with its page; jobs alternate quiet / flooded (ABAB..., so drift hits both alike). A
flood is N client processes fetching the page, status.json, the picture and /metrics in a loop.
Clients run at nice 19 by default, as browsers on other machines would cost this one nothing
(--client-nice 0 makes them compete at full priority too). Also read: how many requests were
answered, and the CPU seconds the page's process used per request.

    .venv/bin/python bench/web_load.py                  # 64 px, 150 steps, 3 rounds, 4 clients
    .venv/bin/python bench/web_load.py --clients 8 --rounds 5

Prints a markdown table; the ratio is flooded / quiet median step time, from this one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from harness import Daemon  # noqa: E402
from test_web import FLOOD  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_pid(root: Path) -> int:
    out = subprocess.run(["pgrep", "-f", "nstd.web.server"], capture_output=True, text=True).stdout.split()
    mine = [int(p) for p in out if str(root) in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace")]
    return mine[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--client-nice", type=int, default=19)
    ap.add_argument("--client-idle", action="store_true", help="clients under SCHED_IDLE instead of nice")
    ap.add_argument("--baseline", action="store_true",
                    help="also flood a trivial server (http.server, nice 19) at the same time of each round: "
                         "the cost of any such load on this machine, against which the page's is read")
    a = ap.parse_args()
    flood_code = FLOOD.replace("os.nice(19)", f"os.nice({a.client_nice})")
    if a.client_idle:
        flood_code = FLOOD.replace("os.nice(19)", "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))")
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), web={"enabled": True, "listen": "127.0.0.1:0"},
                   defaults={"size": a.size, "steps": a.steps, "gif": False}, logging={"level": "INFO"})
        d.start()
        try:
            d.wait(lambda: (d.status() or {}).get("web"), 30, "the page")
            url = d.status()["web"]
            pid = page_pid(d.root)
            step = {"quiet": [], "flooded": [], "baseline": []}
            requests, page_cpu = 0, 0.0
            static = None
            if a.baseline:
                (Path(tmp) / "static").mkdir()
                (Path(tmp) / "static" / "index.html").write_text("<p>x</p>" * 500)
                static = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "http.server", "0", "--bind",
                                           "127.0.0.1", "-d", str(Path(tmp) / "static")], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
                static_url = "http://127.0.0.1:%s/" % static.stdout.readline().split("port ")[1].split()[0]
            modes = ("quiet", "flooded", "baseline") if a.baseline else ("quiet", "flooded")
            for r in range(a.rounds):
                for mode in modes:
                    name = f"{mode}{r}"
                    flood = []
                    cpu0 = cpu_seconds(pid)
                    if mode != "quiet":
                        target = url if mode == "flooded" else static_url
                        flood = [subprocess.Popen([sys.executable, "-c", flood_code, target], stdout=subprocess.PIPE,
                                                  text=True) for _ in range(a.clients)]
                    d.drop(name, {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
                    d.wait_landed(name, timeout=600)
                    for f in flood:
                        f.send_signal(signal.SIGINT)
                    n = sum(len(f.communicate(timeout=60)[0].split()) for f in flood)
                    if mode == "flooded":
                        requests += n
                        page_cpu += cpu_seconds(pid) - cpu0
                    report = json.loads((d.outbox / name / "report.json").read_text())
                    step[mode].append(report["timings"]["optimised"] / a.steps)
        finally:
            d.stop()
            if static is not None:
                static.terminate()
    q, f = statistics.median(step["quiet"]), statistics.median(step["flooded"])
    print(f"web_load: {platform.node()}, {os.cpu_count()} CPUs, {a.size} px, {a.steps} steps, {a.rounds} rounds, "
          f"{a.clients} clients at nice {a.client_nice}")
    print()
    print("| | median step | requests answered | page CPU per request |")
    print("| --- | --- | --- | --- |")
    print(f"| quiet | {q * 1000:.1f} ms | | |")
    print(f"| flooded | {f * 1000:.1f} ms | {requests} | {page_cpu / max(1, requests) * 1000:.2f} ms |")
    if a.baseline:
        s = statistics.median(step["baseline"])
        print(f"| a trivial server flooded alike | {s * 1000:.1f} ms | | |")
        print(f"| ratio, page / trivial server | {f / s:.2f}x | | |")
    print(f"| ratio, page / quiet | {f / q:.2f}x | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
