"""The status page's process: `python -m nstd.web.server`, started and stopped by the daemon.

A process of its own, at the lowest CPU priority (SCHED_IDLE, else nice 19), so a flood of requests never takes
the CPU or the interpreter lock from the worker: it reads only what the daemon writes
(status.json, the published preview, the outbox and the quarantine) and serves it with waitress.
Its first line on stdout is its address (or an error); it ends when its daemon does.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

#: waitress's worker threads: enough for a few browsers (a connection never holds one for long).
THREADS = 4
#: A connection's unsent output above this makes its next response wait for it to drain...
OUTBUF_BYTES = 1 << 20
#: ...and a connection that takes none of its output for this long is cut off (a slow reader).
STALL_SECONDS = 5.0
#: status.json is read at most this often.
STATUS_SECONDS = 0.5


def _bounded_channel():
    """waitress's HTTPChannel, except that no connection can hold a worker thread or pile up
    output: a client that pipelines requests while leaving more than OUTBUF_BYTES unread is cut
    off at once, and one whose unread output is not taken for STALL_SECONDS is cut off then
    (waitress itself waits for ever: two such clients stopped the page)."""
    from waitress.channel import HTTPChannel

    class BoundedChannel(HTTPChannel):
        cut = False

        def _flush_outbufs_below_high_watermark(self) -> None:
            if self.total_outbufs_len <= self.adj.outbuf_high_watermark:
                return
            with self.outbuf_lock:
                self._flush_exception(self._flush_some, do_close=False)
                while self.connected and self.total_outbufs_len > self.adj.outbuf_high_watermark:
                    stalled = time.time() - self.last_activity
                    if len(self.requests) > 1 or stalled >= STALL_SECONDS:
                        # Taken as gone: its task ends (write_soon raises ClientDisconnected, no
                        # further request is served) and the server's loop closes the socket.
                        self.cut, self.connected = True, False
                        self.server.pull_trigger()
                        return
                    self.server.pull_trigger()
                    self.outbuf_lock.wait(STALL_SECONDS - stalled)

    return BoundedChannel


def _cut_stalled(server) -> None:
    """Besides waitress's own upkeep (idle connections), close on the server's loop (every
    cleanup_interval) each connection cut off above and each whose output has waited
    STALL_SECONDS without a byte taken: a socket that takes nothing never becomes writable, so
    waitress's own `will_close` would never be acted on."""
    plain = server.maintenance

    def maintenance(now: float) -> None:
        plain(now)
        doomed = [c for c in list(server.active_channels.values())
                  if getattr(c, "cut", False) or (c.total_outbufs_len and now - c.last_activity >= STALL_SECONDS)]
        if doomed:
            # Closed from the trigger, after this turn's select(): maintenance runs while the loop
            # lists the sockets to select on, and a socket closed then is handed to select()
            # closed (EBADF ended the page's process: sleepy readers killed it in bench/page_load.py).
            server.trigger.pull_trigger(lambda: _close(doomed))

    server.maintenance = maintenance


def _close(channels) -> None:
    for channel in channels:
        if channel._fileno is not None and channel._map.get(channel._fileno) is channel:  # not closed meanwhile
            channel.handle_close()


def own_names(shown: str, port: int, extra: list[str]) -> set[str]:
    """The Host headers the page answers to: its bound address, the loopback's names, this
    machine's names and addresses, and the operator's `web.hosts`, each with the port (and
    without it where the port is HTTP's own). A page elsewhere that a browser opens under
    another name (DNS rebinding) gets 421."""
    names = {shown, "localhost", "127.0.0.1", "[::1]", *extra}
    try:
        host = socket.gethostname()
        names |= {host, socket.getfqdn(), *socket.gethostbyname_ex(host)[2]}
    except OSError:
        pass
    names = {n.lower() for n in names if n and n not in ("0.0.0.0", "[::]")}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8750', '[::1]:8750', ':8750' (every interface) -> (host, port); config.py
    has checked the form."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _lowest_priority() -> None:
    """SCHED_IDLE: the CPU only when nothing else wants it (the worker always comes first);
    nice 19 where that policy is refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


class Summarised(logging.Handler):
    """The page's own messages (waitress: "Task queue depth is 1", "client disconnected"...) to
    stderr, at most one line a `seconds` per logger, counting the rest: a client that provokes a
    line per request cannot flood the journal (whose per-unit rate limit would then drop the
    daemon's own lines)."""

    def __init__(self, stream=None, seconds: float = 60.0, clock=time.monotonic) -> None:
        super().__init__(logging.WARNING)
        self.stream, self.seconds, self.clock = stream, seconds, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        now, key = self.clock(), record.name
        last = self._last.get(key)
        if last is not None and now - last < self.seconds:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        more = f" ({held} more from {key} in the last {now - last:.0f} s)" if held and last is not None else ""
        from nstd.logs import one_line

        stream = self.stream or sys.stderr
        try:
            stream.write(f"web: {one_line(record.getMessage())[:300]}{more}\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def quiet_waitress(handler: logging.Handler | None = None) -> logging.Handler:
    """Route waitress's loggers through one Summarised handler (and not to Python's last resort)."""
    handler = handler or Summarised()
    log = logging.getLogger("waitress")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING)
    return handler


def _orphan_watch(parent: int) -> None:
    """End with the daemon, however it ends (kill -9 included)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main() -> int:
    cfg = json.loads(os.environ["NSTD_WEB"])
    _lowest_priority()
    from waitress.server import create_server

    from nstd.state.status import read_status
    from nstd.web.app import Recent, create_app
    from nstd.web.view import View

    state = Path(cfg["state"])
    recent = Recent(STATUS_SECONDS)  # status.json changes once a second: not parsed per request
    view = View(lambda: recent.get("status", lambda: read_status(state) or {}), state, Path(cfg["root"]),
                Path(cfg["outbox"]), Path(cfg["quarantine"]), cfg["results"])
    host, port = parse_listen(cfg["listen"])
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]  # one address: "localhost"
    except OSError as exc:
        print(f"error: cannot listen on {cfg['listen']}: {exc.strerror or exc}", flush=True)
        return 2
    app = create_app(view, cfg["refresh_seconds"])
    quiet_waitress()
    try:
        # A GET needs no body: one over 1 KiB is refused before waitress spools it to a file.
        server = create_server(app, host=address, port=port, threads=THREADS, ident="nstd", channel_timeout=10,
                               connection_limit=100, max_request_body_size=1024,
                               outbuf_high_watermark=OUTBUF_BYTES, cleanup_interval=1)
        server.channel_class = _bounded_channel()
        _cut_stalled(server)
    except OSError as exc:
        print(f"error: cannot listen on {cfg['listen']}: {exc.strerror or exc}", flush=True)
        return 2
    port = server.effective_port
    shown = f"[{address}]" if ":" in address else address
    app.config["NSTD_HOSTS"] = own_names(shown, port, cfg.get("hosts") or [])  # DNS rebinding: 421 otherwise
    app.config["NSTD_TOKEN"] = cfg.get("token")
    print(f"http://{shown}:{port}/", flush=True)
    threading.Thread(target=_orphan_watch, args=(cfg["parent"],), daemon=True).start()
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
