"""Task datasets: manifest rows -> :class:`~omni.sequence.Sample` (the task's template) ->
rendered -> packed rows, plus the collate that turns rows into a model batch.

A task is declared once, in ``TASKS`` (a :class:`Task`: its sample builder, what it needs of
the model, how ``omni eval`` scores it). Each is a template and which segments carry loss:

``text``       ``{"text"}`` -> a document (loss on all of it)
``chat``       ``{"messages": [{"role", "content"}, ...]}`` -> the conversation (loss on assistant turns)
``caption``    ``{<media>: path, <target>: str}`` -> user: [media, prompt]; assistant: target.
               Speech recognition is this task with ``media=audio``, ``target=text``.
``continue``   ``{"audio": path}`` -> a document of [prompt text] + the clip's codec codes (loss on
               all of it): audio continuation (AudioLM / MusicGen style)
``contrastive`` ``{<media>: path, <target>: str}`` -> (media, ``<bos> text <eos>``) pairs, not packed:
               a batch is a set of pairs for a contrastive loss (CLIP); see omni/model/contrastive.py
``speak``      ``{"text", "audio": path}`` -> a document of [prompt + text] + the clip's codec codes:
               text to speech as codes (the layout ``generate(..., output="audio")`` continues)
``fewshot``    ``{<media>: path}`` -> episodes of Frozen's fast binding (Tsimpoukelli et al., 2021):
               ``ways`` media from different rows, each named by a made-up word in a user turn
               ("<media> This is a dax."), then one of them again (mirrored, for images and video)
               with the prompt; the assistant answers "This is a <name>." (the only loss). Names are drawn
               per episode, the training split from one half of the made-up words and the held-out
               splits from the other, so only the episode's examples can tell the answer.

A recipe may mix tasks (``data.mixture``): :class:`MixtureDataset` draws each task's samples by
weight and packs samples of different tasks into the same rows, attention kept per document.

Each row is prepared and rendered once: in memory, or (``cache_dir``, what training uses) into a
prepared-sample cache on disk (:mod:`omni.data.cache`) keyed by the manifest, the task and the
processor, which later runs read memory-mapped without decoding any media. A dataset holds only its
packing plan, a few integers per sample; a packed row's samples are read and packed when the row is
asked for. A row that cannot be used (a missing or corrupt file, an empty target, a decoder's
RuntimeError or a MemoryError while preparing it, media that do not fit ``seq_len``) is skipped,
logged with its media file and counted (and listed in the cache's ``bad_samples.jsonl``), or
raises a ValueError naming the row and the file with ``data.on_bad_sample=error``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from omni.data import cache
from omni.data.manifest import Manifest
from omni.media import BAD_FILE_ERRORS
from omni.model.audio_codes import EMPTY
from omni.processor import Processor, as_processor
from omni.progress import progress as progress_bar
from omni.sequence import IGNORE, MediaSlot, Message, PackedRow, Rendered, Sample, Segment, pack

log = logging.getLogger(__name__)

MAX_MIXTURE_SAMPLES = 2_000_000  # a mixture epoch's samples at most (its plan: ~50 bytes a sample)

@dataclass
class TaskSpec:
    """What a dataset needs to know about its task (from the recipe's ``data`` section)."""

    task: str = "text"
    media: str = "image"  # caption: which manifest field / modality holds the input
    target: str = "caption"  # caption: which manifest field holds the text to produce
    prompt: str = ""  # caption: text after the media in the user turn; continue: text before the audio
    max_audio_s: float = 10.0  # continue: clips are cut to this length
    ways: int = 2  # fewshot: media named per episode
    episodes: int = 0  # fewshot: episodes per split (0: one per row)
    transcript: bool = True  # caption of audio: the target is what was said (trains the CTC head)
    start: float | None = None  # video: seconds where each clip's window begins (a row's "start" wins)
    end: float | None = None  # video: seconds where it ends (a row's "end" wins); None: the clip's end

    @property
    def text_field(self) -> str:
        """The manifest field holding the text the model writes (what a tokenizer trains on)."""
        return self.target if self.task == "caption" else "text"

    @classmethod
    def of(cls, data) -> TaskSpec:
        """The task fields of a recipe's ``data`` section (:class:`omni.config.TaskData`, a TaskSpec)."""
        return cls(**{f.name: getattr(data, f.name) for f in fields(cls)})


def _text_sample(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Sample:
    return Sample.document(_text(row, "text"))


def _chat_sample(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Sample:
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("no 'messages' list of {'role', 'content'} objects")
    sample = Sample([Message(_text(m, "role"), [Segment(text=_text(m, "content"))]) for m in messages])
    if not any(m.role == "assistant" for m in sample.messages):
        raise ValueError("no assistant turn to learn from")
    return sample


def _caption_sample(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Sample:
    target = _text(row, spec.target)
    user = [_media_segment(row, spec, proc, root)] + ([Segment(text=spec.prompt)] if spec.prompt else [])
    return Sample([Message("user", user), Message("assistant", [Segment(text=target)])])


def _continue_sample(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Sample:
    codes = proc.encode_audio(_media_path(row, "audio", root), spec.max_audio_s)
    prefix = [Segment(text=spec.prompt)] if spec.prompt else []
    return Sample([Message(None, prefix + [Segment("audio", codes=codes)])])


def _speak_sample(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Sample:
    text = _text(row, "text")
    codes = proc.encode_audio(_media_path(row, "audio", root), spec.max_audio_s)
    said = f"{spec.prompt} {text}" if spec.prompt else text
    return Sample([Message(None, [Segment(text=said), Segment("audio", codes=codes)])])


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"no non-empty string field {key!r}")
    return value.strip()


@dataclass(frozen=True)
class Task:
    """A task, declared once: how a manifest row becomes a sample, what the task needs of the
    model, and how ``omni eval`` scores it (``scored_by`` names a scorer in ``omni.eval``).

    ``sample``: row -> :class:`Sample` for the packed tasks; the ``pairs`` (contrastive) and
    ``episodes`` (fewshot) tasks build their own datasets from the rows instead. ``documents``:
    its samples are pre-training documents, which may flow across packed rows (a turn structure
    stays whole). ``reads_media``: it needs a ``model.media`` encoder for ``data.media``;
    ``writes_audio``: its targets are codec codes (the recipe needs ``codec.path``)."""

    name: str
    scored_by: str
    sample: Callable[[dict, TaskSpec, Processor, Path], Sample] | None = None
    documents: bool = False
    reads_media: bool = False
    writes_audio: bool = False
    pairs: bool = False
    episodes: bool = False


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("text", "loss", _text_sample, documents=True),
    Task("chat", "loss", _chat_sample),
    Task("caption", "caption", _caption_sample, reads_media=True),
    Task("continue", "codes", _continue_sample, documents=True, writes_audio=True),
    Task("speak", "codes", _speak_sample, documents=True, writes_audio=True),
    Task("contrastive", "contrastive", reads_media=True, pairs=True),
    Task("fewshot", "fewshot", reads_media=True, episodes=True),
)}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def sample_for(row: dict, spec: TaskSpec, model, root: Path) -> Sample:
    """One manifest row -> a Sample; raises ValueError/MediaError for an unusable row."""
    proc, t = as_processor(model), task(spec.task)
    if t.sample is None:
        raise ValueError(f"task {spec.task!r} builds its own dataset, not one sample per row")
    if t.reads_media and spec.media not in proc.encoders:
        raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
    return t.sample(row, spec, proc, root)


def _media_segment(row: dict, spec: TaskSpec, proc: Processor, root: Path) -> Segment:
    """The row's ``spec.media`` file as a segment; a video over the row's ``start`` / ``end``
    (seconds), else the data section's."""
    window = {}
    if spec.media == "video":
        for key in ("start", "end"):
            value = row.get(key, getattr(spec, key))
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key!r} must be a number of seconds, got {value!r}")
            window[key] = value
    return proc.segment(spec.media, _media_path(row, spec.media, root), **window)


def _media_path(row: dict, key: str, root: Path) -> Path:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"no {key!r} path")
    path = Path(value)
    return path if path.is_absolute() else root / path


_ONSETS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def episode_names(held_out: bool) -> list[str]:
    """Two-syllable made-up words ("dako", "vimu"): the training split's half, or the held-out half."""
    words = [a + v + b + w for a in _ONSETS for v in _VOWELS for b in _ONSETS for w in _VOWELS]
    random.Random(0).shuffle(words)
    return words[1::2] if held_out else words[0::2]


@dataclass
class Episode:
    """One fast-binding episode: the named examples, the query turn, its answer."""

    examples: list[Message]
    query: Message
    answer: str
    names: list[str]

    def sample(self, shots: bool = True, answer: bool = True) -> Sample:
        """The training sample (``answer``), or a prompt with or without the examples (``shots``)."""
        return Sample((self.examples if shots else []) + [self.query]
                      + ([Message("assistant", [Segment(text=naming(self.answer))])] if answer else []))


def naming(name: str) -> str:
    """How an episode names a medium; the answer repeats it, so a language model's copying from
    context (induction) carries over."""
    return f"This is a {name}."


def named(text: str) -> str:
    """The name an answer gives ("This is a dako." -> "dako")."""
    words = text.strip().lower().split()
    if words[:3] == ["this", "is", "a"]:
        words = words[3:]
    return words[0].strip(".,!?;:") if words else ""


def episodes(media: list[Segment], spec: TaskSpec, held_out: bool, seed: int = 0) -> list[Episode]:
    """Fast-binding episodes (the ``fewshot`` task) over prepared media segments (:func:`prepare_rows`):
    ``spec.episodes`` for the training split, one per row for a held-out one."""
    if len(media) < spec.ways:
        raise ValueError(f"a {spec.ways}-way episode needs at least {spec.ways} usable rows, "
                         f"got {len(media)}")
    names = episode_names(held_out)
    rng = random.Random(seed)
    mirror = spec.media in ("image", "video")
    out = []
    for _ in range(spec.episodes if spec.episodes and not held_out else len(media)):
        chosen = rng.sample(range(len(media)), spec.ways)
        called = rng.sample(names, spec.ways)
        examples = [Message("user", [media[i], Segment(text=naming(name))])
                    for i, name in zip(chosen, called)]
        q = rng.randrange(spec.ways)
        seg = media[chosen[q]]
        query = [replace(seg, data=seg.data.flip(-1)) if mirror else seg]
        query += [Segment(text=spec.prompt)] if spec.prompt else []
        out.append(Episode(examples, Message("user", query), called[q], called))
    return out


_WORK = {"text": "tokenizing", "chat": "tokenizing", "continue": "codec-encoding", "speak": "codec-encoding"}


def _manifest_rows(manifest: Manifest, spec: TaskSpec, progress: bool | None = False,
                   max_rows: int | None = None):
    """The manifest's rows (the first ``max_rows``) as (file, row number there, row), read as they
    are used, under a progress bar counting rows, named for the work each row takes (``progress``:
    see :func:`omni.progress.progress`)."""
    total = manifest.count() if max_rows is None else max_rows
    return progress_bar(manifest.rows(max_rows), total=total, desc=_work(manifest, spec), unit=_unit(spec),
                        enabled=progress)


def _work(manifest: Manifest, spec: TaskSpec) -> str:
    return f"{_WORK.get(spec.task, f'preparing {spec.media} of')} {manifest}"


_UNITS = {"text": "doc", "chat": "chat", "continue": "clip", "speak": "utterance"}


def _unit(spec: TaskSpec) -> str:
    """What one manifest row of the task is, for progress (a caption row: its medium)."""
    return _UNITS.get(spec.task, {"video": "clip", "audio": "clip"}.get(spec.media, spec.media))


def prepare_rows(manifest: str | Path | Manifest, spec: TaskSpec, model, on_bad_sample: str = "skip",
                 progress: bool | None = False) -> tuple[list, int]:
    """Every usable row's media prepared by the model's encoder (a :class:`Segment` each), and how
    many rows were skipped."""
    proc, manifest = as_processor(model), Manifest.of(manifest)
    if spec.media not in proc.encoders:
        raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
    media, num_bad = [], 0
    for f, n, row in _manifest_rows(manifest, spec, progress):
        try:
            media.append(_media_segment(row, spec, proc, f.parent))
        except BAD_FILE_ERRORS as e:
            _bad_row(f, n, row, e, on_bad_sample)
            num_bad += 1
    return media, num_bad


def text_processor(obj) -> Processor:
    """The processor datasets render with (``obj``: a Processor or a Pipeline,
    :func:`omni.processor.as_processor`); it must have a text tokenizer."""
    proc = as_processor(obj)
    if proc.tokenizer is None:
        raise ValueError("rendering a dataset needs a text tokenizer: pass a processor or pipeline that has "
                         "one (omni.Pipeline(model, tokenizer=...))")
    return proc


def _bad_row(manifest: Path, n: int, row: dict, error: Exception, on_bad_sample: str) -> dict:
    """Row ``n`` (0-based) of the manifest file ``manifest`` (one shard of a sharded manifest) could
    not be prepared: raise a ValueError naming the file, the row and its media file when
    ``on_bad_sample`` is ``error``, else log the same and return its entry for a cache's
    ``bad_samples.jsonl`` (skip it)."""
    problem = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    files = [row[k] for k in ("image", "video", "audio") if isinstance(row.get(k), str)]
    unnamed = [f for f in files if Path(f).name not in problem]  # a MediaError names its file already
    if unnamed:
        problem = f"{', '.join(unnamed)}: {problem}"
    if on_bad_sample == "error":
        raise ValueError(f"{manifest}: row {n + 1}: {problem}") from error
    log.warning("%s: row %d skipped: %s", manifest, n + 1, problem)
    return {"manifest": str(manifest), "row": n + 1, "files": files, "error": problem}


def _render_episodes(manifest: Manifest, spec: TaskSpec, proc, seq_len: int, on_bad_sample: str,
                     progress: bool | None = False):
    media, num_bad = prepare_rows(manifest, spec, proc, on_bad_sample, progress)
    rendered = []
    for ep in episodes(media, spec, held_out=manifest.held_out):
        r = proc.render(ep.sample())
        if len(r) > seq_len:
            raise ValueError(f"{manifest}: a {spec.ways}-way episode takes {len(r)} tokens, "
                             f"over data.seq_len={seq_len}")
        rendered.append(r)
    return rendered, num_bad


def _renderer(spec: TaskSpec, proc: Processor) -> Callable[[tuple], Rendered]:
    """(file, row number, row) -> the row's rendered sample, its media paths taken relative to the
    file's folder (raises a ``BAD_FILE_ERRORS`` error for an unusable row)."""
    # speech: the transcript rides along with the audio slot for the encoder's CTC head
    ctc = _ctc(spec, proc)

    def render_row(item: tuple) -> Rendered:
        f, _, row = item
        r = proc.render(sample_for(row, spec, proc, f.parent))
        if ctc:
            r.media[0].labels = torch.tensor(proc.tokenizer.encode(row[spec.target].strip()))
        return r
    return render_row


def _ctc(spec: TaskSpec, proc: Processor) -> bool:
    return (spec.task == "caption" and spec.transcript and spec.media in proc.encoders
            and bool(getattr(proc.encoders[spec.media], "ctc_weight", 0)))


def render_manifest(manifest: str | Path | Manifest, spec: TaskSpec, processor, seq_len: int,
                    on_bad_sample: str = "skip", progress: bool | None = False,
                    max_rows: int | None = None) -> tuple[list, int]:
    """Every usable row of a manifest (of its first ``max_rows``) rendered for ``spec`` by
    ``processor`` (:func:`text_processor`), in memory, and how many rows were skipped;
    ``progress``: a bar counting the rows (:func:`omni.progress.progress`). Samples with media
    longer than ``seq_len`` are dropped by the datasets (:class:`PackedDataset`), not here."""
    proc = text_processor(processor)
    manifest = Manifest.of(manifest)
    if task(spec.task).episodes:
        return _render_episodes(manifest, spec, proc, seq_len, on_bad_sample, progress)
    render_row = _renderer(spec, proc)
    rendered, num_bad = [], 0
    for f, n, row in _manifest_rows(manifest, spec, progress, max_rows):
        try:
            rendered.append(render_row((f, n, row)))
        except BAD_FILE_ERRORS as e:
            _bad_row(f, n, row, e, on_bad_sample)
            num_bad += 1
    return rendered, num_bad


class RenderedSamples:
    """Rendered samples in memory, offered as :class:`omni.data.cache.CachedSamples` offers a cache's."""

    def __init__(self, samples: list[Rendered], num_bad: int = 0):
        self.samples, self.num_bad = samples, num_bad
        self.lengths = np.array([len(r) for r in samples], dtype=np.int64)
        self.has_media = np.array([bool(r.media) for r in samples], dtype=bool)
        self.media_bytes = np.array([sum(m.data.numel() * m.data.element_size() for m in r.media)
                                     for r in samples], dtype=np.int64)
        self.rows = np.arange(len(samples))  # the sample's number (the manifest's rows, less the bad ones)
        self.num_streams = max((r.streams.shape[0] for r in samples if r.streams is not None), default=0)

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, indices: list[int]) -> list[Rendered]:
        return [self.samples[i] for i in indices]


