"""omni: one decoder-only transformer for interleaved text, images, audio and video."""

from omni.api import Chat, import_hf, load
from omni.media import MediaError
from omni.media.audio import Audio
from omni.media.image import Image
from omni.media.video import Video
from omni.model.omni_model import OmniModel

__version__ = "0.1.0"
__all__ = ["Audio", "Chat", "Image", "MediaError", "OmniModel", "Video", "import_hf", "load", "__version__"]
