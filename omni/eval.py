"""Held-out evaluation of a trained run, by its recipe's task.

``fewshot`` answers held-out fast-binding episodes with and without their examples (few-shot
against zero-shot accuracy). ``caption`` tasks generate (greedy) for every row and score against
the row's target: BLEU-4 and CIDEr-D, plus WER/CER when the target is a transcript (speech
recognition) and direction accuracy when the rows say which way something moves (the video
corpus). ``text`` and ``continue`` report the held-out loss and next-token accuracy; ``continue``
(audio) scores only the codec codes, against a unigram model of the training codes, and writes
example continuations as wav files. Predictions and metrics are written next to the model:
``eval_<split>.jsonl`` and ``eval_<split>.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from omni.config import RecipeConfig, from_dict, read_yaml, split_name
from omni.data.manifest import Manifest
from omni.data.tasks import (
    TASKS,
    PairDataset,
    TaskDataset,
    TaskSpec,
    collate,
    episodes,
    named,
    prepare_rows,
    right_pad,
)
from omni.data.video import OPPOSITE, direction_of
from omni.io import atomic_write_json, write_jsonl
from omni.media.audio import Audio
from omni.metrics import bleu, cer, cider_d, wer
from omni.model.contrastive import embed_media, embed_text, similarity
from omni.model.omni_model import read_config
from omni.model_card import write_model_card
from omni.pipeline import Pipeline
from omni.processor import as_processor
from omni.progress import progress as progress_bar
from omni.tokenizers.audio import AudioCodec
from omni.train.checkpoint import STATE_FILE
from omni.train.loop import checkpoint_pipeline, checkpoint_recipe

log = logging.getLogger(__name__)


def run_recipe(ckpt: Path, task: str | None = None, data_path: str | None = None) -> RecipeConfig:
    """The recipe a run was trained with; for a checkpoint that has none (an imported one), the
    ``task`` on ``data_path`` it is to be scored on, in rows of up to its context (at most 2,048)."""
    f = Path(ckpt) / "recipe.yaml"
    if f.is_file():
        return from_dict(RecipeConfig, read_yaml(f))
    if task is None or data_path is None:
        raise ValueError(f"{ckpt}: no recipe.yaml (not a directory written by `omni train`); to score it, "
                         "name the task and its data (omni eval --task chat --data data/chat)")
    config = read_config(ckpt)
    seq_len = min(config.backbone.max_seq_len, 2048)
    data = {"task": task, "path": str(data_path), "seq_len": seq_len}
    if task == "caption" and len(config.media) == 1:  # e.g. an imported Whisper: transcripts of audio
        (media,) = config.media
        data.update(media=media, target="text" if media == "audio" else "caption")
    return from_dict(RecipeConfig, {"data": data, "model": {"max_seq_len": seq_len, "media": config.media}})


def decoding_suffix(num_beams: int = 1, ctc_weight: float = 0.0) -> str:
    """What a decoding adds to the names of the files :func:`evaluate` keeps (``eval_<split>...``):
    ``_beam<N>[_ctc<W>]``, nothing for greedy."""
    if num_beams > 1 or ctc_weight:
        return f"_beam{num_beams}" + (f"_ctc{ctc_weight:g}" if ctc_weight else "")
    return ""


def evaluate(ckpt: str | Path, split: str = "test", max_rows: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 48, data_path: str | None = None, examples: int = 4,
             through_codec: str | None = None, task: str | None = None, shots: int = 0, num_beams: int = 1,
             ctc_weight: float = 0.0, progress: bool | None = None) -> dict:
    """Score run ``ckpt`` on ``<data>/<split>.jsonl``; ``ckpt`` may also be one of its training
    checkpoints (``RUN/checkpoints/step_N``: its weights under the run's recipe, the results written
    into it), to choose a step on a validation split. ``through_codec``: a codec directory; audio
    inputs are encoded and decoded by it first (a codec's intelligibility: ASR WER on its
    reconstructions vs on the originals). A mixture run scores each of its tasks (or the one
    labelled ``task``) and returns ``{"tasks": {label: metrics}}``. ``shots``: captioning prompts
    first show that many training examples (results in ``eval_<split>_<k>shot.json``). ``num_beams``,
    ``ctc_weight``: captions by beam search, optionally joint CTC/attention decoding of speech (see
    :func:`omni.generation.beam_search`; results in ``eval_<split>_beam<N>[_ctc<W>].json``).
    ``max_rows``: only the first N rows of each task's split are scored (its ``rows``). ``progress``:
    bars counting rows as they are prepared and scored (:func:`omni.progress.progress`; None: on a
    terminal). :func:`headlines` turns the result into one line per task."""
    split = split_name(split)  # it names the manifest read and the files written into the run
    ckpt = Path(ckpt)
    step = (ckpt / STATE_FILE).is_file()  # a training checkpoint, RUN/checkpoints/step_N
    cfg = checkpoint_recipe(ckpt) if step else run_recipe(ckpt, task, data_path)
    parts = cfg.data.tasks()
    if task is not None:
        parts = [p for p in parts if p.label == task or not cfg.data.mixture and p.task == task]
        if not parts:
            raise ValueError(f"{ckpt}: no task {task!r}; "
                             f"its tasks: {', '.join(p.label for p in cfg.data.tasks())}")
    if data_path and len(parts) > 1:
        raise ValueError("a data path applies to one task; name it with task=")
    model = checkpoint_pipeline(ckpt) if step else Pipeline.from_pretrained(ckpt)
    suffix = ("_codec" if through_codec else "") + (f"_{shots}shot" if shots else "")
    searched = decoding_suffix(num_beams, ctc_weight)
    suffix += searched
    decoding = {"num_beams": num_beams, "ctc_weight": ctc_weight} if searched else {}
    results = {}
    for d in parts:
        name = f"eval_{split}" + (f"_{_file_label(d.label)}" if cfg.data.mixture else "") + suffix
        folder = data_path or d.path
        manifest = Manifest.split(folder, d.files, split)
        start = time.perf_counter()
        metrics, preds = _evaluate_task(model, d, cfg.data.seq_len, manifest, max_rows, batch_size,
                                        max_new_tokens, examples, through_codec,
                                        ckpt / f"examples_{name[5:]}", shots, decoding, progress,
                                        train=lambda: Manifest.split(folder, d.files, "train"))
        metrics.update(split=split, checkpoint=str(ckpt), task=d.task, label=d.label,
                       seconds=round(time.perf_counter() - start, 1), **decoding)
        if preds:
            write_jsonl(ckpt / f"{name}.jsonl", preds)
        results[d.label] = metrics
    out = ({"tasks": results, "split": split, "checkpoint": str(ckpt)} if cfg.data.mixture
           else results[parts[0].label])
    written = ckpt / f"eval_{split}{suffix}.json" if task is None else ckpt / f"{name}.json"
    atomic_write_json(written, out)
    log.info("every metric: %s", written)
    if not step:  # a checkpoint is not a model folder: its run's card is written at the end
        write_model_card(ckpt)
    return out


def score_split(model: Pipeline, cfg: RecipeConfig, label: str, max_rows: int | None = None,
                split: str = "val") -> dict:
    """Task ``label`` of recipe ``cfg`` scored by ``model`` on the first ``max_rows`` rows of its
    ``split`` (greedy decoding, as :func:`evaluate`), writing nothing: what ``train.best_metric``
    reads during training. Its rows are counted as the training run's progress is
    (``train.progress``): scoring a split can take minutes."""
    (d,) = [p for p in cfg.data.tasks() if p.label == label]
    manifest = Manifest.split(d.path, d.files, split)
    metrics, _ = _evaluate_task(model, d, cfg.data.seq_len, manifest, max_rows, 16, 48, 0, None, Path(),
                                progress=None if cfg.train.progress else False,
                                train=lambda: Manifest.split(d.path, d.files, "train"))
    return metrics


# the number per task that a score leads with (omni eval's first lines, the demo's report)
HEADLINE = {"caption": ("cider_d", "CIDEr-D"), "continue": ("code_accuracy", "next-code accuracy"),
            "speak": ("code_accuracy", "next-code accuracy"), "text": ("ppl", "perplexity"),
            "chat": ("ppl", "perplexity"),
            "contrastive": ("media_to_text_r1", "media-to-text R@1"),
            "fewshot": ("accuracy", "few-shot accuracy")}


def headline(task: str, metrics: dict) -> str:
    """The numbers a task is judged by, as text: a transcript by its word error rate, anything else by
    its task's metric."""
    key, name = ("wer", "WER") if "wer" in metrics else HEADLINE.get(task, (None, None))
    parts = [f"{name} {metrics[key]:.3f}"] if key in metrics else []
    if "unigram_code_accuracy" in metrics:
        parts.append(f"(unigram {metrics['unigram_code_accuracy']:.3f})")
    return " ".join(parts)