def cache_key(manifest: str | Path | Manifest, spec: TaskSpec, proc: Processor, max_rows: int | None = None,
              memo_dir: str | Path | None = None) -> str:
    """What a prepared-sample cache of ``manifest`` depends on, hashed: the bytes of each of the
    manifest's files, in order (:meth:`Manifest.digest`; ``memo_dir`` remembers each file's digest
    while its size and modification time hold), the task, the processor
    (:meth:`omni.processor.Processor.fingerprint`: tokenizer, codec, encoders' preprocessing,
    rendering) and the cache format. Media files are named by the manifest: a file changed in place
    under the same name is not noticed (delete the cache folder)."""
    digest = Manifest.of(manifest).digest(memo_dir)
    parts = {"version": cache.VERSION, "manifest": digest, "task": asdict(spec),
             "processor": proc.fingerprint(), "ctc": _ctc(spec, proc), "max_rows": max_rows}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def manifest_samples(manifest: str | Path | Manifest, spec: TaskSpec, processor, seq_len: int,
                     on_bad_sample: str = "skip", progress: bool | None = False, max_rows: int | None = None,
                     cache_dir: str | Path | None = None, workers: int = 0):
    """Every usable row of ``manifest`` rendered: read from (or first written to) a prepared-sample
    cache under ``cache_dir`` (:class:`omni.data.cache.CachedSamples`), or in memory without one
    (:class:`RenderedSamples`); ``workers`` processes build a cache (0: this one). Bad rows are
    skipped and counted (``num_bad``) or, with ``on_bad_sample=error``, raise naming the row, also
    when a cache lists them."""
    proc, manifest = text_processor(processor), Manifest.of(manifest)
    if cache_dir is None:
        return RenderedSamples(*render_manifest(manifest, spec, proc, seq_len, on_bad_sample, progress,
                                                max_rows))
    if task(spec.task).sample is None:
        raise ValueError(f"task {spec.task!r} builds its own dataset; it has no prepared-sample cache")
    key = cache_key(manifest, spec, proc, max_rows, memo_dir=cache_dir)
    folder = Path(cache_dir) / f"{manifest.stem}-{key[:16]}"
    meta = {"manifest": str(manifest), "files": [str(f) for f in manifest.files], "key": key,
            "task": asdict(spec), "max_rows": max_rows}
    samples = cache.build(folder, manifest.rows(max_rows), _renderer(spec, proc),
                          lambda n, item, e: _bad_row(item[0], item[1], item[2], e, on_bad_sample), meta,
                          total=manifest.count() if max_rows is None else max_rows,
                          desc=_work(manifest, spec), progress=progress, workers=workers, unit=_unit(spec))
    if samples.num_bad:
        first = samples.bad_rows()[0]
        if on_bad_sample == "error":
            more = f" (and {samples.num_bad - 1} more in {folder / cache.BAD})" if samples.num_bad > 1 else ""
            raise ValueError(f"{first.get('manifest', manifest)}: row {first['row']}: {first['error']}{more}")
        log.warning("%s: skipped %d bad rows (data.on_bad_sample=skip), listed in %s", manifest,
                    samples.num_bad, folder / cache.BAD)
    return samples


