"""CUDA faked on a CPU machine, so the CPU suite reaches every CUDA-only call.

`install()` makes torch report GPUs (availability, count, current device, name, properties,
capability) and replaces the CUDA-only calls nstd makes (allocator cap, peak reset, memory
statistics, empty_cache) with recording fakes. The fakes are stricter than torch: every call that
takes a device must get an index (an int or `cuda:N`), which is what torch's
`set_per_process_memory_fraction` demands and what broke `nstd run` on a real H100. Tensors of a
faked CUDA device are put on the CPU (`Device.place`), so the engine runs for real.

As a script it runs the `nstd` command with CUDA faked, for end-to-end tests of the daemon:

    NSTD_FAKE_CUDA='{"devices": 1}' NSTD_FAKE_CUDA_LOG=calls.jsonl python tests/fake_cuda.py run --config c.yaml

Every fake call is appended to NSTD_FAKE_CUDA_LOG as one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

GIB = 2**30


@dataclass
class FakeCuda:
    devices: int = 1
    total_memory: int = 16 * GIB
    name: str = "Fake GPU 16GB"
    capability: tuple[int, int] = (8, 0)
    peak: int = 123 * 2**20
    log_path: str | None = None
    calls: list[tuple[str, tuple]] = field(default_factory=list)

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.log_path:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps([name, [a if isinstance(a, (int, float, str)) else str(a) for a in args]]) + "\n")

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]

    def index(self, device: Any) -> int:
        """What torch's strict device-index parsing does, for every call (not only the cap's)."""
        if isinstance(device, int) and not isinstance(device, bool):
            i = device
        elif isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda" \
                and torch.device(device).index is not None:
            i = torch.device(device).index
        else:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        if not 0 <= i < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal {i}")
        return i

    def patches(self) -> dict[str, Callable]:
        def set_fraction(fraction: float, device: Any = None) -> None:
            i = self.index(device)
            if not 0 <= fraction <= 1:
                raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
            self.record("set_per_process_memory_fraction", fraction, i)

        def props(device: Any) -> SimpleNamespace:
            self.index(device)
            return SimpleNamespace(name=self.name, total_memory=self.total_memory,
                                   major=self.capability[0], minor=self.capability[1])

        def reset_peak(device: Any = None) -> None:
            self.record("reset_peak_memory_stats", self.index(device))

        def max_allocated(device: Any = None) -> int:
            self.record("max_memory_allocated", self.index(device))
            return self.peak

        def allocated(device: Any = None) -> int:
            self.record("memory_allocated", self.index(device))
            return self.peak // 2

        return {
            "is_available": lambda: True,
            "device_count": lambda: self.devices,
            "current_device": lambda: 0,
            "get_device_name": lambda device=None: (self.index(device), self.name)[1],
            "get_device_properties": props,
            "get_device_capability": lambda device=None: (self.index(device), self.capability)[1],
            "set_per_process_memory_fraction": set_fraction,
            "reset_peak_memory_stats": reset_peak,
            "max_memory_allocated": max_allocated,
            "memory_allocated": allocated,
            "empty_cache": lambda: self.record("empty_cache"),
            "set_device": lambda device: self.record("set_device", self.index(device)),
        }


def _place_on_cpu(post_init: Callable) -> Callable:
    def __post_init__(self) -> None:
        post_init(self)
        if self.torch.type == "cuda":
            object.__setattr__(self, "place", torch.device("cpu"))
    return __post_init__


def install(monkeypatch=None, **kwargs: Any) -> FakeCuda:
    """Fake CUDA in this process (through pytest's monkeypatch when given, so it is undone)."""
    from nstd.engine.device import Device

    fake = FakeCuda(**kwargs)
    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    for name, fn in fake.patches().items():
        setattr_(torch.cuda, name, fn)
    setattr_(Device, "__post_init__", _place_on_cpu(Device.__post_init__))
    return fake


def main() -> int:
    opts = json.loads(os.environ.get("NSTD_FAKE_CUDA") or "{}")
    if "capability" in opts:
        opts["capability"] = tuple(opts["capability"])
    install(log_path=os.environ.get("NSTD_FAKE_CUDA_LOG"), **opts)
    from nstd.cli import main as nstd_main

    return nstd_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
