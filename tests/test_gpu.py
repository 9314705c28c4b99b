"""Every CUDA path on a real GPU, end to end: `pytest -m gpu` (bench/gpu_check.sh runs them).

Skipped where CUDA is absent; the CPU suite covers the same paths with CUDA faked (test_device.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from harness import Daemon

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
LAYERS = ["conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]
MIB = 2**20


def gpu_daemon(tmp_path, engine=None, gpu=None, **sections) -> Daemon:
    return Daemon(tmp_path, engine={"device": "cuda", "precision": "fp32", **(engine or {})},
                  gpu={"vram_budget_mb": 4096, **(gpu or {})}, **sections)


def report(d: Daemon, name: str) -> dict:
    return json.loads((d.outbox / name / "report.json").read_text())


def land_one(d: Daemon, name: str, timeout: float) -> dict:
    """Start `d`, drop tubingen + starry_night as `name`, wait for it to land, stop: its report."""
    d.start()
    try:
        d.drop(name, {"content": "tubingen.jpg", "style": "starry_night.jpg"})
        d.wait_landed(name, timeout=timeout)
    finally:
        d.stop()
    return report(d, name)


@pytest.mark.parametrize("engine,gpu", [
    ({"device": "cuda"}, {}),
    ({"device": "cuda:0"}, {}),
    ({"device": "auto"}, {}),
    ({"device": "cpu"}, {"devices": ["cuda:0"]}),
], ids=["cuda", "cuda:0", "auto", "gpu.devices"])
def test_daemon_starts_and_lands_a_job(tmp_path, engine, gpu):
    d = gpu_daemon(tmp_path, engine, gpu, defaults={"size": 128, "steps": 10, "gif": {"every": 2}})
    d.start()
    try:
        d.drop("j", {"content": "tubingen.jpg", "style": "starry_night.jpg"})
        d.wait_landed("j", timeout=120)
    finally:
        assert d.stop() == 0
    r = report(d, "j")
    assert r["device"] == f"cuda:{torch.cuda.current_device()}"
    assert r["device_name"] == torch.cuda.get_device_name(0)
    assert r["precision"] == "fp32" and 0 < r["peak_memory_bytes"] < 4096 * MIB
    assert (d.outbox / "j" / "j.gif").is_file()


def test_budget_is_met_at_the_size_asked(tmp_path):
    """A 2048 px job whose plain pass needs far more than 2048 MiB lands at 2048 px, its stages
    taking memory techniques, and its real peak stays inside the budget."""
    from nstd.engine.memory import predict_peak_bytes

    assert predict_peak_bytes(1536, 2048, LAYERS, device="cuda") > 2048 * MIB
    r = land_one(gpu_daemon(tmp_path, gpu={"vram_budget_mb": 2048}, defaults={"size": 2048, "steps": 20, "gif": False}),
                 "big", timeout=300)
    assert r["size_used"] == [2048, 1536] and r["oom_retries"] == 0 and not r["cpu_fallback"]
    assert r["stages"][-1]["techniques"], r["stages"]
    assert r["peak_memory_bytes"] <= 2048 * MIB, r
    print(json.dumps(r["stages"], indent=1))


@pytest.mark.slow  # minutes; bench/gpu_check.sh measures the same job with bench/big_prints.py peak
@pytest.mark.timeout(1000)
def test_4096_px_lands_at_4096_inside_the_default_budget(tmp_path):
    """Issue #13's target: 4096 px in the default 4 GiB, at the size asked (the time is printed:
    the target is 2 minutes on an H100)."""
    r = land_one(Daemon(tmp_path, engine={"device": "cuda"}, defaults={"size": 4096, "gif": False}), "print", timeout=900)
    print(json.dumps({k: r[k] for k in ("timings", "peak_memory_bytes", "precision", "stages")}, indent=1))
    assert r["size_used"] == [4096, 3072] and r["peak_memory_bytes"] <= 4096 * MIB and r["oom_retries"] == 0


@pytest.mark.slow  # four 2048 px runs
@pytest.mark.parametrize("techniques", [
    {"checkpoint": True}, {"tile": 512}, {"tile": 512, "checkpoint": True}, {"history": 5, "tile": 256},
], ids=["checkpoint", "tile-512", "tile-512-checkpoint", "history-5-tile-256"])
def test_memory_model_covers_each_technique(gpu_engine, pair, techniques):
    from nstd.engine import StyleParams
    from nstd.engine.images import fit_long_edge
    from nstd.engine.memory import Techniques, predict_peak_bytes

    content, style = pair
    t = Techniques(**{"history": gpu_engine.lbfgs_history, **techniques})
    w, h = fit_long_edge(content.size, 2048)
    predicted = predict_peak_bytes(h, w, LAYERS, "lbfgs", t.history, "fp32", device="cuda", checkpoint=t.checkpoint,
                                   tile=t.tile, content_layers=["conv4_2"], jitter=StyleParams().jitter)
    gpu_engine.device.free_cache()
    params = StyleParams(size=2048, steps=t.history + 2, stages=1, frame_every=0)
    measured = gpu_engine.stylize(content, [(style, 1.0)], params, techniques=t).peak_memory_bytes
    print(f"2048 px {t}: predicted {predicted / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")
    assert predicted >= measured


@pytest.mark.parametrize("cpu_fallback", [True, False])
def test_real_out_of_memory_walks_the_ladder(tmp_path, cpu_fallback):
    """A budget below the network's own weights: every size runs out of memory for real."""
    d = gpu_daemon(tmp_path, gpu={"vram_budget_mb": 64, "cpu_fallback": cpu_fallback},
                   defaults={"size": 128, "steps": 2, "gif": False})
    d.start()
    try:
        d.drop("oom", {"content": "tubingen.jpg", "style": "starry_night.jpg"})
        if cpu_fallback:
            d.wait_landed("oom", timeout=300)
            r = report(d, "oom")
            assert r["cpu_fallback"] and r["device"] == "cpu" and r["oom_retries"] == 1
            assert r["size_used"][0] == 128  # the CPU runs the size asked
        else:
            d.wait_quarantined("oom", timeout=300)
            assert d.error("oom")["kind"] == "out of memory"
            assert "out of memory at 64 px on cuda:0" in d.error("oom")["message"]
        assert d.alive() and d.status()["state"] == "running"
        log = (d.outbox / "oom" / "job.log" if cpu_fallback else d.quarantine / "oom" / "job.log").read_text()
        # smaller first (the budget fit, down to the smallest edge), then the CPU or quarantine
        assert "size 128 lowered to 64 to fit gpu.vram_budget_mb=64" in log
        assert ("out of memory at 64 px; finishing on the CPU at 128 px" in log) == cpu_fallback
    finally:
        assert d.stop() == 0