def _usable(samples, seq_len: int, manifest: Manifest, spec: TaskSpec, on_bad_sample: str) -> np.ndarray:
    """The indices of ``samples`` that fit: a sample with media is never cut, so one longer than
    ``seq_len`` is a bad row (skipped, or an error under ``on_bad_sample=error``)."""
    too_long = np.flatnonzero(samples.has_media & (samples.lengths > seq_len))
    for i in too_long:
        f, n = manifest.locate(int(samples.rows[i]))
        problem = (f"{f}: row {n + 1}: {samples.lengths[i]} tokens do not fit "
                   f"data.seq_len={seq_len}")
        if on_bad_sample == "error":
            raise ValueError(problem)
        log.warning("%s; skipped", problem)
    usable = np.setdiff1d(np.arange(len(samples)), too_long)
    if not len(usable):
        raise ValueError(f"{manifest}: no usable rows for task {spec.task!r}")
    return usable


def plan_rows(lengths: np.ndarray, whole: np.ndarray, seq_len: int, split_across_rows: bool):
    """Which pieces of which samples fill each packed row: exactly the choices of
    :func:`omni.sequence.pack` (a sample continues in the next row when ``split_across_rows``,
    else starts a new one and is cut at ``seq_len``; a ``whole`` one, with media, is never split),
    made from the lengths alone. Returns ``starts`` (rows + 1 offsets into the pieces) and the
    pieces as (sample, begin, end) arrays."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    starts, docs, begins, ends = [0], [], [], []
    used = 0
    for j, (n, keep) in enumerate(zip(lengths.tolist(), whole.tolist())):
        start, keep = 0, keep or not split_across_rows
        if keep and n > seq_len - used and used:
            starts.append(len(docs))
            used = 0
        while start < n:
            take = min(n - start, seq_len - used)
            docs.append(j), begins.append(start), ends.append(start + take)
            used += take
            start += take
            if used == seq_len:
                starts.append(len(docs))
                used = 0
            if start < n and keep:
                break
    if used:
        starts.append(len(docs))
    return (np.array(starts, dtype=np.int64), np.array(docs, dtype=np.int64),
            np.array(begins, dtype=np.int64), np.array(ends, dtype=np.int64))


def length_buckets(lengths: np.ndarray, buckets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples grouped by length (Lhotse's bucketing): ``buckets`` buckets of about equal counts,
    their edges the length quantiles. Returns an order of the samples (a permutation: bucket by
    bucket, shortest first, shuffled within each bucket under ``seed``) and each position's bucket."""
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(lengths), generator=g).numpy()
    edges = np.quantile(lengths, np.linspace(0, 1, buckets + 1)[1:-1]) if len(lengths) else np.array([])
    bucket = np.searchsorted(edges, lengths[shuffled], side="right")
    by_bucket = np.argsort(bucket, kind="stable")  # the shuffled order kept within a bucket
    return shuffled[by_bucket], bucket[by_bucket]


