"""The worker's out-of-memory ladder, the queue order and the style cache, with a fake engine."""
import json
import threading
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

import fake_cuda
from nstd.config import load_config
from nstd.engine.device import resolve
from nstd.engine.params import Result
from nstd.state.status import Status
from nstd.state.folders import Folders
from nstd.state.store import Store
from nstd.daemon.queue import JobQueue
from nstd.daemon.outcome import Outcomes
from nstd.daemon.worker import Worker
from nstd.state.claim import Claim, Input, Times
from nstd.job.check import check_job
from nstd.job.file import parse_job
from nstd.engine import TargetCache


class FakeEngine:
    """Runs out of memory above `oom_above` pixels on its device, like a small GPU would."""

    calls: list = []

    def __init__(self, device="cpu", oom_above=None, **_):
        self.device = resolve(device)
        self.precision = "fp32"
        self.lbfgs_history = 50
        self.oom_above = oom_above

    def fit(self, content_size, params, budget_bytes, smallest=64, regions=0):
        return params.size  # the budget is not what these tests are about

    def style_grams(self, img, edge, layers, pooling):
        return {"conv1_1": torch.zeros(1, 1, 1)}

    def plan(self, content, styles, params):
        return params.schedule()  # every size is runnable here

    def stylize(self, content, styles, params, init_image=None, progress=None, cache=None, **_):
        w, h = (params.size, params.size * content.height // content.width)
        FakeEngine.calls.append((str(self.device), params.size))
        if self.oom_above is not None and w * h > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Result(image=Image.new("RGB", (w, h)), frames=[], losses={"total": 1.0}, steps=params.steps,
                      size=(w, h), device=str(self.device), precision="fp32",
                      timings={"targets": 0.0, "optimise": 0.0})


def make_worker(tmp_path, monkeypatch, device, oom_above, cpu_fallback=True):
    cfg = load_config(None)
    cfg["gpu"]["cpu_fallback"] = cpu_fallback
    cfg["gpu"]["vram_budget_mb"] = 100_000  # the budget is not what this test is about
    cfg["defaults"]["gif"] = False
    folders = Folders(*(tmp_path / n for n in ("inbox", "outbox", "quarantine", "state", "logs")))
    folders.create()
    cuda = fake_cuda.install(monkeypatch, total_memory=200_000 * 2**20)
    factory = lambda device="cpu", **kw: FakeEngine(device, oom_above if device != "cpu" else None)
    store = Store(folders)
    worker = Worker(cfg, device, JobQueue(), store, Status(folders.state), engine_factory=factory)
    worker.cuda = cuda
    return worker, store


def claim(store, cfg_defaults, size=512, name="j"):
    """Drop a job and claim it the way intake does: its files read from the job file."""
    c, s = (("c.png", "s.png") if name == "j" else (f"{name}-c.png", f"{name}-s.png"))
    Image.new("RGB", (400, 300)).save(store.f.inbox / c)
    Image.new("RGB", (40, 30)).save(store.f.inbox / s)
    sidecar = store.f.inbox / f"{name}.yaml"
    sidecar.write_text(f"content: {c}\nstyle: {s}\nsize: {size}\ngif: false\n")
    checked = check_job(parse_job(sidecar, store.f.inbox, cfg_defaults, 65536), load_config(None)["limits"])
    return store.claim(name, checked.files, set(), checked.settings)


def test_oom_retries_smaller_on_the_gpu(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cuda", oom_above=200 * 150)
    FakeEngine.calls = []
    w.process(claim(store, w.cfg["defaults"]))
    assert [s for _, s in FakeEngine.calls] == [512, 384, 288, 216, 162]
    report = json.loads((store.f.outbox / "j" / "report.json").read_text())
    assert report["oom_retries"] == 4 and report["size_used"][0] == 162 and not report["cpu_fallback"]
    assert report["device"] == "cuda:0"
    # the allocator was capped at the budget on cuda:0, and each out-of-memory freed the cache
    assert w.cuda.called("set_per_process_memory_fraction") == [(0.5, 0)]
    assert len(w.cuda.called("empty_cache")) == 4


def test_then_falls_back_to_the_cpu(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cuda", oom_above=10)
    FakeEngine.calls = []
    w.process(claim(store, w.cfg["defaults"]))
    assert FakeEngine.calls[-1] == ("cpu", 512)
    report = json.loads((store.f.outbox / "j" / "report.json").read_text())
    assert report["cpu_fallback"] and report["device"] == "cpu"


def test_else_quarantined_as_out_of_memory(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cuda", oom_above=10, cpu_fallback=False)
    w.process(claim(store, w.cfg["defaults"]))

    err = yaml.safe_load((store.f.quarantine / "j" / "error.yaml").read_text())
    assert err["kind"] == "out of memory" and err["stage"] == "run"
    assert sorted(p.name for p in (store.f.quarantine / "j").iterdir()) == ["c.png", "error.yaml", "j.yaml", "job.log", "s.png"]
    assert "out of memory at 512 px" in (store.f.quarantine / "j" / "job.log").read_text()


def test_encoding_overlaps_the_next_job_and_a_stop_waits_for_it(tmp_path, monkeypatch):
    w, store = make_worker(tmp_path, monkeypatch, "cpu", oom_above=None)
    FakeEngine.calls = []
    release, encoding = threading.Event(), threading.Event()
    real_encode = Outcomes.encode

    def slow_encode(self, done):
        if done.job.name == "a":
            encoding.set()
            assert release.wait(30)
        return real_encode(self, done)

    monkeypatch.setattr(Outcomes, "encode", slow_encode)
    w.start()
    try:
        w.queue.put(claim(store, w.cfg["defaults"], size=64, name="a"))
        assert encoding.wait(30)
        w.queue.put(claim(store, w.cfg["defaults"], size=48, name="b"))
        deadline = time.monotonic() + 30
        while len(FakeEngine.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # b was optimised while a was still being encoded
        assert [s for _, s in FakeEngine.calls] == [64, 48] and not (store.f.outbox / "a").exists()
        w.begin_stop(0)
    finally:
        release.set()
        w.join(30)
    assert not w.is_alive() and not w.finisher.is_alive()
    assert sorted(p.name for p in store.f.outbox.iterdir()) == ["a", "b"]  # the stop waited for both
    assert list(store.f.jobs.iterdir()) == []


def test_queue_orders_by_priority_then_age():
    q = JobQueue()
    for name, prio, t in (("old-low", 0, 1.0), ("new-high", 5, 3.0), ("old-high", 5, 2.0), ("new-low", 0, 4.0)):
        # claimed in the reverse order of arrival: arrival decides
        i = Input("x.jpg", "x.jpg")
        q.put(Claim(name, name, i, [], i, {"priority": prio}, Times(first_seen=t, arrived=t, claimed=10 - t)))
    assert q.names() == ["old-high", "new-high", "old-low", "new-low"]
    assert [q.get(0).name for _ in range(4)] == ["old-high", "new-high", "old-low", "new-low"]
    assert q.get(0.01) is None


def test_style_cache_is_lru():
    c = TargetCache(capacity=2)
    calls = []
    get = lambda k: c.get(k, lambda: calls.append(k) or {k: k})
    get("a"), get("b"), get("a"), get("c"), get("b")
    assert calls == ["a", "b", "c", "b"] and c.hits == 1


def test_style_cache_keeps_at_most_its_bytes():
    """Targets sit on the device outside the memory model: the cache holds at most max_bytes of
    them, least recently used going first; an entry larger than that is not kept at all."""
    c = TargetCache(capacity=10, max_bytes=1000)
    calls = []
    get = lambda k, n: c.get(k, lambda: calls.append(k) or {"x": torch.zeros(n // 4)})  # noqa: E731
    get("a", 400), get("b", 400), get("a", 400), get("c", 400)  # a, c kept: b was least recently used
    assert c.nbytes == 800 and calls == ["a", "b", "c"]
    get("b", 400), get("huge", 4000), get("huge", 4000)
    assert calls == ["a", "b", "c", "b", "huge", "huge"] and c.nbytes == 800
    c.clear()
    assert c.nbytes == 0


def test_a_budget_below_the_smallest_job_warns(tmp_path, monkeypatch):
    from loguru import logger

    w, _ = make_worker(tmp_path, monkeypatch, "cuda", oom_above=None)
    lines = []
    sink = logger.add(lines.append, level="WARNING")
    try:
        w.cfg["gpu"]["vram_budget_mb"] = 64
        w.cap_memory()
        w.cfg["gpu"]["vram_budget_mb"] = 4096
        w.cap_memory()
    finally:
        logger.remove(sink)
    assert len(lines) == 1 and "gpu.vram_budget_mb=64 is below what the smallest job needs on cuda:0" in lines[0]
    assert [f for f, _ in w.cuda.called("set_per_process_memory_fraction")][-2:] == [64 / 200_000, 4096 / 200_000]
