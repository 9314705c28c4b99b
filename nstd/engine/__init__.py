"""The stylization engine: network, losses, optimisation and images. Knows nothing of jobs or folders."""
from nstd.engine.images import ImageError, open_image
from nstd.engine.stylize import Engine, Result, StepInfo, StyleParams
from nstd.engine.vgg import WeightsError

__all__ = ["Engine", "ImageError", "Result", "StepInfo", "StyleParams", "WeightsError", "open_image"]