def headlines(result: dict) -> list[str]:
    """One line per task of an :func:`evaluate` result: its label, its headline number and the rows
    scored, e.g. ``asr: WER 0.853 (200 rows)``."""
    tasks = result["tasks"] if "tasks" in result else {result.get("label") or result.get("task", "?"): result}
    return [f"{label}: {headline(m.get('task', ''), m) or 'scored'} ({m.get('rows', '?')} rows)"
            for label, m in tasks.items()]


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _evaluate_task(model, d, seq_len: int, manifest, max_rows, batch_size, max_new_tokens, examples,
                   through_codec, examples_dir: Path, shots: int = 0, decoding: dict | None = None,
                   progress: bool | None = False, train=None) -> tuple[dict, list]:
    """One task scored on the first ``max_rows`` rows of ``manifest`` (a path or a
    :class:`~omni.data.manifest.Manifest`, its media paths relative to each file's folder): every
    task reads only those, so the metrics' ``rows`` is what was scored. ``train()``: the task's
    training manifest (few-shot examples, the unigram baseline of codes)."""
    manifest = Manifest.of(manifest)
    root = manifest.files[0].parent
    # shards in several folders: each row's media paths made absolute against its own
    several = len({f.parent for f in manifest.files}) > 1
    rows = [_rooted(row, f.parent) if several else row for f, _, row in manifest.rows(max_rows)]
    if not rows:
        raise ValueError(f"{manifest}: no rows to evaluate")
    train = train or (lambda: Manifest.of(root / "train.jsonl"))
    preds = []
    scorer = TASKS[d.task].scored_by  # what the task declares (omni.data.tasks.TASKS)
    if scorer == "caption":
        codec = None
        if through_codec:
            codec = AudioCodec.load(through_codec)
        metrics, preds = _eval_caption(model, d, rows, root, batch_size, max_new_tokens, codec,
                                       shots, decoding, progress, train)
        metrics["shots"] = shots
        if codec is not None:
            metrics["through_codec"] = str(through_codec)
    elif scorer == "contrastive":
        metrics = _eval_contrastive(model, d, seq_len, manifest, batch_size, max_rows, progress)
    elif scorer == "fewshot":
        metrics, preds = _eval_fewshot(model, d, manifest, max_rows, batch_size, progress)
    elif scorer == "codes":
        metrics = _eval_codes(model, d, seq_len, manifest, rows, batch_size, progress=progress, train=train)
        write = write_continuations if d.task == "continue" else write_speech
        metrics["examples"] = write(model, d, rows[:examples], root, examples_dir,
                                    progress=progress) if examples else []
    else:
        metrics = _eval_loss(model, d, seq_len, manifest, batch_size, max_rows, progress)
    metrics["rows"] = len(rows)
    return metrics, preds


