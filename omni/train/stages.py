"""Training in stages: what trains (``train.trainable``), where the weights start
(``train.init_from``), and LoRA adapters (``train.lora``) that are merged back into plain weights
when the model is saved.

Patterns are shell-style globs over module names, matched at any depth: ``connector`` selects every
module called ``connector`` (``encoders.image.connector`` and all inside it), ``backbone.cross.*``
the cross-attention blocks, ``*.attn_gate`` a parameter by name. A pattern that selects nothing is
an error, as is a LoRA target that is not ``nn.Linear``, before any training step runs.

LLaVA's stages as two recipes::

    # stage 1: train.trainable: [connector]
    # stage 2: train.init_from: runs/llava_stage1, train.trainable: [connector, backbone, embed]

``init_from`` may list several runs, loaded in turn, a later run's tensors over an earlier's: BLIP-2's
stage 2 takes the image side from stage 1 and the language model from its own run
(``init_from: [runs/blip2_stage1_tiny, runs/text_tiny]``), as stage 1 trained a copy of the LM.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from omni.io import load_tensors
from omni.model.lora import add_lora

log = logging.getLogger(__name__)


def _selects(name: str, pattern: str) -> bool:
    """Whether ``pattern`` names this module / parameter or one of the modules around it."""
    return any(fnmatch.fnmatchcase(name, p)
               for p in (pattern, f"{pattern}.*", f"*.{pattern}", f"*.{pattern}.*"))


def select(names, patterns: list[str], what: str) -> set[str]:
    """The names any pattern selects; a pattern that selects none is an error naming it."""
    names = list(names)
    chosen = set()
    for pattern in patterns:
        hit = {n for n in names if _selects(n, pattern)}
        if not hit:
            top = sorted({n.rsplit(".", 1)[0] for n in names})
            raise ValueError(f"{what} pattern {pattern!r} matches nothing; module names look like: "
                             f"{', '.join(top[:8])}{' ...' if len(top) > 8 else ''}")
        chosen |= hit
    return chosen


def apply_stages(model, train_cfg) -> int:
    """Apply a recipe's stage settings (``omni.config.TrainConfig``) before the optimizer sees the
    model: start from ``init_from``, add LoRA adapters, restrict what trains to ``trainable``
    (with LoRA: the adapters and those). Returns the trainable parameter count."""
    sources = train_cfg.init_from
    for source in [sources] if isinstance(sources, str) else sources or []:
        init_from(model, source)
    if train_cfg.lora is not None:
        add_lora(model, train_cfg.lora)
    if train_cfg.trainable is not None:
        params = dict(model.named_parameters())
        keep = select(params, train_cfg.trainable, "train.trainable")
        for name, p in params.items():
            p.requires_grad_(name in keep or (train_cfg.lora is not None and "lora_" in name))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_from(model, path: str | Path) -> dict:
    """Start from another run's weights: every tensor of ``path/model.safetensors`` whose name the
    model has is loaded (names the model lacks are reported, not loaded: a stage may drop heads);
    a tensor whose shape differs is an error naming it. New modules keep their initialisation."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise ValueError(f"train.init_from: {f} not found "
                         "(point it at a run directory written by omni train)")
    tensors = load_tensors(f)
    own = model.export_state_dict(merge_lora=False)
    for name, t in tensors.items():
        if name in own and own[name].shape != t.shape:
            raise ValueError(f"train.init_from {path}: tensor {name} has shape {tuple(t.shape)} "
                             f"but this model's is {tuple(own[name].shape)} (a different size or vocabulary)")
    loaded = sorted(set(tensors) & set(own))
    if not loaded:
        raise ValueError(f"train.init_from {path}: none of its tensors belong to this model")
    model.load_state_dict({k: tensors[k] for k in loaded}, strict=False)
    report = {"loaded": len(loaded), "new": len(set(own) - set(tensors)),
              "unused": len(set(tensors) - set(own))}
    log.info("init_from %s: %d tensors loaded, %d new in this model, %d of its tensors unused", path,
             report["loaded"], report["new"], report["unused"])
    return report