def test_sigterm_mid_job_then_resume_from_the_checkpoint(tmp_path):
    d = gpu_daemon(tmp_path, defaults={"size": 384, "steps": 3000, "gif": {"every": 100}},
                   service={"shutdown_grace_seconds": 0, "checkpoint_every": 25})
    d.start()
    d.drop("long", {"content": "tubingen.jpg", "style": "starry_night.jpg"})
    d.wait(lambda: ((d.status() or {}).get("running") or {}).get("step", 0) >= 60, 120, "step 60")
    assert d.stop() == 0
    assert not d.landed("long")
    d.start()
    try:
        d.wait_landed("long", timeout=300)
    finally:
        d.stop()
    r = report(d, "long")
    assert r["resumed_from_step"] and r["resumed_from_step"] >= 60 and r["steps_run"] == 3000 - r["resumed_from_step"]
    assert r["device"].startswith("cuda") and r["attempts"] == 1
    with Image.open(d.outbox / "long" / "long.gif") as gif:
        assert gif.n_frames == 3000 // 100 + 1  # frames from before the stop were kept


def test_style_targets_are_cached_on_the_gpu(tmp_path):
    d = gpu_daemon(tmp_path, defaults={"size": 128, "steps": 5, "gif": False})
    d.start()
    try:
        for name, content in (("a", "tubingen.jpg"), ("b", "golden_gate.jpg")):
            d.image("starry_night.jpg")  # a's claim took it: the same file again, so the same digest
            d.image(content)
            d.drop(name, {"content": content, "style": "starry_night.jpg"}, images=False)
            d.wait_landed(name, timeout=120)
    finally:
        d.stop()
    assert report(d, "a")["style_cache"] == {"hits": 0, "misses": 1}
    assert report(d, "b")["style_cache"] == {"hits": 1, "misses": 1}
    assert report(d, "b")["timings"]["targets"] < report(d, "a")["timings"]["targets"]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability(0) < (8, 0),
                    reason="the GPU has no native bf16")
def test_bf16_on_a_gpu_that_has_it(tmp_path):
    d = gpu_daemon(tmp_path, engine={"precision": "bf16"}, defaults={"size": 256, "steps": 30, "gif": False})
    d.start()
    try:
        d.drop("half", {"content": "tubingen.jpg", "style": "starry_night.jpg"})
        d.wait_landed("half", timeout=120)
    finally:
        d.stop()
    r = report(d, "half")
    assert r["precision"] == "bf16" and all(v == v and v < 1e6 for v in r["losses"].values())


