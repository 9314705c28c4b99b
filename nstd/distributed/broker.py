"""Celery on Redis, set up once for both sides: the intake sends, `nstd worker` consumes.

A message says only "a job is waiting" (its argument names the job that prompted it, for the
logs); the worker that takes it runs the best job nobody holds (nstd/distributed/board.py). The
settings make a message outlive its worker: acknowledged late (after the job is delivered), one
at a time per worker (prefetch 1, concurrency 1, the solo pool: the job runs in the worker's own
process, where the network is loaded), and handed out again by Redis after `visibility_seconds`
when the worker that took it died.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

TASK = "nstd.run_next"
#: Seconds the intake waits on Redis before it calls it unreachable (and tries again next tick).
SOCKET_TIMEOUT = 3.0


def make_app(cfg: dict) -> "Celery":
    from celery import Celery

    q = cfg["queue"]
    app = Celery("nstd", broker=q["broker"], set_as_current=False)
    app.conf.update(
        task_default_queue=q["name"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={"visibility_timeout": q["visibility_seconds"],
                                  "socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": SOCKET_TIMEOUT},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a Redis restart, however long
        broker_connection_timeout=SOCKET_TIMEOUT,
        broker_heartbeat=0,
    )
    return app


class Broker:
    """The intake's side: count what is queued, send more."""

    def __init__(self, cfg: dict):
        import redis

        self.queue_name = cfg["queue"]["name"]
        self.app = make_app(cfg)
        self.redis = redis.Redis.from_url(cfg["queue"]["broker"], socket_timeout=SOCKET_TIMEOUT,
                                          socket_connect_timeout=SOCKET_TIMEOUT)

    def queued(self) -> int:
        """Messages waiting in the queue (not those a worker holds). Raises when Redis cannot be
        reached. Only priority-0 messages are sent, which kombu keeps in a list named as the queue."""
        return int(self.redis.llen(self.queue_name))

    def send(self, job_id: str) -> None:
        """One message; raises when Redis cannot take it."""
        self.app.send_task(TASK, args=[job_id], queue=self.queue_name, retry=False)

    def clock_skew(self) -> float:
        """Seconds this machine's clock is behind Redis's (negative: ahead). Raises when Redis
        cannot be reached. Leases and holds do not depend on it (nstd/distributed/lease.py): the
        times shown (a worker heard from, a job held until) do."""
        import time

        before = time.time()
        seconds, micros = self.redis.time()
        after = time.time()
        return seconds + micros / 1e6 - (before + after) / 2

    def close(self) -> None:
        try:
            self.redis.close()
        except Exception:
            pass


#: The largest clock difference with the broker a machine may have before nstd says so, as a share
#: of queue.lease_seconds.
MAX_SKEW_SHARE = 0.25


def skew_problem(skew: float, lease_seconds: float) -> str | None:
    if abs(skew) <= lease_seconds * MAX_SKEW_SHARE:
        return None
    return (f"this machine's clock is {abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} the broker's: "
            "leases do not depend on clocks, but the times the status shows (a worker heard from, a job "
            "held until) are off by as much: run NTP (chrony, systemd-timesyncd) on every machine")


def redact(url: str) -> str:
    """The broker's URL without its password, for logs, status.json and the page."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            return url
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(the broker URL)"
