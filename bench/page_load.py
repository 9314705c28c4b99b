"""The status page under load: /status.json's latency and the page's memory, honest browsers
alone and then with hostile clients among them.

One daemon with its page, a job running (the page shows it). A probe asks /status.json ten times a
second, one request at a time, and times each answer; another samples the page process's RSS. Load
comes from a separate process: N honest browsers (the page, status.json and the picture, every
`refresh_seconds`) and M hostile clients, in turn of three kinds:

- pipeliners: 100 GETs of a 4 MiB outbox file on one connection, nothing read; again when cut off;
- sleepers: one GET of the same file, then one byte read every 4 s (just inside the stall
  allowed), on 10 connections each;
- thumbnail bombs: thumbnails of 200 distinct 4000x4000 PNGs (more than the page keeps, each
  client in its own part of the cycle, so each is decoded again) and of a 7000x7000 one (refused),
  as fast as answered.

    .venv/bin/python bench/page_load.py                      # 4 browsers; 0 then 10 hostile; 20 s each
    .venv/bin/python bench/page_load.py --hostile 0 10 30 --seconds 30

Prints a markdown table, one row per M; the first row (M = 0) is the baseline the others'
ratios are read against, from this same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

BIG = 4 * 1024 * 1024
THUMB_FILES = 200


def rss_mib(pid: int) -> float:
    """The page process's resident memory; 0 once it is gone (the daemon starts another)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def page_pid(root: Path) -> int:
    out = subprocess.run(["pgrep", "-f", "nstd.web.server"], capture_output=True, text=True).stdout.split()
    mine = [int(p) for p in out if str(root) in Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace")]
    return mine[0]


# ---------------------------------------------------------------------------------------- load


def _honest(url: str, every: float, stop: threading.Event, counts: dict) -> None:
    while not stop.is_set():
        for path in ("", "status.json", "preview.jpg"):
            try:
                with urllib.request.urlopen(url + path, timeout=10) as r:
                    r.read()
                counts["honest"] += 1
            except Exception:
                counts["honest_failed"] += 1
        stop.wait(every)


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def _pipeliner(host: str, port: int, stop: threading.Event, counts: dict) -> None:
    ask = f"GET /files/outbox/big/big.png HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() * 100
    while not stop.is_set():
        try:
            s = _connect(host, port)
            s.sendall(ask)
        except OSError:
            stop.wait(0.5)
            continue
        counts["pipelined"] += 1
        try:
            while not stop.is_set():  # more of the same every half second, until cut off
                stop.wait(0.5)
                s.sendall(ask[: len(ask) // 100])
        except OSError:
            pass
        s.close()


def _sleeper(host: str, port: int, stop: threading.Event, counts: dict) -> None:
    ask = f"GET /files/outbox/big/big.png HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    socks: list[socket.socket] = []
    while not stop.is_set():
        while len(socks) < 10:
            try:
                s = _connect(host, port)
                s.sendall(ask)
                socks.append(s)
                counts["slow"] += 1
            except OSError:
                break
        stop.wait(4.0)
        for s in list(socks):
            try:
                s.settimeout(0.5)
                if not s.recv(1):
                    raise OSError("closed")
            except OSError:
                socks.remove(s)
                s.close()
    for s in socks:
        s.close()


def _thumbs(url: str, k: int, stop: threading.Event, counts: dict) -> None:
    n = 37 * k  # each client its own part of the cycle: what one asked for has left the cache when another does
    while not stop.is_set():
        path = f"thumbs/outbox/t{n % THUMB_FILES:03d}/picture.png" if n % 10 else "thumbs/outbox/bomb/bomb.png"
        n += 1
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                r.read()
            counts["thumbs"] += 1
        except urllib.error.HTTPError:
            counts["thumbs"] += 1  # refused (the bomb: 404) is an answer
        except Exception as exc:
            counts["thumbs_failed"] += 1
            counts.setdefault("why", {}).setdefault(type(exc).__name__ + str(getattr(exc, "reason", ""))[:40], 0)
            counts["why"][type(exc).__name__ + str(getattr(exc, "reason", ""))[:40]] += 1


def load(url: str, honest: int, hostile: int, every: float) -> None:
    """The load process: runs until stdin closes, then prints its counts."""
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    stop = threading.Event()
    counts = {k: 0 for k in ("honest", "honest_failed", "pipelined", "slow", "thumbs", "thumbs_failed")}
    threads = [threading.Thread(target=_honest, args=(url, every, stop, counts), daemon=True) for _ in range(honest)]
    kinds = [lambda i: _pipeliner(host, port, stop, counts), lambda i: _sleeper(host, port, stop, counts),
             lambda i: _thumbs(url, i, stop, counts)]
    threads += [threading.Thread(target=kinds[i % 3], args=(i // 3,), daemon=True) for i in range(hostile)]
    for t in threads:
        t.start()
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(15)
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


# ---------------------------------------------------------------------------------------- probe


def probe(url: str, pid: int, seconds: float) -> dict:
    waits, failed, rss = [], 0, []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss.append(rss_mib(pid))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url + "status.json", timeout=5) as r:
                r.read()
            waits.append(time.monotonic() - t0)
        except Exception:
            failed += 1
            waits.append(5.0)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))
    stop.set()
    sampler.join()
    waits.sort()
    return {"n": len(waits), "failed": failed, "p50": statistics.median(waits),
            "p99": waits[min(len(waits) - 1, int(0.99 * len(waits)))], "max": waits[-1], "rss": max(rss)}


def prepare(outbox: Path) -> None:
    from PIL import Image

    (outbox / "big").mkdir()
    (outbox / "big" / "big.png").write_bytes(os.urandom(BIG))
    (outbox / "bomb").mkdir()
    Image.new("RGBA", (7000, 7000), (10, 20, 30, 128)).save(outbox / "bomb" / "bomb.png")
    first = outbox / "t000"
    first.mkdir()
    Image.linear_gradient("L").resize((4000, 4000)).convert("RGB").save(first / "picture.png")
    for n in range(1, THUMB_FILES):
        (outbox / f"t{n:03d}").mkdir()
        shutil.copyfile(first / "picture.png", outbox / f"t{n:03d}" / "picture.png")  # a file of its own


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--browsers", type=int, default=4, help="honest browsers (N)")
    ap.add_argument("--hostile", type=int, nargs="+", default=[0, 10], help="hostile clients (M), one row each")
    ap.add_argument("--seconds", type=float, default=20.0, help="probed seconds per row")
    ap.add_argument("--load", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.load:
        load(a.load, a.browsers, a.hostile[0], 3.0)
        return 0

    from harness import Daemon

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), web={"enabled": True, "listen": "127.0.0.1:0", "refresh_seconds": 3},
                   defaults={"size": 64, "steps": 100000, "gif": False}, service={"shutdown_grace_seconds": 0},
                   limits={"max_steps": 100000})
        d.start()
        try:
            d.wait(lambda: (d.status() or {}).get("web"), 30, "the page")
            url = d.status()["web"]
            prepare(d.outbox)
            d.drop("running", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
            d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 3, 120, "the job to run")
            pid = page_pid(d.root)
            for m in a.hostile:
                gen = subprocess.Popen([sys.executable, __file__, "--load", url, "--browsers", str(a.browsers),
                                        "--hostile", str(m)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                time.sleep(2.0)  # the clients connect and settle
                row = probe(url, pid, a.seconds)
                out, _ = gen.communicate("", timeout=60)
                row.update(m=m, counts=out.strip())
                rows.append(row)
                time.sleep(6.0)  # what was cut off is closed before the next row
        finally:
            d.stop()
            said = [line for line in d.logs().splitlines() if "page" in line and ("WARNING" in line or "ERROR" in line)]
    print(f"page_load: {platform.node()}, {os.cpu_count()} CPUs, {a.browsers} honest browsers, "
          f"{a.seconds:g} s probed per row, a 64 px job running")
    print()
    print("| hostile clients | probes | failed | p50 | p99 | max | p99 / baseline | page RSS peak | clients' counts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = rows[0]["p99"]
    for r in rows:
        print(f"| {r['m']} | {r['n']} | {r['failed']} | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
              f"{r['max'] * 1000:.0f} ms | {r['p99'] / base:.2f}x | {r['rss']:.0f} MiB | {r['counts']} |")
    if said:
        print("\nThe daemon's warnings about its page:\n" + "\n".join(said[-20:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
