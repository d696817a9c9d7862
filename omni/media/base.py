"""What every decoder shares: the error a bad file raises, and which suffix is which medium."""

from __future__ import annotations

from pathlib import Path


class MediaError(ValueError):
    """A media file (or tensor) that cannot be used; the message names the file and the problem."""

    def __init__(self, source, problem: str):
        self.source, self.problem = str(source), problem
        super().__init__(f"{source}: {problem}")


# What reading and preparing one media file can raise: MediaError and other ValueErrors, a decoder's
# RuntimeError or OSError, a MemoryError from a file too large. Code that handles many files (a
# dataset build, a batch transcription) counts these against the one file instead of ending the run.
BAD_FILE_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def modality_of_path(path) -> str | None:
    """``audio`` / ``image`` / ``video`` by the file suffix; None for anything else."""
    suffix = Path(str(path)).suffix.lower()
    for modality, suffixes in (("audio", AUDIO_SUFFIXES), ("image", IMAGE_SUFFIXES),
                               ("video", VIDEO_SUFFIXES)):
        if suffix in suffixes:
            return modality
    return None
