"""Decoding media files into tensors, with errors that name the file and the problem.

``Audio`` (``omni/media/audio.py``), ``Image`` (``image.py``) and ``Video`` (``video.py``)
decode lazily on first use. Every failure is a :class:`MediaError` (a ``ValueError``).
"""

from __future__ import annotations

from omni.media.audio import Audio
from omni.media.base import (
    AUDIO_SUFFIXES,
    BAD_FILE_ERRORS,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    MediaError,
    modality_of_path,
)
from omni.media.image import Image
from omni.media.video import Video

__all__ = ["AUDIO_SUFFIXES", "BAD_FILE_ERRORS", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "Audio", "Image",
           "MediaError", "Video", "modality_of_path", "open_media"]


def open_media(path):
    """A media file -> ``Audio`` / ``Image`` / ``Video`` (decoded lazily), chosen by suffix."""
    modality = modality_of_path(path)
    if modality is None:
        raise MediaError(path, "not a media file suffix; expected one of "
                               f"{', '.join(AUDIO_SUFFIXES + IMAGE_SUFFIXES + VIDEO_SUFFIXES)}")
    return {"audio": Audio, "image": Image, "video": Video}[modality](path)