class PackedDataset(torch.utils.data.Dataset):
    """Samples packed into rows of ``seq_len`` tokens, in ``order`` (a source in ``sources`` and a
    sample's index there, per sample; a source is :class:`RenderedSamples` or a cache's
    :class:`~omni.data.cache.CachedSamples`). The rows are planned from the samples' lengths
    (:func:`plan_rows`); row ``i``'s samples are read and packed by :func:`omni.sequence.pack`
    when it is asked for, so the dataset holds a few integers per sample. ``loss_weights``: each
    source's weight on its targets (a mixture's ``loss_weight``). ``buckets`` (> 0): the samples are
    first grouped into that many length buckets (:func:`length_buckets`, shuffled under ``seed``;
    by the bytes of their media's encoder inputs when any sample has media, else by tokens)
    and each bucket is packed into rows of its own; ``row_buckets`` then says each row's bucket
    (else it is None), for a sampler that draws each micro-batch from one bucket
    (``omni.train.loop.RowStream``)."""

    def __init__(self, sources: list, order: tuple, seq_len: int, pad_id: int, split_across_rows: bool,
                 num_bad: int = 0, loss_weights: list[float] | None = None, buckets: int = 0, seed: int = 0):
        self.sources, self.seq_len, self.pad_id = sources, seq_len, pad_id
        self.source, self.index = (np.asarray(a, dtype=np.int64) for a in order)
        self.loss_weights = loss_weights or [1.0] * len(sources)
        self.num_bad, self.num_docs = num_bad, len(self.index)
        lengths = np.zeros(len(self.index), dtype=np.int64)
        whole = np.zeros(len(self.index), dtype=bool)
        media = np.zeros(len(self.index), dtype=np.int64)
        for s, src in enumerate(sources):
            at = self.source == s
            lengths[at], whole[at] = src.lengths[self.index[at]], src.has_media[self.index[at]]
            if getattr(src, "media_bytes", None) is not None:
                media[at] = src.media_bytes[self.index[at]]
        self.num_tokens = int(lengths.sum())
        self.num_streams = max((src.num_streams for src in sources), default=0)
        self.row_buckets = None
        if not buckets:
            self.starts, self.docs, self.begins, self.ends = plan_rows(lengths, whole, seq_len,
                                                                       split_across_rows)
            return
        # audio clips by their encoder input's size (a cross-attended clip takes no tokens), else tokens
        perm, bucket = length_buckets(media if media.any() else lengths, buckets, seed)
        self.source, self.index = self.source[perm], self.index[perm]
        lengths, whole = lengths[perm], whole[perm]
        starts, pieces, row_buckets = [np.zeros(1, dtype=np.int64)], [], []
        for b in np.unique(bucket):  # each bucket (a contiguous run of the order) packed on its own
            at = np.flatnonzero(bucket == b)
            a, z = int(at[0]), int(at[-1]) + 1
            s, d, bg, e = plan_rows(lengths[a:z], whole[a:z], seq_len, split_across_rows)
            starts.append(s[1:] + sum(len(p[0]) for p in pieces))
            pieces.append((d + a, bg, e))
            row_buckets.append(np.full(len(s) - 1, b, dtype=np.int64))
        self.starts = np.concatenate(starts)
        self.docs, self.begins, self.ends = (np.concatenate([p[k] for p in pieces]) for k in range(3))
        self.row_buckets = np.concatenate(row_buckets)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> PackedRow:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        pieces = range(self.starts[i], self.starts[i + 1])
        docs = self.docs[pieces.start:pieces.stop]
        samples: dict[int, Rendered] = {}
        for s, src in enumerate(self.sources):  # one read per source
            wanted = sorted({int(d) for d in docs if self.source[d] == s})
            if wanted:
                samples.update(zip(wanted, src.get([int(self.index[d]) for d in wanted])))
        return pack([self._piece(samples[int(self.docs[p])], int(self.docs[p]), p) for p in pieces],
                    self.seq_len, self.pad_id, split_across_rows=True)[0]

    def _piece(self, r: Rendered, doc: int, p: int) -> Rendered:
        """Tokens ``begins[p]:ends[p]`` of sample ``r``, with empty code streams when others have some."""
        a, b = int(self.begins[p]), int(self.ends[p])
        streams, stream_targets = r.streams, r.stream_targets
        if streams is None and self.num_streams:
            streams = torch.full((self.num_streams, len(r)), EMPTY, dtype=torch.long)
            stream_targets = torch.full((self.num_streams, len(r)), IGNORE, dtype=torch.long)
        return Rendered(r.ids[a:b], r.targets[a:b], r.positions[:, a:b],
                        [replace(m, start=m.start - a) for m in r.media],
                        None if streams is None else streams[:, a:b],
                        None if stream_targets is None else stream_targets[:, a:b],
                        self.loss_weights[self.source[doc]])

    @staticmethod
    def collate(rows: list[PackedRow], mrope: bool = False) -> dict:
        return collate(rows, mrope)


