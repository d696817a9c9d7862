"""Decoding media files into tensors, with errors that name the file and the problem.

``Audio`` (``omni/media/audio.py``), ``Image`` (``image.py``) and ``Video`` (``video.py``)
decode lazily on first use. Every failure is a :class:`MediaError` (a ``ValueError``).
"""

from __future__ import annotations


class MediaError(ValueError):
    """A media file (or tensor) that cannot be used; the message names the file and the problem."""

    def __init__(self, source, problem: str):
        self.source, self.problem = str(source), problem
        super().__init__(f"{source}: {problem}")
