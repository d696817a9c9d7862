"""omni: one decoder-only transformer for interleaved text, images, audio and video."""

from omni.api import Chat, export, import_hf, load
from omni.media import Audio, Image, MediaError, Video
from omni.model.omni_model import OmniModel
from omni.pipeline import Pipeline
from omni.processor import Processor

__version__ = "0.1.0"
__all__ = ["Audio", "Chat", "Image", "MediaError", "OmniModel", "Pipeline", "Processor", "Video", "export",
           "import_hf", "load", "__version__"]
