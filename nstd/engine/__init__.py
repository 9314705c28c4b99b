"""The stylization engine: network, losses, optimisation and images. Knows nothing of jobs or folders."""
from nstd.engine.images import ImageError, open_image
from nstd.engine.stylize import Checkpoint, Engine, Interrupted, Result, StepInfo, StyleParams
from nstd.engine.vgg import WeightsError

__all__ = ["Checkpoint", "Engine", "Interrupted", "ImageError", "Result", "StepInfo", "StyleParams", "WeightsError", "open_image"]
