"""Progress bars for the phases that would otherwise be silent for minutes (rendering and
codec-encoding a corpus before training, scoring a split), in the units the work is counted in
(rows, clips).

A bar is drawn on stderr when stderr is a terminal; in a log file or a pipe it would only be
noise, so it is off there unless forced with ``OMNI_PROGRESS=1`` (``OMNI_PROGRESS=0`` turns every
bar off). A caller's ``enabled``: True forces a bar, False turns it off, None decides as above.
"""

from __future__ import annotations

import os
import sys

ENV = "OMNI_PROGRESS"


def progress_enabled(enabled: bool | None = None, stream=None) -> bool:
    """Whether a bar is drawn: ``enabled`` when it is a bool, else ``$OMNI_PROGRESS`` when set, else
    whether ``stream`` (stderr) is a terminal."""
    if enabled is not None:
        return bool(enabled)
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool | None = None, **kwargs):
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand) on stderr, or a disabled one that
    only passes the items through (see :func:`progress_enabled`)."""
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("miniters", 1)  # the clock read every item: a slower stretch still redraws each 0.5 s
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not progress_enabled(enabled), **kwargs)
