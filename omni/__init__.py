"""omni: one decoder-only transformer for interleaved text, images, audio and video."""

from omni.api import import_hf, load
from omni.model.omni_model import OmniModel

__version__ = "0.1.0"
__all__ = ["OmniModel", "import_hf", "load", "__version__"]
