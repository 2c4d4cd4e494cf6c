"""sam3fast: a performance-first inference engine for Meta's SAM 3.

Drop-in: ``from sam3fast import build_sam3_image_model, Sam3Processor`` replaces the official
imports. Native: ``build_image_model`` and ``ImagePredictor`` (batched images and prompts, bf16).
"""

from .build import build_image_model, build_sam3_image_model
from .checkpoint import CheckpointError
from .config import PRESETS, Sam3Config, get_config
from .predictor.image import ImagePredictor, Sam3Processor
from .video import build_sam3_video_model, build_sam3_video_predictor, build_video_model

__all__ = [
    "build_sam3_image_model",
    "build_image_model",
    "Sam3Processor",
    "ImagePredictor",
    "Sam3Config",
    "PRESETS",
    "get_config",
    "CheckpointError",
    "build_sam3_video_model",
    "build_sam3_video_predictor",
    "build_video_model",
]
__version__ = "0.1.0"