def _rooted(row: dict, root: Path) -> dict:
    """``row`` with its media paths made absolute against ``root`` (its manifest file's folder)."""
    return {k: str(root / v) if k in ("image", "audio", "video") and isinstance(v, str) and v else v
            for k, v in row.items()}


def _eval_caption(model, d, rows, root: Path, batch_size: int, max_new_tokens: int, codec=None,
                  shots: int = 0, decoding: dict | None = None, progress: bool | None = False, train=None):
    """Greedy captions for ``rows`` (or by ``decoding``: ``num_beams``, ``ctc_weight``). ``shots``:
    each prompt is a conversation that first shows the model that many (media, caption) examples
    from the training split (Flamingo-style few-shot)."""
    def turn(media):
        return {"role": "user", "content": [media] + ([d.prompt] if d.prompt else [])}

    context = []
    train = train or (lambda: Manifest.of(root / "train.jsonl"))
    for f, _, ex in train().rows(shots) if shots else []:
        context += [turn(as_processor(model).media_for(f.parent / ex[d.media])),
                    {"role": "assistant", "content": ex[d.target].strip()}]

    def captions(medias: list) -> list[str]:
        outs = model.generate([context + [turn(m)] for m in medias], max_new_tokens=max_new_tokens,
                              **(decoding or {}))
        return [out.strip() for out in outs]

    # the synthetic motion corpus names each clip's direction: captions of its frames played backwards
    # show whether the model reads their order (it should then name the opposite direction)
    backwards = d.media == "video" and all(row.get("direction") for row in rows)
    done, hyps, reversed_hyps, skipped = [], [], [], 0
    bar = progress_bar(total=len(rows), desc=f"{d.label}: captioning {root}",
                       unit="clip" if d.media in ("audio", "video") else d.media, enabled=progress)
    for start in range(0, len(rows), batch_size):
        bar.update(start - bar.n)  # the rows before this batch are done
        chunk, medias = [], []
        for row in rows[start:start + batch_size]:
            try:
                media = as_processor(model).media_for(root / row[d.media])
                medias.append(_reconstruct(codec, media) if codec is not None else media)
                chunk.append(row)
            except (ValueError, KeyError) as e:
                log.warning("skipping a row of %s: %s", root, e)
                skipped += 1
        if not chunk:
            continue
        hyps += captions(medias)
        if backwards:
            reversed_hyps += captions([m.reversed() for m in medias])
        done += chunk
    bar.update(len(rows) - bar.n)
    bar.close()
    if not hyps:
        raise ValueError(f"{root}: no row could be evaluated")
    refs = [row[d.target] for row in done]
    preds = [{"id": row.get("id"), "reference": ref, "prediction": hyp}
             for row, ref, hyp in zip(done, refs, hyps)]
    metrics = {"bleu4": bleu(refs, hyps), "cider_d": cider_d(refs, hyps), "skipped": skipped}
    if d.media == "audio" and d.target == "text" and d.transcript:  # what was said; a sound's caption is not
        metrics.update(wer=wer(refs, hyps), cer=cer(refs, hyps))
    directions = [row.get("direction") for row in done]
    if all(directions):
        metrics["direction_accuracy"] = (sum(direction_of(h) == r for h, r in zip(hyps, directions))
                                         / len(hyps))
        if reversed_hyps:
            metrics["reversed_direction_accuracy"] = sum(
                direction_of(h) == OPPOSITE[r] for h, r in zip(reversed_hyps, directions)) / len(hyps)
    metrics["exact_match"] = sum(h.lower() == r.strip().lower() for h, r in zip(hyps, refs)) / len(hyps)
    return metrics, preds


