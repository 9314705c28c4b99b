"""The status page's process: `python -m nstd.web.server`, started and stopped by the daemon.

A process of its own, at the lowest CPU priority (nice 19), so a flood of requests never takes
the CPU or the interpreter lock from the worker: it reads only what the daemon writes
(status.json, the published preview, the outbox and the quarantine) and serves it with waitress.
Its first line on stdout is its address (or an error); it ends when its daemon does.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

#: waitress's worker threads: enough for a few browsers; a flood waits in the queue.
THREADS = 2


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8750', '[::1]:8750', ':8750' (every interface) -> (host, port); config.py
    has checked the form."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _orphan_watch(parent: int) -> None:
    """End with the daemon, however it ends (kill -9 included)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main() -> int:
    cfg = json.loads(os.environ["NSTD_WEB"])
    os.nice(19)
    from waitress.server import create_server

    from nstd.daemon.status import read_status
    from nstd.web.app import create_app
    from nstd.web.view import View

    state = Path(cfg["state"])
    view = View(lambda: read_status(state) or {}, state, Path(cfg["root"]), Path(cfg["outbox"]),
                Path(cfg["quarantine"]), cfg["results"])
    host, port = parse_listen(cfg["listen"])
    try:
        server = create_server(create_app(view, cfg["refresh_seconds"]), host=host, port=port, threads=THREADS,
                               ident="nstd", channel_timeout=30, connection_limit=64)
    except OSError as exc:
        print(f"error: cannot listen on {cfg['listen']}: {exc.strerror or exc}", flush=True)
        return 2
    shown = f"[{host}]" if ":" in host else host
    print(f"http://{shown}:{server.effective_port}/", flush=True)
    threading.Thread(target=_orphan_watch, args=(cfg["parent"],), daemon=True).start()
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