def right_pad(seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Id sequences -> right-padded ids (B, T) (pad 0) and the mask of real tokens (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), True
    return ids, mask


class PairDataset(torch.utils.data.Dataset):
    """(media, text) pairs for a contrastive loss: each row's media prepared once, its text as
    ``<bos> text <eos>`` ids. ``rows`` keeps the manifest rows that were used."""

    def __init__(self, manifest: str | Path | Manifest, spec: TaskSpec, processor, seq_len: int,
                 on_bad_sample: str = "skip", progress: bool | None = False, max_rows: int | None = None):
        proc = text_processor(processor)
        tokenizer = proc.tokenizer
        manifest = Manifest.of(manifest)
        if spec.media not in proc.encoders:
            raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
        self.pairs, self.rows, self.num_bad = [], [], 0
        for f, n, row in _manifest_rows(manifest, spec, progress, max_rows):
            try:
                text = row.get(spec.target)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"no non-empty string field {spec.target!r}")
                body = tokenizer.encode(text.strip())[:seq_len - 2]
                ids = [tokenizer.vocab.bos_id] + body + [tokenizer.vocab.eos_id]
                data, _ = proc.prepare(spec.media, _media_path(row, spec.media, f.parent))
            except BAD_FILE_ERRORS as e:
                _bad_row(f, n, row, e, on_bad_sample)
                self.num_bad += 1
                continue
            self.pairs.append((spec.media, data, torch.tensor(ids)))
            self.rows.append(row)
        if len(self.pairs) < 2:
            raise ValueError(f"{manifest}: a contrastive task needs at least 2 usable rows, "
                             f"got {len(self.pairs)}")
        self.num_docs = len(self.pairs)
        self.num_tokens = sum(len(ids) for *_, ids in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return self.pairs[i]

    @staticmethod
    def collate(pairs: list, mrope: bool = False) -> dict:
        """Pairs -> right-padded text ids (B, T), their mask, and one media slot per row."""
        ids, mask = right_pad([t for *_, t in pairs])
        media = [(i, MediaSlot(0, 0, modality, data)) for i, (modality, data, _) in enumerate(pairs)]
        return {"input_ids": ids, "key_padding": mask, "media": media, "contrastive": True,
                "doc_ids": torch.where(mask, 0, -1)}


class TaskDataset(PackedDataset):
    """A manifest rendered for one task (through a prepared-sample cache under ``cache_dir``, or in
    memory) and packed into rows of ``seq_len`` tokens."""

    def __init__(self, manifest: str | Path | Manifest, spec: TaskSpec, processor, seq_len: int,
                 on_bad_sample: str = "skip", progress: bool | None = False, max_rows: int | None = None,
                 cache_dir: str | Path | None = None, cache_workers: int = 0, length_buckets: int = 0,
                 seed: int = 0):
        proc = text_processor(processor)
        self.manifest, self.spec = Manifest.of(manifest), spec
        samples = manifest_samples(self.manifest, spec, proc, seq_len, on_bad_sample, progress, max_rows,
                                   cache_dir, cache_workers)
        usable = _usable(samples, seq_len, self.manifest, spec, on_bad_sample)
        # Pre-training text and audio documents may flow across rows; a turn structure stays whole.
        super().__init__([samples], (np.zeros(len(usable)), usable), seq_len, proc.vocab.pad_id,
                         task(spec.task).documents, samples.num_bad + len(samples) - len(usable),
                         buckets=length_buckets, seed=seed)


class MixtureDataset(PackedDataset):
    """Several tasks' samples in shared rows. ``weighted`` (training): each task draws from a stream
    of its own (its samples in one seeded permutation after another) ``weight / sum(weights)`` of
    the samples of a cycle (a cycle holds as many samples as the tasks together), the cycle's
    draws shuffled together, its targets counting ``loss_weight`` in the loss. An epoch is
    ``cycles`` cycles: the fewest in which every task's every sample is drawn at least once (a
    task whose share is smaller than its corpus goes on through its stream instead of seeing the
    same subset every epoch), at most :data:`MAX_MIXTURE_SAMPLES` samples in all. Else (held-out
    splits) every sample once, unweighted. ``counts`` says how many samples each task puts in a
    cycle. ``cache_dir``: one folder for every task's cache, or one per task."""

    def __init__(self, parts: list[tuple[str, str | Path | Manifest, TaskSpec, float, float]], processor,
                 seq_len: int, on_bad_sample: str = "skip", weighted: bool = True, seed: int = 0,
                 progress: bool | None = False, cache_dir: str | Path | list | None = None,
                 cache_workers: int = 0, length_buckets: int = 0):
        proc = text_processor(processor)
        dirs = cache_dir if isinstance(cache_dir, list) else [cache_dir] * len(parts)
        sources, usable, num_bad = [], [], 0
        for (_, manifest, spec, _, _), folder in zip(parts, dirs):
            manifest = Manifest.of(manifest)
            samples = manifest_samples(manifest, spec, proc, seq_len, on_bad_sample, progress,
                                       cache_dir=folder, workers=cache_workers)
            usable.append(_usable(samples, seq_len, manifest, spec, on_bad_sample))
            sources.append(samples)
            num_bad += samples.num_bad + len(samples) - len(usable[-1])
        g = torch.Generator().manual_seed(seed)
        total, weight_sum = sum(len(u) for u in usable), sum(w for _, _, _, w, _ in parts)
        wants = [max(1, round(total * w / weight_sum)) if weighted else len(ok)
                 for (_, _, _, w, _), ok in zip(parts, usable)]
        need = max(-(-len(ok) // want) for ok, want in zip(usable, wants))
        self.cycles = max(1, min(need, MAX_MIXTURE_SAMPLES // sum(wants)))
        if self.cycles < need:
            log.warning("a mixture epoch holds %d cycles of %d samples (at most %d samples): the tasks "
                        "with the smallest shares of their corpora see part of them per epoch",
                        self.cycles, sum(wants), MAX_MIXTURE_SAMPLES)
        streams, self.counts = [], {}
        for (label, *_), ok, want in zip(parts, usable, wants):
            n = self.cycles * want
            idx = torch.cat([torch.randperm(len(ok), generator=g) for _ in range(-(-n // len(ok)))])
            streams.append(ok[idx[:n].numpy()])
            self.counts[label] = want
        cycles = []
        for c in range(self.cycles):
            chosen = np.concatenate([np.stack([np.full(want, t), stream[c * want:(c + 1) * want]])
                                     for t, (stream, want) in enumerate(zip(streams, wants))], axis=1)
            if weighted:
                chosen = chosen[:, torch.randperm(chosen.shape[1], generator=g).numpy()]
            cycles.append(chosen)
        chosen = np.concatenate(cycles, axis=1)
        # Samples stay whole: a document cut across rows would lose its task's context.
        super().__init__(sources, (chosen[0], chosen[1]), seq_len, proc.vocab.pad_id, False, num_bad,
                         [lw if weighted else 1.0 for *_, lw in parts], buckets=length_buckets, seed=seed)


def split_manifest(part, split: str) -> Manifest:
    """One task's (:class:`omni.config.TaskData`) manifest for ``split``: ``part.files`` (a file
    name or a glob, ``{split}`` replaced) under ``part.path``."""
    return Manifest.split(part.path, part.files, split)


def cache_dirs(data) -> list[Path]:
    """Where each of the recipe's tasks keeps its prepared samples: ``data.cache_dir`` when set,
    else a ``cache`` folder beside the task's manifests."""
    return [Path(data.cache_dir) if data.cache_dir else Path(p.path) / "cache" for p in data.tasks()]


def dataset_for(data, split: str, processor, seed: int = 0, progress: bool | None = False,
                cache: bool = True):
    """The recipe's ``data`` section (:class:`omni.config.DataConfig`) for one split, its samples
    read from prepared-sample caches (:func:`cache_dirs`, built where missing; the contrastive and
    fewshot tasks keep theirs in memory) unless ``cache`` is False (all in memory); ``progress``: a
    bar per manifest counting its rows as they are prepared (:func:`omni.progress.progress`)."""
    dirs = [d if cache and task(p.task).sample else None for p, d in zip(data.tasks(), cache_dirs(data))]
    buckets = data.length_buckets if split == "train" else 0  # held-out rows keep the manifest's order
    if not data.mixture:
        if task(data.task).pairs:
            return PairDataset(split_manifest(data, split), TaskSpec.of(data), processor, data.seq_len,
                               data.on_bad_sample, progress)
        return TaskDataset(split_manifest(data, split), TaskSpec.of(data), processor, data.seq_len,
                           data.on_bad_sample, progress, cache_dir=dirs[0], cache_workers=data.cache_workers,
                           length_buckets=buckets, seed=seed)
    parts = [(p.label, split_manifest(p, split), TaskSpec.of(p), p.weight, p.loss_weight)
             for p in data.mixture]
    return MixtureDataset(parts, processor, data.seq_len, data.on_bad_sample,
                          weighted=split == "train", seed=seed, progress=progress, cache_dir=dirs,
                          cache_workers=data.cache_workers, length_buckets=buckets)


def collate(rows: list[PackedRow], mrope: bool = False) -> dict:
    """Packed rows -> a model batch; positions are (3, B, T) for M-RoPE models, else (B, T)."""
    positions = torch.stack([r.positions for r in rows], dim=1)  # (3, B, T)
    batch = {
        "input_ids": torch.stack([r.ids for r in rows]),
        "targets": torch.stack([r.targets for r in rows]),
        "positions": positions if mrope else positions[0],
        "doc_ids": torch.stack([r.doc_ids for r in rows]),
    }
    if any(r.streams is not None for r in rows):
        batch["streams"] = torch.stack([r.streams for r in rows])
        batch["stream_targets"] = torch.stack([r.stream_targets for r in rows])
    if any(r.loss_weights is not None for r in rows):
        batch["loss_weights"] = torch.stack([torch.ones(len(r.ids)) if r.loss_weights is None
                                              else r.loss_weights
                                             for r in rows])
    media = MediaList((i, slot) for i, r in enumerate(rows) for slot in r.media)
    if media:
        batch["media"] = media
    return batch


class MediaList(list):
    """A batch's media, (row, :class:`~omni.sequence.MediaSlot`) pairs. Pickled (a DataLoader
    worker handing its batch to the training process), all the slots' tensors travel in one
    shared-memory buffer and come back as views of it: torch would share each tensor on its own (a
    shared-memory file each, its descriptor handed over through a connection of its own), which
    made 2 and 4 workers slower than none for ``llava/caption_base``'s 190 images of 224 px a
    micro-batch (docs/benchmarks.md, "Data loader against the training step")."""

    def __reduce__(self):
        tensors = [t for _, slot in self for t in (slot.data, slot.labels) if t is not None]
        offsets, size = [], 0
        for t in tensors:  # each at a 64-byte boundary, so any dtype can view its bytes
            offsets.append(size)
            size += -(-t.numel() * t.element_size() // 64) * 64
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(size, 1)))
        for t, at in zip(tensors, offsets):
            flat[at:at + t.numel() * t.element_size()] = t.contiguous().reshape(-1).view(torch.uint8)
        specs = iter((at, t.dtype, tuple(t.shape)) for t, at in zip(tensors, offsets))
        slots = [(i, s.start, s.length, s.modality, next(specs), None if s.labels is None else next(specs))
                 for i, s in self]
        return _media_list, (flat, slots)


def _media_list(flat: torch.Tensor, slots: list) -> MediaList:
    """:meth:`MediaList.__reduce__` undone: the slots' tensors as views of ``flat``."""
    def view(at: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        return flat[at:at + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    return MediaList((i, MediaSlot(start, length, modality, view(*data), labels and view(*labels)))
                     for i, start, length, modality, data, labels in slots)