def _eval_fewshot(model, d, manifest: Path, max_rows, batch_size: int,
                  progress: bool | None = False) -> tuple[dict, list]:
    """Fast binding on a split: each episode answered greedily with its named examples (few-shot)
    and from the query turn alone (zero-shot, where the made-up name cannot be known). An answer
    is right when it gives the name (:func:`~omni.data.tasks.named`); picking any of the episode's
    names at random would be right 1 / ways of the time (``chance_with_examples``)."""
    spec = TaskSpec.of(d)
    media, skipped = prepare_rows(manifest, spec, model, progress=progress)
    eps = episodes(media, spec, held_out=manifest.held_out)[:max_rows]

    preds, few_hits, zero_hits, in_context = [], 0, 0, 0
    for start in progress_bar(range(0, len(eps), batch_size), unit="batch", enabled=progress,
                              desc=f"{d.label}: answering {len(eps)} episodes"):
        chunk = eps[start:start + batch_size]
        few = model.generate([e.sample(answer=False) for e in chunk], max_new_tokens=12)
        zero = model.generate([e.sample(shots=False, answer=False) for e in chunk], max_new_tokens=12)
        for e, f, z in zip(chunk, few, zero):
            few_hits += named(f) == e.answer
            zero_hits += named(z) == e.answer
            in_context += named(f) in e.names
            preds.append({"names": e.names, "answer": e.answer, "few_shot": f.strip(),
                          "zero_shot": z.strip()})
    n = max(len(preds), 1)
    return {"accuracy": few_hits / n, "zero_shot_accuracy": zero_hits / n,
            "named_from_examples": in_context / n, "chance_with_examples": 1 / spec.ways,
            "ways": spec.ways, "episodes": len(preds), "skipped": skipped}, preds


@torch.no_grad()
def _eval_loss(model, d, seq_len: int, manifest: Path, batch_size: int, max_rows: int | None = None,
               progress: bool | None = False) -> dict:
    ds = TaskDataset(manifest, TaskSpec.of(d), model, seq_len, progress=progress,
                     max_rows=max_rows)
    total = count = correct = 0.0
    for start in progress_bar(range(0, len(ds), batch_size), desc=f"{d.label}: scoring {len(ds)} packed rows",
                              unit="batch", enabled=progress):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))], model.uses_mrope)
        out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                    doc_ids=batch["doc_ids"], streams=batch.get("streams"),
                    stream_targets=batch.get("stream_targets"))
        total += float(out.loss) * out.num_tokens
        count += out.num_tokens
        tgt = batch["targets"][out.kept]  # out.logits are the kept positions' (text or stream targets)
        correct += int((out.logits.argmax(-1) == tgt)[tgt != -100].sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "next_token_accuracy": correct / max(count, 1)}


