"""Training checkpoints: safetensors + JSON, written atomically, enough for an exact resume.

Layout under ``<out_dir>/checkpoints/``::

    step_00000200/  model.safetensors  optimizer.safetensors  trainer_state.json
    latest          (a text file naming the newest complete step_* folder)

A checkpoint folder is written under a temporary name and renamed when complete, and
``latest`` is replaced atomically afterwards, so a run killed at any moment leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.io import atomic_write_bytes, atomic_write_json, load_tensors, replace_dir, save_tensors, temp_dir

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    cursor: int = 0  # training rows consumed (data position)
    tokens: int = 0  # tokens seen
    best_val_loss: float | None = None
    train_seconds: float = 0.0  # wall clock spent in training steps (train.max_minutes counts it)


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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(ckpt_root: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    state: TrainState, extra: dict, keep: int) -> Path:
    """Write ``step_<N>`` atomically, point ``latest`` at it, and prune all but the newest ``keep``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{state.step:08d}"
    tmp = temp_dir(ckpt_root, f".{final.name}.tmp")
    try:
        save_tensors(tmp / "model.safetensors", model_state)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        rng_tensors, rng_meta = _rng_state()
        save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **{f"rng.{k}": v for k, v in rng_tensors.items()}})
        atomic_write_json(tmp / "trainer_state.json", {
            "state": state.__dict__, "optimizer": opt_meta, "rng": rng_meta, **extra})
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(ckpt_root / LATEST, final.name.encode())
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None. A ``step_*`` folder exists only once complete (it is
    renamed into place), so scanning is exact; ``latest`` is a convenience for people and tools."""
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / "trainer_state.json").is_file())
    return complete[-1] if complete else None


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    state: TrainState
    meta: dict
    rng_tensors: dict[str, torch.Tensor]

    def restore_rng(self) -> None:
        _set_rng_state(self.rng_tensors, self.meta.get("rng", {}))


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    meta_file = path / "trainer_state.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_file}: unreadable trainer state ({e})") from None
    model_state = load_tensors(path / "model.safetensors")
    opt = load_tensors(path / "optimizer.safetensors")
    rng = {k[4:]: v for k, v in opt.items() if k.startswith("rng.")}
    opt = {k: v for k, v in opt.items() if not k.startswith("rng.")}
    return LoadedCheckpoint(path, model_state, _unflatten_optimizer(opt, meta["optimizer"]),
                            TrainState(**meta["state"]), meta, rng)
