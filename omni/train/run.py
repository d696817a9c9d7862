"""One run folder, one run: who may write it, what resuming it means, and stopping it cleanly.

- :func:`open_run` decides, under the folder's lock, whether a run resumes or starts: a folder
  that holds a run (checkpoints or an exported model) is never trained over silently. With
  ``train.resume=false`` it is refused unless ``train.overwrite=true``, which moves the old run
  aside; a resume whose recipe changed in a way that breaks exactness is refused unless
  ``train.resume_changed=true``, and every change is logged as a diff.
- :class:`StopSignals` turns SIGTERM / SIGINT (SLURM, Kubernetes, Ctrl-C) into a request to
  stop after the current step with a checkpoint; a second signal ends the process at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from omni.config import RecipeConfig
from omni.io import LOCK_FILE
from omni.train.checkpoint import LoadedCheckpoint, clean_partial, load_latest

log = logging.getLogger(__name__)

# Recipe keys a resumed run may change without changing the weights it ends with (beyond float
# rounding: the compiled, checkpointed or chunked computation is the same one): they only say
# when to log, evaluate and save, where the run lives, how to resume, and how the step computes.
SAFE_TO_CHANGE = {"description", "train.out_dir", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.progress",
                  "train.export", "train.best_metric", "train.eval_at_start", "train.resume",
                  "train.overwrite", "train.resume_changed",
                  "train.max_skipped_steps", "train.num_workers", "train.compile", "data.cache_dir",
                  "data.cache_workers", "train.activation_checkpointing", "train.loss_chunk"}


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run's work: checkpoints (even damaged ones) or an exported model.
    Logs and the recipe of a run killed before its first checkpoint do not count."""
    return any((out_dir / "checkpoints").glob("step_*")) or (out_dir / "model.safetensors").exists()


def move_aside(out_dir: Path) -> Path:
    """Move everything in ``out_dir`` (but its lock) into a new sibling ``<name>.old-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}")
    aside.mkdir()
    for entry in out_dir.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, aside / entry.name)
    return aside


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for each recipe key whose value differs. A key the old recipe lacks (it
    predates that option) counts as changed only if the new value is not the option's default."""
    defaults = _flatten(dataclasses.asdict(RecipeConfig()))
    old, new = _flatten(old), _flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing:
            a = defaults.get(key, missing)
        if a != b:
            changes.append((key, None if a is missing else a, None if b is missing else b))
    return changes


def check_resume(ck: LoadedCheckpoint, recipe: dict, world_size: int, allow_changes: bool) -> None:
    """Log how the recipe differs from the checkpoint's, and refuse changes that break exactness
    (another lr, batch size, tasks, model or number of processes) unless ``allow_changes``."""
    old = ck.meta.get("recipe")
    changes = recipe_changes(old, recipe) if isinstance(old, dict) else []
    saved_world = ck.meta.get("world_size", len(ck.rng))
    if saved_world != world_size:
        changes.append(("processes", saved_world, world_size))
    for key, a, b in changes:
        log.warning("recipe changed since %s: %s: %r -> %r", ck.path.name, key, a, b)
    breaking = [c for c in changes if c[0] not in SAFE_TO_CHANGE]
    if breaking and not allow_changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in breaking[:8])
        more = f" and {len(breaking) - 8} more" if len(breaking) > 8 else ""
        raise ValueError(f"{ck.path}: resuming with a changed recipe would not continue the same run "
                         f"({listed}{more}); set train.resume_changed=true to resume anyway, "
                         "train.overwrite=true to start a new run (the old one is moved aside), "
                         "or use another train.out_dir")


def open_run(out_dir: Path, tc, recipe: dict, world_size: int) -> tuple[Path | None, str]:
    """Decide what this run does with ``out_dir`` (hold its lock first): returns the checkpoint to
    resume from (or None) and the run id. Raises ValueError when the folder holds another run that
    the recipe does not say to resume or move aside."""
    ckpt_root = out_dir / "checkpoints"
    for p in clean_partial(ckpt_root):
        log.warning("removed %s, a checkpoint write that a killed run left unfinished", p)
    if tc.overwrite and holds_run(out_dir):
        aside = move_aside(out_dir)
        log.warning("train.overwrite=true: moved the previous run in %s to %s", out_dir, aside)
    elif holds_run(out_dir):
        ck = load_latest(ckpt_root) if tc.resume else None
        if ck is not None:
            check_resume(ck, recipe, world_size, tc.resume_changed)
            return ck.path, ck.state.run_id  # "" for checkpoints from before run ids: still this run
        why = ("train.resume=false" if not tc.resume
               else "it has no checkpoint to resume (only an exported model)")
        raise ValueError(f"{out_dir} already holds a run and {why}: resume it (train.resume=true), choose "
                         "another train.out_dir, or set train.overwrite=true to move the old run aside")
    return None, uuid.uuid4().hex


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`received` instead of killing the process, so the
    trainer can finish its step and save. A second signal restores the default action and re-sends
    itself: the process ends at once. Outside the main thread (no signal handlers there) it does
    nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            for s in self.SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once)",
                    self.received)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
