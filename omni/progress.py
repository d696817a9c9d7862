"""Progress for every step that can take more than ~10 s (building a corpus, training a tokenizer,
rendering and codec-encoding a task, scoring a split), counted in the work's own units (files,
utterances, clips, rows, audio seconds) with a rate and an ETA.

Where it goes (``enabled=None``, every long step's default):

- stderr is a terminal: a tqdm bar on stderr;
- it is not (a log file, a pipe, CI): one ``logging`` line (logger ``omni.progress``, INFO) when
  the step starts, at every ~10% of it once it has run :data:`LOG_AFTER_S` seconds (a short step
  logs its start and end only), and when it ends: ``rendering data/video: 40% 16/40 stamp
  [00:12<00:18, 1.30 stamp/s]``. Without a known total a line comes every :data:`LOG_EVERY_S`
  seconds instead.

``OMNI_PROGRESS=1`` forces the bar, ``OMNI_PROGRESS=0`` turns everything off. A caller's
``enabled``: True forces a bar, False turns progress off (a library call inside a bigger step),
None decides as above.

:func:`ticking` covers a step that reports nothing itself (SentencePiece training): the elapsed
seconds against an estimate.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading

ENV = "OMNI_PROGRESS"
LOG_EVERY_PERCENT = 10
LOG_EVERY_S = 30.0  # a step without a known total logs this often
LOG_AFTER_S = 5.0  # a step's lines between its first and last wait until it has run this long
LOG_FORMAT = ("{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} {unit} "
              "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"

log = logging.getLogger(__name__)


def _env() -> bool | None:
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return None


def progress_enabled(enabled: bool | None = None, stream=None) -> bool:
    """Whether a bar is drawn: ``enabled`` when it is a bool, else ``$OMNI_PROGRESS`` when set, else
    whether ``stream`` (stderr) is a terminal."""
    if enabled is not None:
        return bool(enabled)
    env = _env()
    if env is not None:
        return env
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_mode(enabled: bool | None = None, stream=None) -> str:
    """``"bar"``, ``"log"`` (no terminal: a line every ~10%) or ``"off"``."""
    if progress_enabled(enabled, stream):
        return "bar"
    return "off" if enabled is False or _env() is False else "log"


def progress(iterable=None, *, total: int | float | None = None, desc: str = "", unit: str = "it",
             enabled: bool | None = None, **kwargs):
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand): drawn on stderr, logged every
    ~10%, or silent (see :func:`progress_mode`); it passes the items through either way."""
    from tqdm import tqdm

    mode = progress_mode(enabled)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("miniters", 1)  # the clock read every item: a slower stretch still redraws each 0.5 s
    if mode == "log":
        return _logged_bar()(iterable, total=total, desc=desc, unit=unit, file=_NULL, **kwargs)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=mode == "off", **kwargs)


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


_NULL = _Null()


@functools.lru_cache(maxsize=1)
def _logged_bar():
    """tqdm that logs instead of drawing (built on first use: tqdm is imported lazily)."""
    from tqdm import tqdm

    class LoggedBar(tqdm):
        def __init__(self, *args, **kwargs):
            self._next_percent, self._last_log, self._logged_n, self._total = 0.0, None, None, None
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            d = self.format_dict
            n, total, now = d["n"], d["total"], self._time()
            closing = self.disable  # close() marks the bar disabled, then displays it once more
            if self._last_log is None or total != self._total:
                due = True  # the start, or a new total (an estimate extended): log at once
                self._total = total
            elif now - self.start_t < LOG_AFTER_S:
                due = False
            elif total:
                due = 100 * n / total >= self._next_percent
            else:
                due = now - self._last_log >= LOG_EVERY_S
            if not (due or closing) or (closing and n == self._logged_n):
                return True
            fmt = self.bar_format or (LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL)
            log.info("%s", self.format_meter(**{**d, "bar_format": fmt}))
            if total:
                pct = 100 * n / total
                self._next_percent = (pct // LOG_EVERY_PERCENT + 1) * LOG_EVERY_PERCENT
            self._last_log, self._logged_n = now, n
            return True

    return LoggedBar


@contextlib.contextmanager
def ticking(desc: str, estimate_s: float | None = None, enabled: bool | None = None, tick_s: float = 1.0):
    """A bar in seconds for a step that reports nothing while it runs (a C++ trainer): the elapsed
    time against ``estimate_s`` (the ETA is the estimate's; a step that runs past it extends the
    estimate by half, so the bar keeps moving and stops short of 100% until the step ends), or,
    without an estimate, the elapsed time alone."""
    total = round(estimate_s) if estimate_s else None
    fmt = "{desc}: {percentage:.0f}% [{elapsed}<{remaining}, estimated]" if total else "{desc}: {elapsed}"
    bar = progress(total=total, desc=desc, unit="s", enabled=enabled, bar_format=fmt)
    done = threading.Event()

    def tick():
        while not done.wait(tick_s):
            if bar.total and bar.n + 1 >= bar.total:  # past the estimate: half as long again
                bar.total = round(1.5 * bar.total)
            bar.update(1)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        done.set()
        thread.join()
        if total is not None:  # done: 100%, however the estimate fared
            bar.total = bar.n = max(bar.n, 1)
            bar.refresh()
        bar.close()
