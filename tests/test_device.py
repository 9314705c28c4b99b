"""Every CUDA path reached on the CPU: device settings resolve to indexed devices, and each
CUDA-only call gets an index, with CUDA faked (tests/fake_cuda.py) by fakes as strict as torch."""
import os
import subprocess
import sys

import pytest
import torch

import fake_cuda
from harness import Daemon
from nstd.engine.device import Device, DeviceError, resolve, resolve_all
from nstd.engine.memory import CUDA_RESERVE_BYTES, predict_peak_bytes

LAYERS = ["conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda(monkeypatch):
    return fake_cuda.install(monkeypatch)


def test_cpu_and_auto_without_cuda(no_cuda):
    assert resolve("cpu") == Device(torch.device("cpu"))
    assert str(resolve("auto")) == "cpu"


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_device_error(no_cuda, setting):
    with pytest.raises(DeviceError, match=f"device '{setting}': CUDA is not available .*use 'auto' or 'cpu'"):
        resolve(setting)


@pytest.mark.parametrize("setting", ["tpu", "cuda:x", "", "cuda:-1"])
def test_not_a_device(setting):
    with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
        resolve(setting)


@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "auto", torch.device("cuda")])
def test_cuda_always_gets_an_index(cuda, setting):
    dev = resolve(setting)
    assert dev.torch == torch.device("cuda", 0) and str(dev) == "cuda:0" and dev.is_cuda
    assert dev.place == torch.device("cpu")  # the fake's: tensors stay on the CPU


def test_cuda_is_the_current_device_and_indexes_are_checked(monkeypatch):
    fake = fake_cuda.install(monkeypatch, devices=2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert str(resolve("cuda")) == "cuda:1" and str(resolve("cuda:0")) == "cuda:0"
    with pytest.raises(DeviceError, match=r"has 2 GPU\(s\), cuda:0..cuda:1"):
        resolve("cuda:2")
    assert fake.devices == 2


def test_gpu_devices_may_not_name_one_gpu_twice(cuda):
    assert [str(d) for d in resolve_all(["cuda:0"])] == ["cuda:0"]
    assert resolve_all([]) == []
    with pytest.raises(DeviceError, match="names cuda:0 twice"):
        resolve_all(["cuda", "cuda:0"])


def test_every_cuda_only_call_gets_an_index(cuda):
    dev = resolve("cuda")
    assert dev.name == cuda.name and dev.total_memory == cuda.total_memory and dev.has_native_bf16()
    assert dev.cap_memory(4 * 2**30) == 0.25
    assert cuda.called("set_per_process_memory_fraction") == [(0.25, 0)]
    assert dev.cap_memory(10**15) == 1.0  # a budget above the card: no cap, not an error
    dev.reset_peak()
    assert dev.peak_bytes() == cuda.peak
    dev.free_cache()
    assert cuda.called("reset_peak_memory_stats") == [(0,)] and cuda.called("max_memory_allocated") == [(0,)]
    assert cuda.called("empty_cache") == [()]


def test_the_fake_is_as_strict_as_torch(cuda):
    """The bug of the first GPU run: torch.device('cuda') without an index is refused."""
    with pytest.raises(ValueError, match="with a specified index"):
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))


def test_cpu_device_makes_no_cuda_call(cuda):
    dev = resolve("cpu")
    assert dev.cap_memory(2**30) is None and dev.peak_bytes() is None and dev.total_memory is None
    dev.reset_peak()
    dev.free_cache()
    assert cuda.calls == []


def test_engine_on_cuda_reports_the_gpu_and_its_peak(cuda, pair):
    from nstd.engine import Engine, StyleParams

    engine = Engine(device="cuda", precision="fp32")
    assert str(engine.device) == "cuda:0"
    result = engine.stylize(pair[0], [(pair[1], 1.0)], StyleParams(size=32, steps=2, frame_every=0))
    assert result.device == "cuda:0" and result.device_name == cuda.name
    assert result.peak_memory_bytes == cuda.peak
    assert cuda.called("reset_peak_memory_stats") == [(0,)] and cuda.called("max_memory_allocated") == [(0,)]


