"""Held-out evaluation of a trained run, by its recipe's task.

``caption`` tasks generate (greedy) for every row and score against the row's target: BLEU-4 and
CIDEr-D, plus WER/CER when the target is a transcript (speech recognition) and direction accuracy
when the rows say which way something moves (the video corpus). ``text`` and ``continue`` report
the held-out loss (and next-code accuracy for audio). Predictions and metrics are written next to
the model: ``eval_<split>.jsonl`` and ``eval_<split>.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from omni.config import RecipeConfig, from_dict, read_yaml
from omni.io import atomic_write_json, read_jsonl, write_jsonl
from omni.metrics import bleu, cer, cider_d, wer

log = logging.getLogger(__name__)


def run_recipe(ckpt: Path) -> RecipeConfig:
    f = Path(ckpt) / "recipe.yaml"
    if not f.is_file():
        raise ValueError(f"{ckpt}: no recipe.yaml (is this a directory written by `omni train`?)")
    return from_dict(RecipeConfig, read_yaml(f))


def evaluate(ckpt: str | Path, split: str = "test", max_rows: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 48, data_path: str | None = None) -> dict:
    import omni

    ckpt = Path(ckpt)
    cfg = run_recipe(ckpt)
    model = omni.load(ckpt)
    manifest = Path(data_path or cfg.data.path) / f"{split}.jsonl"
    rows = list(read_jsonl(manifest))[:max_rows]
    if not rows:
        raise ValueError(f"{manifest}: no rows to evaluate")
    if cfg.data.task == "caption":
        metrics, preds = _eval_caption(model, cfg, rows, manifest.parent, batch_size, max_new_tokens)
    else:
        metrics, preds = _eval_loss(model, cfg, manifest, batch_size), []
    metrics.update(split=split, rows=len(rows), checkpoint=str(ckpt), task=cfg.data.task)
    atomic_write_json(ckpt / f"eval_{split}.json", metrics)
    if preds:
        write_jsonl(ckpt / f"eval_{split}.jsonl", preds)
    return metrics


def _media(modality: str, path: Path):
    from omni.media.audio import Audio
    from omni.media.image import Image
    from omni.media.video import Video

    return {"audio": Audio, "image": Image, "video": Video}[modality](path)


def _eval_caption(model, cfg, rows, root: Path, batch_size: int, max_new_tokens: int):
    d = cfg.data
    refs, hyps, preds, skipped = [], [], [], 0
    for start in range(0, len(rows), batch_size):
        chunk, prompts = [], []
        for row in rows[start:start + batch_size]:
            try:
                media = model.encoders[d.media]  # the video encoder samples frames its own way
                path = root / row[d.media]
                obj = media.video.load(path) if d.media == "video" else _media(d.media, path)
                prompts.append([obj] + ([d.prompt] if d.prompt else []))
                chunk.append(row)
            except (ValueError, KeyError) as e:
                log.warning("skipping a row of %s: %s", root, e)
                skipped += 1
        if not prompts:
            continue
        outs = model.generate(prompts, max_new_tokens=max_new_tokens)
        for row, out in zip(chunk, outs):
            refs.append(row[d.target])
            hyps.append(out.strip())
            preds.append({"id": row.get("id"), "reference": row[d.target], "prediction": out.strip()})
    if not hyps:
        raise ValueError(f"{root}: no row could be evaluated")
    metrics = {"bleu4": bleu(refs, hyps), "cider_d": cider_d(refs, hyps), "skipped": skipped}
    if d.media == "audio" and d.target == "text":
        metrics.update(wer=wer(refs, hyps), cer=cer(refs, hyps))
    directions = [r.get("direction") for r in rows[:len(hyps)]]
    if all(directions):
        from omni.data.video import direction_of

        hits = [direction_of(h) == r for h, r in zip(hyps, directions)]
        metrics["direction_accuracy"] = sum(hits) / len(hits)
    metrics["exact_match"] = sum(h.lower() == r.strip().lower() for h, r in zip(hyps, refs)) / len(hyps)
    return metrics, preds


@torch.no_grad()
def _eval_loss(model, cfg, manifest: Path, batch_size: int) -> dict:
    from omni.data.tasks import TaskDataset, TaskSpec, collate

    d = cfg.data
    ds = TaskDataset(manifest, TaskSpec(d.task, d.media, d.target, d.prompt, d.max_audio_s), model,
                     model.tokenizer, d.seq_len)
    total = count = correct = 0.0
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))], model.uses_mrope)
        out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                    doc_ids=batch["doc_ids"], streams=batch.get("streams"),
                    stream_targets=batch.get("stream_targets"))
        total += float(out.loss) * out.num_tokens
        count += out.num_tokens
        keep = batch["targets"] != -100
        correct += int((out.logits.argmax(-1)[keep] == batch["targets"][keep]).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "next_token_accuracy": correct / max(count, 1)}
