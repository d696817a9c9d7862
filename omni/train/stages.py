"""Training in stages: what trains (``train.trainable``), where the weights start
(``train.init_from``), and LoRA adapters (``train.lora``) that are merged back into plain weights
when the model is saved.

Patterns are shell-style globs over module names, matched at any depth: ``connector`` selects every
module called ``connector`` (``encoders.image.connector`` and all inside it), ``backbone.cross.*``
the cross-attention blocks, ``*.attn_gate`` a parameter by name. A pattern that selects nothing is
an error, as is a LoRA target that is not ``nn.Linear``, before any training step runs.

``embed.audio_codes`` in ``train.trainable`` trains the rows of the embedding (and of the head tied
to it) that belong to the codec's code ids, and no other row: a pretrained language model that
learns to read and write audio codes (``any2any/small``) keeps its text embeddings while the code
ids it gained train. Those rows take no weight decay.

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

import torch

from omni.io import load_tensors
from omni.model.hf_import import with_appended_rows
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


CODE_ROWS = "embed.audio_codes"  # a train.trainable entry: the code ids' embedding rows only


def apply_stages(model, train_cfg) -> int:
    """Apply a recipe's stage settings (``omni.config.TrainConfig``) before the optimizer sees the
    model: start from ``init_from``, add LoRA adapters, restrict what trains to ``trainable``
    (with LoRA: the adapters and those). Returns the trainable parameter count (the code rows
    counted, not the whole embedding they live in)."""
    sources = train_cfg.init_from
    for source in [sources] if isinstance(sources, str) else sources or []:
        init_from(model, source)
    if train_cfg.lora is not None:
        add_lora(model, train_cfg.lora)
    rows = 0
    if train_cfg.trainable is not None:
        params = dict(model.named_parameters())
        patterns = [p for p in train_cfg.trainable if p != CODE_ROWS]
        keep = select(params, patterns, "train.trainable") if patterns else set()
        for name, p in params.items():
            p.requires_grad_(name in keep or (train_cfg.lora is not None and "lora_" in name))
        if CODE_ROWS in train_cfg.trainable:
            rows = train_code_rows(model)
    whole = (p for p in model.parameters() if p.requires_grad and not hasattr(p, "trained_rows"))
    return rows + sum(p.numel() for p in whole)


def train_code_rows(model) -> int:
    """Let the embedding rows of the codec's code ids train and keep every other row fixed: the
    gradient of the (tied) embedding is zeroed outside ``vocab.span("audio")`` by a hook, and the
    parameter is marked ``trained_rows`` so the optimizer gives it no weight decay (a decayed text
    row would move with no gradient). Returns the number of trained weights."""
    vocab = model.vocab
    if not vocab.num_codebooks:
        raise ValueError(f"train.trainable {CODE_ROWS!r}: the model has no audio code ids "
                         "(set codec.path to the codec whose codes it reads and writes)")
    span = vocab.span("audio")
    weights = [model.embed.weight]
    if model.lm_head.weight is not model.embed.weight:
        weights.append(model.lm_head.weight)
    for w in weights:
        mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        mask[span.start:span.stop] = 1
        w.requires_grad_(True)
        if not hasattr(w, "trained_rows"):  # once, though a checkpoint's model is staged again
            w.register_hook(lambda g, m=mask: g * m.to(g.dtype))
        w.trained_rows = (span.start, span.stop)
    return sum(len(span) * w.shape[1] for w in weights)


def init_from(model, path: str | Path) -> dict:
    """Start from another run's weights: every tensor of ``path/model.safetensors`` whose name the
    model has is loaded (names the model lacks are reported, not loaded: a stage may drop heads);
    a tensor whose shape differs is an error naming it. New modules keep their initialisation."""
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise ValueError(f"train.init_from: {f} not found "
                         "(point it at a run directory written by omni train)")
    tensors = _with_code_rows(model, load_tensors(f), path)
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


def _with_code_rows(model, tensors: dict, path) -> dict:
    """A text-only checkpoint's embedding and head grown to this model's vocabulary when the model
    adds a codec's code ids after the same text ids: the new rows start at the mean of the
    checkpoint's rows, as the marker rows of an imported language model do."""
    vocab = model.vocab
    if not vocab.num_codebooks:
        return tensors
    grown = dict(tensors)
    for name in ("embed.weight", "lm_head.weight"):
        t = grown.get(name)
        if t is not None and t.dim() == 2 and t.shape[0] == vocab.text_size:
            grown[name] = with_appended_rows(t, vocab.text_size, vocab.size)
            log.info("%s: %s grows from %d to %d rows for the codec's code ids (new rows: the mean)",
                     path, name, vocab.text_size, vocab.size)
    return grown