@torch.no_grad()
def _eval_contrastive(model, d, seq_len: int, manifest: Path, batch_size: int, max_rows: int | None = None,
                      progress: bool | None = False) -> dict:
    """Zero-shot retrieval over the split (media -> text and text -> media recall@1/@5; a
    retrieved caption counts when its text equals the row's, so duplicate captions are not
    punished) and zero-shot classification into the rows' ``category`` values with the prompt
    "A picture of <category>." Chance levels are reported beside each. A BLIP-2 stage-1 model
    (``model.blip2`` with itc) is scored the same way with its query embeddings."""
    model.eval()
    ds = PairDataset(manifest, TaskSpec.of(d), model, seq_len, progress=progress,
                     max_rows=max_rows)
    media, text = [], []
    for start in progress_bar(range(0, len(ds), batch_size), desc=f"{d.label}: embedding {len(ds)} pairs",
                              unit="batch", enabled=progress):
        batch = ds.collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        media.append(embed_media(model, d.media, [slot.data for _, slot in batch["media"]]))
        text.append(embed_text(model, batch["input_ids"].to(model.device),
                               batch["key_padding"].to(model.device)))
    media, text = torch.cat(media), torch.cat(text)
    captions = [r[d.target].strip().lower() for r in ds.rows]
    same = torch.tensor([[a == b for b in captions] for a in captions])  # (N, N): interchangeable captions
    sims = similarity(media, text)
    n = len(ds)
    out = {"pairs": n}
    for k in (1, 5):
        top_m2t = sims.topk(min(k, n), dim=1).indices
        top_t2m = sims.T.topk(min(k, n), dim=1).indices
        out[f"media_to_text_r{k}"] = float(same.gather(1, top_m2t).any(1).float().mean())
        out[f"text_to_media_r{k}"] = float(same.gather(1, top_t2m).any(1).float().mean())
        out[f"chance_r{k}"] = float(same.float().mean(1).mul(min(k, n)).clamp(max=1).mean())
    categories = sorted({r["category"] for r in ds.rows if isinstance(r.get("category"), str)})
    if len(categories) > 1 and all(isinstance(r.get("category"), str) for r in ds.rows):
        tok = model.tokenizer
        ids, mask = right_pad([[tok.vocab.bos_id] + tok.encode(f"A picture of {c}.") + [tok.vocab.eos_id]
                               for c in categories])
        classes = embed_text(model, ids.to(model.device), mask.to(model.device))
        pred = similarity(media, classes).argmax(1).tolist()
        truth = [categories.index(r["category"]) for r in ds.rows]
        counts = torch.bincount(torch.tensor(truth), minlength=len(categories))
        out.update(zero_shot_accuracy=sum(p == t for p, t in zip(pred, truth)) / n, classes=len(categories),
                   chance_accuracy=1 / len(categories), majority_accuracy=float(counts.max()) / n)
    return out


@torch.no_grad()
def _reconstruct(codec, audio):
    wave = audio.resample(codec.sample_rate).waveform
    out = codec.decode(codec.encode(wave), length=wave.shape[-1]).reshape(-1)
    return Audio(out, sample_rate=codec.sample_rate)