def test_memory_model_reserves_for_cuda_workspaces():
    cpu = predict_peak_bytes(192, 256, LAYERS)
    assert predict_peak_bytes(192, 256, LAYERS, device="cuda") == cpu + CUDA_RESERVE_BYTES


@pytest.mark.parametrize("engine_cfg,gpu_cfg", [
    ({"device": "cuda"}, {}),
    ({"device": "cuda:0"}, {}),
    ({"device": "auto"}, {}),
    ({"device": "cpu"}, {"devices": ["cuda:0"]}),
])
def test_daemon_on_fake_cuda_lands_a_job(tmp_path, engine_cfg, gpu_cfg):
    d = Daemon(tmp_path, fake_cuda={"devices": 1, "total_memory": 16 * 2**30},
               engine={**engine_cfg, "precision": "fp32"}, gpu={"vram_budget_mb": 4096, **gpu_cfg})
    d.start()
    try:
        d.drop("gpujob", {"content": "hoovertowernight.jpg", "style": "starry_night.jpg"})
        d.wait_landed("gpujob")
    finally:
        assert d.stop() == 0
    import json

    report = json.loads((d.outbox / "gpujob" / "report.json").read_text())
    assert report["device"] == "cuda:0" and report["device_name"] == "Fake GPU 16GB"
    assert report["precision"] == "fp32" and report["peak_memory_bytes"] == 123 * 2**20
    assert d.cuda_calls("set_per_process_memory_fraction") == [[0.25, 0]]  # 4096 MiB of 16 GiB, on cuda:0
    assert [0] in d.cuda_calls("reset_peak_memory_stats") and [0] in d.cuda_calls("max_memory_allocated")
    assert d.cuda_calls("set_device") == [[0]]  # the worker thread made its GPU current
    assert "started (attempt 1) on cuda:0" in (d.outbox / "gpujob" / "job.log").read_text()


@pytest.mark.parametrize("section,value,message", [
    ("engine", {"device": "cuda"}, "device 'cuda': CUDA is not available"),
    ("gpu", {"devices": ["cuda:0"]}, "device 'cuda:0': CUDA is not available"),
])
def test_daemon_without_cuda_exits_2_with_one_line(tmp_path, section, value, message):
    d = Daemon(tmp_path, **{section: value})
    d.start(wait=False, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a machine that has one
    assert d.proc.wait(60) == 2
    out = d.logs()
    assert message in out and "Traceback" not in out
    assert f"nstd: error: {message}" in out


def test_daemon_refuses_one_gpu_named_twice(tmp_path):
    d = Daemon(tmp_path, fake_cuda={"devices": 1}, gpu={"devices": ["cuda", "cuda:0"]})
    d.start(wait=False)
    assert d.proc.wait(60) == 2
    assert "gpu.devices names cuda:0 twice" in d.logs() and "Traceback" not in d.logs()


def test_stylize_on_cuda_without_cuda_exits_2(tmp_path, images_dir):
    proc = subprocess.run([sys.executable, "-m", "nstd.cli", "stylize", str(images_dir / "tubingen.jpg"),
                           str(images_dir / "starry_night.jpg"), "-o", str(tmp_path / "o.png"), "--size", "32",
                           "--steps", "1", "--device", "cuda", "-q"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]] and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_stylize_on_fake_cuda_writes_result_and_gif(tmp_path, images_dir):
    env = {**os.environ, "NSTD_FAKE_CUDA": "{}"}
    proc = subprocess.run([sys.executable, str(fake_cuda.__file__), "stylize", str(images_dir / "tubingen.jpg"),
                           str(images_dir / "starry_night.jpg"), "-o", str(tmp_path / "o.png"), "--size", "32",
                           "--steps", "2", "--device", "cuda", "--gif", str(tmp_path / "o.gif"), "--gif-every", "1",
                           "-q"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "on cuda:0" in proc.stdout and (tmp_path / "o.png").is_file() and (tmp_path / "o.gif").is_file()


def test_auto_precision_is_bf16_on_a_gpu_with_native_bf16(monkeypatch):
    from nstd.engine.device import Device, pick_precision

    gpu = Device(torch.device("cuda:0"))
    for capability, expected in (((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        assert pick_precision("auto", gpu) == expected, capability
    assert pick_precision("fp32", gpu) == "fp32"  # an explicit setting always wins