def test_stylize_on_cuda_with_a_gif(tmp_path, images_dir):
    out, gif = tmp_path / "o.png", tmp_path / "o.gif"
    proc = subprocess.run([sys.executable, "-m", "nstd.cli", "stylize", str(images_dir / "tubingen.jpg"),
                           str(images_dir / "starry_night.jpg"), "-o", str(out), "--size", "256", "--steps", "50",
                           "--device", "cuda", "--gif", str(gif), "-q"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    assert " on cuda:" in proc.stdout
    with Image.open(out) as img:
        assert max(img.size) == 256
    with Image.open(gif) as g:
        assert g.n_frames == 50 // 5 + 1


def test_torch_refuses_a_device_without_an_index():
    """What tests/fake_cuda.py imitates: the call that broke the first GPU run."""
    with pytest.raises((ValueError, RuntimeError), match="index"):
        torch.cuda.set_per_process_memory_fraction(1.0, torch.device("cuda"))


@pytest.fixture(scope="module")
def gpu_engine():
    from nstd.engine import Engine

    return Engine(device="cuda", precision="fp32")


@pytest.mark.parametrize("size", [128, 256, 512, 1024, 2048])
def test_memory_model_never_under_predicts(gpu_engine, pair, size):
    from nstd.engine import StyleParams
    from nstd.engine.images import fit_long_edge
    from nstd.engine.memory import predict_peak_bytes

    content, style = pair
    w, h = fit_long_edge(content.size, size)
    predicted = predict_peak_bytes(h, w, LAYERS, "lbfgs", gpu_engine.lbfgs_history, "fp32", device="cuda",
                                   jitter=StyleParams().jitter)
    gpu_engine.device.free_cache()
    # the L-BFGS history fills over `history` steps: run past it so the peak shows
    params = StyleParams(size=size, steps=gpu_engine.lbfgs_history + 2, stages=1, frame_every=0)
    measured = gpu_engine.stylize(content, [(style, 1.0)], params).peak_memory_bytes
    print(f"{size} px: predicted {predicted / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")
    assert predicted >= measured, (size, predicted / MIB, measured / MIB)


@pytest.mark.parametrize("style_loss", ["gram", "w2", "sliced"])
def test_a_masked_run_on_the_gpu_keeps_its_part_inside_the_predicted_peak(gpu_engine, pair, style_loss):
    """Two soft regions and a kept corner at 512 px: the kept corner is the content, and the memory
    model (which counts each masked region's copies and losses) is not under the measured peak."""
    import numpy as np

    from nstd.engine import StyleImage, StyleParams, images
    from nstd.engine.images import fit_long_edge
    from nstd.engine.memory import predict_peak_bytes

    content, style = pair
    w, h = content.size
    ramp = np.tile(np.clip(np.linspace(2, -1, w), 0, 1), (h, 1))
    left = Image.fromarray((ramp * 255).astype(np.uint8), "L").convert("RGB")
    right = Image.fromarray(((1 - ramp) * 255).astype(np.uint8), "L").convert("RGB")
    keep = Image.new("RGB", content.size)
    keep.paste((255, 255, 255), (0, 0, w // 4, h // 4))
    styles = [StyleImage(style, 1.0, mask=left), StyleImage(content, 1.0, mask=right)]
    rw, rh = fit_long_edge(content.size, 512)
    predicted = predict_peak_bytes(rh, rw, LAYERS, "lbfgs", gpu_engine.lbfgs_history, "fp32", device="cuda",
                                   style_loss=style_loss, regions=2, jitter=StyleParams().jitter)
    gpu_engine.device.free_cache()
    p = StyleParams(size=512, steps=gpu_engine.lbfgs_history + 2, stages=1, frame_every=0, style_loss=style_loss)
    result = gpu_engine.stylize(content, styles, p, keep=keep)
    measured = result.peak_memory_bytes
    print(f"{style_loss} masked: predicted {predicted / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB")
    assert predicted >= measured, (predicted / MIB, measured / MIB)
    out = np.asarray(result.image, dtype=np.float64)
    start = np.asarray(images.resize_long_edge(content, 512), dtype=np.float64)
    corner = (slice(0, rh // 4 - 2), slice(0, rw // 4 - 2))
    assert np.abs(out[corner] - start[corner]).max() <= 1
