"""The stylization engine: network, losses, optimisation and images. Knows nothing of jobs or folders.

The names below load on first use (PEP 562), so `nstd status` and `nstd validate --help` never pay
for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Device": "device", "DeviceError": "device", "ImageError": "images", "open_image": "images",
    "Checkpoint": "progress", "Engine": "stylize", "Interrupted": "progress", "Progress": "progress",
    "Result": "params", "StepInfo": "progress", "StyleParams": "params",
    "StyleImage": "targets", "TargetCache": "targets", "WeightsError": "vgg",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'nstd.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nstd.engine.{_HOMES[name]}"), name)
