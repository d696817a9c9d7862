"""Training checkpoints: safetensors + JSON, written atomically, enough for an exact resume.

Layout under ``<out_dir>/checkpoints/``::

    step_00000200/  model.safetensors  optimizer.safetensors  trainer_state.json
    latest          (a text file naming the newest complete step_* folder)

A sharded run's (``train.parallel: fsdp``) holds ``sharded/`` instead of ``model.safetensors``: the
model and optimizer state as a ``torch.distributed.checkpoint`` folder, each process's shards in
a file of its own (``omni.train.parallel``), and ``optimizer.safetensors`` only the RNG states.

A checkpoint folder is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically afterwards, so a run killed at any moment leaves the
previous checkpoint intact. ``trainer_state.json`` names the run (``state.run_id``): pruning
only ever removes the current run's older checkpoints. A checkpoint holds every process's RNG
states (``rng.<rank>.*``), so a resumed DDP run draws the same numbers on every rank, and the
fp16 grad scaler's state when there is one. Non-finite weights or optimizer state are never
written.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from omni.io import atomic_dir, atomic_write_bytes, atomic_write_json, load_tensors, save_tensors
from omni.train.parallel import check_shards, load_full_model

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (a skipped update counts: its data was consumed)
    cursor: int = 0  # training rows consumed (data position)
    tokens: int = 0  # tokens seen
    best: dict | None = None  # train.best_metric at its best so far: {metric, value, step}
    train_seconds: float = 0.0  # wall clock spent in training steps (train.max_minutes counts it)
    run_id: str = ""  # which run wrote this checkpoint (a folder holds one run; "" before run ids)
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient


class NonFiniteError(ValueError):
    """Weights or optimizer state hold NaN/inf: such a checkpoint would only poison a resume."""


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """This process's RNG states (torch CPU, every CUDA device, Python, NumPy), picklable, so the
    main process can gather every rank's before it writes a checkpoint."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if st.get("python"):
        py = st["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if st.get("numpy"):
        kind, keys, pos, has_gauss, gauss = st["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _rng_to_files(states: list[dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every rank's RNG states as safetensors entries (``rng.<rank>.torch`` ...) plus JSON."""
    tensors, meta = {}, {}
    for rank, st in enumerate(states):
        tensors[f"rng.{rank}.torch"] = st["torch"]
        for i, s in enumerate(st["cuda"]):
            tensors[f"rng.{rank}.cuda.{i}"] = s
        kind, keys, pos, has_gauss, gauss = st["numpy"]
        tensors[f"rng.{rank}.numpy"] = keys
        meta[str(rank)] = {"python": st["python"], "numpy": [kind, pos, has_gauss, gauss]}
    return tensors, {"ranks": meta}


def _rng_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> list[dict]:
    if "ranks" not in meta:  # checkpoints from before per-rank states: rank 0's torch/cuda/python only
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        return [{"torch": tensors["rng.torch"], "cuda": cuda, "python": meta.get("python")}]
    states = []
    for rank in range(len(meta["ranks"])):
        m = meta["ranks"][str(rank)]
        prefix = f"rng.{rank}.cuda."
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith(prefix)),
                                           key=lambda k: int(k[len(prefix):]))]
        kind, pos, has_gauss, gauss = m["numpy"]
        states.append({"torch": tensors[f"rng.{rank}.torch"], "cuda": cuda, "python": m["python"],
                       "numpy": [kind, tensors[f"rng.{rank}.numpy"], pos, has_gauss, gauss]})
    return states


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(ckpt_root: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    state: TrainState, extra: dict, keep: int, rng: list[dict] | None = None,
                    scaler: dict | None = None, shards: Path | None = None) -> Path:
    """Write ``step_<N>`` atomically, point ``latest`` at it, and prune all but the newest ``keep``
    of this run's checkpoints. ``rng``: every rank's :func:`rng_state` (default: this process's).
    ``shards``: a folder the processes wrote the sharded model and optimizer state into
    (``omni.train.parallel.save_shards``, checked for NaN/inf there), moved in as ``sharded/`` in
    place of ``model_state`` and ``optimizer_state`` (then empty).
    Raises :class:`NonFiniteError` (writing nothing) when weights or optimizer state hold NaN/inf."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    bad = non_finite(model_state) + non_finite(opt_tensors)
    if bad:
        raise NonFiniteError(f"{len(bad)} tensors hold NaN/inf (first: {bad[0]}); "
                             f"checkpoint of step {state.step} not written")
    final = ckpt_root / f"step_{state.step:08d}"
    with atomic_dir(final) as tmp:  # a step_* folder exists only once complete
        if shards is not None:
            shards.replace(tmp / SHARDED_DIR)
        else:
            save_tensors(tmp / "model.safetensors", model_state)
        rng_tensors, rng_meta = _rng_to_files(rng or [rng_state()])
        save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **rng_tensors})
        atomic_write_json(tmp / STATE_FILE, {"state": state.__dict__, "optimizer": opt_meta, "rng": rng_meta,
                                             "scaler": scaler, "sharded": shards is not None, **extra})
    atomic_write_bytes(ckpt_root / LATEST, final.name.encode())
    mine = [p for p in _complete(ckpt_root) if _run_id(p) == state.run_id]
    for old in mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(ckpt_root: Path) -> list[Path]:
    """Complete ``step_*`` folders, oldest first. A folder exists under that name only once
    complete (it is renamed into place), so scanning is exact; ``latest`` is for people and tools."""
    return sorted(p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file())


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["state"].get("run_id", "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: not this run's, so never pruned as if it were


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None (not checked further: see :func:`load_latest`)."""
    complete = _complete(ckpt_root)
    return complete[-1] if complete else None


