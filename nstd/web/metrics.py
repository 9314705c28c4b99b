"""/metrics in the Prometheus text format, built at scrape time from the daemon's status and the
live job's histograms (prometheus_client's exposition, not a format of our own)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from nstd import __version__
from nstd.state.status import STALE_SECONDS, cluster_counts, workers
from nstd.web.view import View


class _Collector:
    def __init__(self, view: View):
        self.view = view

    def collect(self):
        status = self.view.status()
        counts = status
        if status.get("backend") == "celery":  # the workers deliver: their counts join the intake's
            counts = cluster_counts(status, workers(self.view.state))
        done = CounterMetricFamily("nstd_jobs_done", "Jobs delivered to the outbox since the daemon started")
        done.add_metric([], counts.get("done", 0))
        failed = CounterMetricFamily("nstd_jobs_failed", "Jobs quarantined for their own reason since the daemon "
                                     "started, by error kind (error.yaml's kind)", labels=["kind"])
        for kind, n in sorted((counts.get("failed_kinds") or {}).items()):
            failed.add_metric([kind], n)
        cancelled = CounterMetricFamily("nstd_jobs_cancelled", "Jobs cancelled (nstd cancel) since the daemon started")
        cancelled.add_metric([], counts.get("cancelled", 0))
        info = InfoMetricFamily("nstd", "This nstd", value={"version": __version__,
                                                            "backend": str(status.get("backend") or "local")})
        age = time.time() - status.get("updated_at", 0) if status.get("updated_at") else float("inf")
        responding = GaugeMetricFamily("nstd_up", f"1 while the daemon updates its status (within {STALE_SECONDS:g} s); "
                                       "0 when it is stopped, hung or gone")
        responding.add_metric([], 1 if age <= STALE_SECONDS and status.get("state") not in ("stopped", None) else 0)
        status_age = GaugeMetricFamily("nstd_status_age_seconds", "Seconds since the daemon last wrote its status")
        status_age.add_metric([], age if age != float("inf") else -1)
        queued = GaugeMetricFamily("nstd_queue_length", "Claimed jobs waiting for a worker")
        queued.add_metric([], len(status.get("queue") or []))
        waiting = GaugeMetricFamily("nstd_inbox_waiting", "Job files in the inbox not yet taken")
        waiting.add_metric([], len(status.get("waiting") or []))
        running = GaugeMetricFamily("nstd_job_running", "1 while a job runs")
        running.add_metric([], 1 if status.get("running") else 0)
        up = GaugeMetricFamily("nstd_start_time_seconds", "When the daemon started, seconds since the epoch")
        up.add_metric([], status.get("started_at", 0))
        yield from (done, failed, cancelled, queued, waiting, running, up, info, responding, status_age)
        live = status.get("live") if isinstance(status.get("live"), dict) else {}
        yield _histogram("nstd_step_seconds", "Time of one optimisation step", live.get("step_seconds"))
        yield _histogram("nstd_job_duration_seconds", "A job's time from start to delivery", live.get("job_seconds"))


def _histogram(name: str, doc: str, h) -> HistogramMetricFamily:
    """A histogram from status.json's form (nstd/state/live.py Histogram.as_json)."""
    family = HistogramMetricFamily(name, doc)
    try:
        buckets = [(repr(float(b)), float(c)) for b, c in zip(h["bounds"], h["counts"])] + [("+Inf", float(h["count"]))]
        family.add_metric([], buckets, sum_value=float(h["sum"]))
    except (TypeError, KeyError, ValueError):
        family.add_metric([], [("+Inf", 0.0)], sum_value=0.0)
    return family


def render_metrics(view: View) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(view))
    return generate_latest(registry)