@torch.no_grad()
def _eval_codes(model, d, seq_len: int, manifest, rows: list[dict], batch_size: int,
                unigram_rows: int = 400, progress: bool | None = False, train=None) -> dict:
    """Next-code loss and accuracy over every codebook (each code scored within its own codebook,
    as generation samples it) on held-out clips, and the same for a unigram model of the codes
    of (up to ``unigram_rows``) training clips, add-one smoothed per codebook."""
    vocab = model.vocab
    K, C = vocab.num_codebooks, vocab.codebook_size
    counts = torch.ones(K, C)
    train_manifest = train() if train else Manifest.of(manifest.files[0].parent / "train.jsonl")
    for f, _, row in progress_bar(list(train_manifest.rows(unigram_rows)), unit="clip", enabled=progress,
                                  desc=f"{d.label}: codec-encoding {train_manifest} (the unigram baseline)"):
        try:
            codes = as_processor(model).encode_audio(f.parent / row["audio"], d.max_audio_s)
        except (ValueError, KeyError):
            continue
        counts += torch.nn.functional.one_hot(codes, C).sum(1)
    log_unigram = (counts / counts.sum(1, keepdim=True)).log()  # (K, C)
    ds = TaskDataset(manifest, TaskSpec.of(d), model, seq_len, progress=progress,
                     max_rows=len(rows))
    nll = correct = uni_nll = uni_correct = n = 0.0
    per_book = torch.zeros(K)
    per_book_n = torch.zeros(K)
    for start in progress_bar(range(0, len(ds), batch_size), desc=f"{d.label}: scoring {len(ds)} packed rows",
                              unit="batch", enabled=progress):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))], model.uses_mrope)
        logits = model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"],
                       streams=batch.get("streams")).logits.float()
        targets = [batch["targets"]] + ([batch["stream_targets"][:, k] for k in range(K - 1)]
                                        if "stream_targets" in batch else [])
        for tgt in targets:
            keep = tgt >= vocab.text_size  # codec codes: all codebooks follow the text ids
            if not keep.any():
                continue
            t = tgt[keep]
            book = (t - vocab.text_size) // C
            local = (t - vocab.text_size) % C
            lg = logits[keep]
            idx = vocab.text_size + book[:, None] * C + torch.arange(C)[None, :]
            lg = lg.gather(1, idx).log_softmax(-1)  # each code against its own codebook
            nll += float(-lg.gather(1, local[:, None]).sum())
            hit = lg.argmax(-1) == local
            correct += int(hit.sum())
            per_book.index_add_(0, book, hit.float())
            per_book_n.index_add_(0, book, torch.ones_like(book, dtype=torch.float))
            uni_nll += float(-log_unigram[book, local].sum())
            uni_correct += int((log_unigram[book].argmax(-1) == local).sum())
            n += len(t)
    if not n:
        raise ValueError(f"{manifest}: no audio codes to score")
    return {"code_loss": nll / n, "code_accuracy": correct / n,
            "code_accuracy_per_codebook": [round(float(a), 4) for a in per_book / per_book_n.clamp(min=1)],
            "unigram_code_loss": uni_nll / n, "unigram_code_accuracy": uni_correct / n, "codes": int(n)}


def write_continuations(model, d, rows: list[dict], root: Path, out: Path, prompt_s: float = 1.5,
                        max_seconds: float = 3.0, temperature: float = 0.8, top_k: int = 50,
                        progress: bool | None = False) -> list[str]:
    """For each row: the first ``prompt_s`` of the clip as the prompt and the model's continuation
    (sampled, seeded), written as ``<id>_prompt.wav``, ``<id>_continuation.wav`` (prompt +
    continuation) and ``<id>_original.wav``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, row in enumerate(progress_bar(rows, desc=f"{d.label}: continuing clips into {out}", unit="clip",
                                         enabled=progress)):
        clip = Audio(root / row["audio"]).resample(model.codec.sample_rate)
        cut = int(prompt_s * clip.sample_rate)
        prompt = Audio(clip.waveform[:cut], sample_rate=clip.sample_rate)
        pieces = ([d.prompt] if d.prompt else []) + [prompt]
        cont = model.generate(pieces, output="audio", max_seconds=max_seconds, temperature=temperature,
                              top_k=top_k, seed=n)
        name = str(row.get("id", n))
        prompt.save(out / f"{name}_prompt.wav")
        Audio(torch.cat([prompt.waveform, cont.waveform]), sample_rate=clip.sample_rate).save(
            out / f"{name}_continuation.wav")
        clip.save(out / f"{name}_original.wav")
        written.append(str(out / f"{name}_continuation.wav"))
    return written


def write_speech(model, d, rows: list[dict], root: Path, out: Path, max_seconds: float = 4.0,
                 temperature: float = 0.8, top_k: int = 50, progress: bool | None = False) -> list[str]:
    """For each row: the model speaking the row's text (sampled, seeded) as ``<id>_spoken.wav``,
    next to ``<id>_original.wav``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n, row in enumerate(progress_bar(rows, desc=f"{d.label}: speaking into {out}", unit="clip",
                                         enabled=progress)):
        said = f"{d.prompt} {row['text'].strip()}" if d.prompt else row["text"].strip()
        spoken = model.generate(said, output="audio", max_seconds=max_seconds, temperature=temperature,
                                top_k=top_k, seed=n)
        name = str(row.get("id", n))
        spoken.save(out / f"{name}_spoken.wav")
        Audio(root / row["audio"]).save(out / f"{name}_original.wav")
        written.append(str(out / f"{name}_spoken.wav"))
    return written