def clean_partial(ckpt_root: Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writes that a killed run left behind. Call it only
    while holding the run's lock: a live writer's temp folder looks the same."""
    partial = [p for p in ckpt_root.glob(".step_*") if p.is_dir()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    state: TrainState
    meta: dict
    rng: list[dict]  # per rank

    @property
    def sharded(self) -> Path | None:
        """The ``torch.distributed.checkpoint`` folder of a sharded run's checkpoint, else None
        (its ``model_state`` and ``optimizer_state`` are then empty)."""
        return self.path / SHARDED_DIR if self.meta.get("sharded") else None

    def restore_rng(self, rank: int = 0) -> None:
        set_rng_state(self.rng[rank])

    def load_model(self, model) -> None:
        """This checkpoint's weights into ``model`` (built as the run built it: LoRA adapters
        apart), sharded or not."""
        if self.sharded:
            load_full_model(self.sharded, model)
        else:
            model.load_weights(self.model_state, str(self.path / "model.safetensors"))


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint folder; anything missing, truncated or of the wrong shape is a ValueError
    that names the file."""
    meta_file = path / STATE_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_file}: unreadable trainer state ({e})") from None
    try:
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise ValueError("no 'state' object")
        saved = dict(meta["state"])
        if "best_val_loss" in saved:  # written before train.best_metric: the best was always val_loss's
            value = saved.pop("best_val_loss")
            saved.setdefault("best", None if value is None else {"metric": "val_loss", "value": value})
        known = {f.name for f in fields(TrainState)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"unknown state keys {unknown}")
        state = TrainState(**saved)
        if not isinstance(state.step, int) or not isinstance(state.cursor, int):
            raise ValueError("state.step and state.cursor must be integers")
        if (not isinstance(meta.get("optimizer"), dict)
                or not isinstance(meta["optimizer"].get("param_groups"), list)):
            raise ValueError("no 'optimizer.param_groups' list")
    except ValueError as e:
        raise ValueError(f"{meta_file}: not a trainer state ({e})") from None
    sharded = meta.get("sharded") is True
    if sharded and not (path / SHARDED_DIR / ".metadata").is_file():
        raise ValueError(f"{path / SHARDED_DIR}: the sharded model and optimizer state are missing")
    if sharded:
        check_shards(path / SHARDED_DIR)
    model_state = {} if sharded else load_tensors(path / "model.safetensors")
    opt = load_tensors(path / "optimizer.safetensors")
    rng_tensors = {k: v for k, v in opt.items() if k.startswith("rng.")}
    opt = {k: v for k, v in opt.items() if not k.startswith("rng.")}
    try:
        optimizer_state = _unflatten_optimizer(opt, meta["optimizer"])
        rng = _rng_from_files(rng_tensors, meta.get("rng") or {})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path / 'optimizer.safetensors'}: optimizer or RNG state does not match "
                         f"{meta_file} ({type(e).__name__}: {e})") from None
    return LoadedCheckpoint(path, model_state, optimizer_state, state, meta, rng)


def load_latest(ckpt_root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that loads, or None when there is none. A damaged newer one (a
    truncated file, a trainer state of the wrong shape) is skipped with a warning naming it; when
    every checkpoint is damaged the ValueError lists them, since starting over would discard them."""
    problems = []
    for path in reversed(_complete(ckpt_root)):
        try:
            ck = load_checkpoint(path)
        except ValueError as e:
            log.warning("skipping damaged checkpoint: %s", e)
            problems.append(str(e))
            continue
        if problems:
            log.warning("resuming from %s, the newest checkpoint that loads", path)
        return ck
    if problems:
        raise ValueError(f"{ckpt_root}: no checkpoint loads ({'; '.join(problems)}); "
                         "move the folder aside or set train.overwrite=true to start a new run "
                         "(the old one is kept beside it)")
    return None
