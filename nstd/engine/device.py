"""One home for the device: a setting becomes an indexed `torch.device`, and every CUDA-only call.

Why: torch accepts `cuda` (no index) in most places, but not in all of them
(`set_per_process_memory_fraction` refuses it), so an unindexed device that works in one call
breaks the next. `resolve()` always gives `cuda:<n>`; the engine, the worker, cache keys, reports
and `gpu.devices` all go through it. Every call that exists only on CUDA (the allocator cap,
memory statistics, the cache) lives on `Device`, so the CPU suite can reach each of them with
CUDA faked (tests/fake_cuda.py).
"""
from __future__ import annotations

import platform
from pathlib import Path
from dataclasses import dataclass, field
from typing import Sequence

import torch

from nstd.errors import NstdError


class DeviceError(NstdError, ValueError):
    """A device setting this machine cannot honour: a start-up error (exit 2), never a traceback."""


@dataclass(frozen=True)
class Device:
    """A resolved device. `torch` is what reports and cache keys name (`cuda:0`, `cpu`).

    `place` is where tensors are put: the same device, except in the CPU suite's fake CUDA, which
    puts them on the CPU while every CUDA call still goes to `torch.cuda` (faked there).
    """

    torch: torch.device
    place: torch.device = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.place is None:
            object.__setattr__(self, "place", self.torch)

    @property
    def type(self) -> str:
        return self.torch.type

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    @property
    def index(self) -> int | None:
        return self.torch.index

    def __str__(self) -> str:
        return str(self.torch)

    # ------------------------------------------------------------------ what it is

    @property
    def name(self) -> str:
        """The GPU's name (`NVIDIA H100 80GB HBM3`), or the CPU's, for reports."""
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch.index)
        return platform.processor() or platform.machine() or "cpu"

    @property
    def total_memory(self) -> int | None:
        """The GPU's memory in bytes; None on the CPU."""
        if self.is_cuda:
            return int(torch.cuda.get_device_properties(self.torch.index).total_memory)
        return None

    def has_native_bf16(self) -> bool:
        """Compute capability 8.0 and up computes bf16 natively (A100, H100, RTX 30xx and later)."""
        if self.is_cuda:
            return torch.cuda.get_device_capability(self.torch.index) >= (8, 0)
        return False

    # ------------------------------------------------------------------ CUDA-only calls

    def cap_memory(self, budget_bytes: int) -> float | None:
        """Cap the caching allocator at `budget_bytes` (the job's budget); returns the fraction set."""
        if not self.is_cuda:
            return None
        total = self.total_memory or 1
        fraction = min(1.0, budget_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.torch.index)
        return fraction

    def allow_tf32(self) -> None:
        """TF32 matrix and convolution maths on CUDA (fp32 storage, ~3x the speed on Ampere and up)."""
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def make_current(self) -> None:
        """Make this GPU the calling thread's current device (a worker thread's allocations go
        to its own GPU, not to cuda:0)."""
        if self.is_cuda:
            torch.cuda.set_device(self.torch.index)

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch.index)

    def peak_bytes(self) -> int | None:
        """The allocator's peak since `reset_peak()`; None on the CPU (reports use peak RSS there)."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.torch.index))
        return None

    def allocated_bytes(self) -> int | None:
        """What the allocator holds now (the status page's "memory in use"); None on the CPU."""
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.torch.index))
        return None

    def free_cache(self) -> None:
        """Hand cached blocks back after an out-of-memory error, so the retry starts clean."""
        if self.is_cuda:
            torch.cuda.empty_cache()


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _no_cuda(setting: str) -> DeviceError:
    built = torch.version.cuda
    why = (f"this torch {torch.__version__} has CUDA {built} but sees no GPU" if built
           else f"this torch {torch.__version__} is built without CUDA")
    return DeviceError(f"device {setting!r}: CUDA is not available ({why}); use 'auto' or 'cpu'")


def resolve(setting: str | torch.device | Device = "auto") -> Device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a Device, CUDA always with an index.

    `auto` is the current CUDA device when one is visible, else the CPU. Raises DeviceError for
    CUDA where there is none, an index past the last GPU, or a setting that is not a device.
    """
    if isinstance(setting, Device):
        return setting
    text = str(setting).strip()
    if text == "auto":
        text = "cuda" if cuda_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return Device(torch.device("cpu"))
    if dev.type != "cuda":
        raise DeviceError(f"device {text!r}: expected auto, cpu, cuda or cuda:N")
    if not cuda_available():
        raise _no_cuda(text)
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise DeviceError(f"device {text!r}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return Device(torch.device("cuda", index))


def resolve_all(settings: Sequence[str]) -> list[Device]:
    """`gpu.devices`: each resolved; one device named twice (`cuda` and `cuda:0`) is an error,
    since two workers on one GPU would break "one job per GPU at a time"."""
    devices = [resolve(s) for s in settings]
    seen: dict[str, str] = {}
    for s, d in zip(settings, devices):
        if str(d) in seen:
            raise DeviceError(f"gpu.devices names {d} twice ({seen[str(d)]!r} and {s!r}): one worker per device")
        seen[str(d)] = s
    return devices


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def pick_precision(precision: str, device: Device) -> str:
    """`auto` picks bf16 for the VGG pass only where it is known to pay off: a GPU that computes it
    natively (compute capability 8.0 and up: the same final losses within 1 % at 512 to 2048 px,
    measured on an H100), or a CPU with AMX. Gram matrices, losses and the optimiser's state stay
    fp32."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (expected auto, fp32 or bf16)")
    if device.is_cuda and device.has_native_bf16():
        return "bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


#: Besides "out of memory": what cuDNN and cuBLAS say when an allocation fails under a tight cap.
OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "unable to find an engine to execute this computation")


def is_oom(exc: BaseException) -> bool:
    """Did `exc` come from running out of memory (the device's or the host's)?"""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in OOM_MESSAGES)
