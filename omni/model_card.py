"""A run directory's model card (``README.md``): what the checkpoint reads and writes, the recipe
and data it was trained on, how training went, and every held-out score it has been given.

Written by ``omni train`` when it exports the model and rewritten by ``omni eval`` as scores
arrive, from the files the run directory already holds (``config.json``, ``recipe.yaml``,
``metrics.jsonl``, ``eval_*.json``), so it never disagrees with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from omni.config import TaskData
from omni.io import atomic_write_bytes
from omni.model.omni_model import OmniConfig

CARD_FILE = "README.md"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def loss_span(rows: list[dict]) -> str | None:
    """The first and last logged training losses of ``metrics.jsonl`` rows with their steps, e.g.
    ``6.565 (step 10) -> 3.21 (step 300)``: what the model card and ``omni train``'s last line both say."""
    train = [r for r in rows if "event" not in r and isinstance(r.get("loss"), (int, float))]
    if not train:
        return None
    first, last = train[0], train[-1]
    return f"{_fmt(first['loss'])} (step {first['step']}) -> {_fmt(last['loss'])} (step {last['step']})"


def _scores(metrics: dict) -> list[tuple[str, dict]]:
    """(task label, scalar metrics) pairs from one eval_*.json (single task or a mixture)."""
    if "tasks" in metrics:
        return [(label, m) for label, m in metrics["tasks"].items()]
    return [(metrics.get("task", ""), metrics)]


def write_model_card(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    recipe = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
              if (run / "recipe.yaml").is_file() else {})
    cfg = OmniConfig.from_dict(config, str(run / "config.json"))
    bb = cfg.backbone
    reads = ["text", *cfg.media] + (["audio codes"] if cfg.vocab.num_codebooks else [])
    writes = ["text"] + (["audio (codec codes)"] if cfg.vocab.num_codebooks else [])
    lines = [f"# {recipe.get('name') or run.name}", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += ["An omni checkpoint: load it with `omni.load(\"<this directory>\")`.", "",
              f"- reads: {', '.join(reads)}; writes: {', '.join(writes)}",
              f"- backbone: {bb.num_layers} layers, width {bb.dim}, {bb.num_heads} heads, "
              f"context {bb.max_seq_len}"
              + (f", cross-attention {bb.cross_attention}" if bb.cross_attention else "")
              + (", M-RoPE" if bb.mrope_section else ""),
              f"- vocabulary: {cfg.vocab.text_size} text pieces"
              + (f" + {cfg.vocab.num_codebooks} x {cfg.vocab.codebook_size} audio codes"
                 if cfg.vocab.num_codebooks else "")]
    for modality, m in cfg.media.items():
        enc = m.get("encoder") or m.get("tokenizer") or {}
        lines.append(f"- {modality} encoder: {enc.get('kind', 'vit')} {enc.get('size', '')}".rstrip()
                     + f", connector {m.get('connector', {}).get('kind', 'mlp')}")
    data = recipe.get("data") or {}
    tasks = data.get("mixture") or ([data] if data else [])
    if tasks:
        lines += ["", "## Data", "", "| task | data | weight |", "|---|---|---|"]
        for t in tasks:
            part = TaskData(**{k: v for k, v in t.items() if k in TaskData.__dataclass_fields__})
            lines.append(f"| {part.label} | `{part.path}` | {_fmt(part.weight)} |")
    metrics_file = run / "metrics.jsonl"
    if metrics_file.is_file():
        rows = [json.loads(x) for x in metrics_file.read_text(encoding="utf-8").splitlines() if x.strip()]
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        start = next((r for r in rows if r.get("event") == "start"), {})
        if train:
            t = recipe.get("train") or {}
            lines += ["", "## Training", "",
                      f"- {train[-1]['step']} steps of {t.get('batch_size', '?')} rows x "
                      f"{data.get('seq_len', '?')} tokens, "
                      f"lr {t.get('lr', '?')}; {_fmt(start.get('params', 0) / 1e6)}M parameters",
                      f"- train loss {loss_span(rows)}"
                      + (f"; validation loss {_fmt(val[-1]['val_loss'])}" if val else "")]
            if (run / "loss.png").is_file():
                lines.append("- loss curves: ![loss](loss.png)")
    evals = sorted(run.glob("eval_*.json"))
    if evals:
        lines += ["", "## Held-out scores", "", "| file | task | metric | value |", "|---|---|---|---|"]
        for f in evals:
            try:
                metrics = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            for label, m in _scores(metrics):
                for key, value in m.items():
                    if (isinstance(value, (int, float)) and not isinstance(value, bool)
                            and key not in ("rows", "seconds")):
                        lines.append(f"| {f.name} | {label} | {key} | {_fmt(value)} |")
    lines += ["", "## Files", "",
              "`config.json` (backbone, vocabulary, media encoders), `model.safetensors` (weights), "
              "`tokenizer/` (SentencePiece model), `codec/` (audio codec, when it writes audio), "
              "`recipe.yaml` (how it was trained), `metrics.jsonl` and `loss.png` (training curves). "
              "See docs/checkpoints.md.", ""]
    out = run / CARD_FILE
    atomic_write_bytes(out, "\n".join(lines).encode("utf-8"))
    return out
