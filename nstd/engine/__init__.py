"""The stylization engine: network, losses, optimisation and images. Knows nothing of jobs or folders."""
from nstd.engine.device import Device, DeviceError
from nstd.engine.images import ImageError, open_image
from nstd.engine.stylize import Checkpoint, Engine, Interrupted, Progress, Result, StepInfo, StyleParams
from nstd.engine.targets import StyleImage, TargetCache
from nstd.engine.vgg import WeightsError

__all__ = ["Checkpoint", "Device", "DeviceError", "Engine", "Interrupted", "ImageError", "Progress", "Result",
           "StepInfo", "StyleImage", "StyleParams", "TargetCache", "WeightsError", "open_image"]
