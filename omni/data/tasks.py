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

Media files are decoded and preprocessed once, when the dataset is built. A row that cannot be
used (a missing or corrupt file, an empty target, a decoder's RuntimeError or a MemoryError while
preparing it) is skipped, logged with its media file and counted, or raises a ValueError naming
the row and the file with ``data.on_bad_sample=error``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from omni.io import read_jsonl
from omni.media import BAD_FILE_ERRORS
from omni.processor import Processor, as_processor
from omni.progress import progress as progress_bar
from omni.sequence import MediaSlot, Message, PackedRow, Sample, Segment, pack

log = logging.getLogger(__name__)

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
    data, grid = proc.prepare(spec.media, _media_path(row, spec.media, root))
    user = [Segment(spec.media, data=data, grid=grid)] + ([Segment(text=spec.prompt)] if spec.prompt else [])
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


def episodes(media: list[tuple[torch.Tensor, tuple]], spec: TaskSpec, held_out: bool,
             seed: int = 0) -> list[Episode]:
    """Fast-binding episodes (the ``fewshot`` task) over prepared media (data, grid):
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
        examples = [Message("user", [Segment(spec.media, data=media[i][0], grid=media[i][1]),
                                     Segment(text=naming(name))]) for i, name in zip(chosen, called)]
        q = rng.randrange(spec.ways)
        data, grid = media[chosen[q]]
        query = [Segment(spec.media, data=data.flip(-1) if mirror else data, grid=grid)]
        query += [Segment(text=spec.prompt)] if spec.prompt else []
        out.append(Episode(examples, Message("user", query), called[q], called))
    return out


def _manifest_rows(manifest: Path, spec: TaskSpec, progress: bool | None = False,
                   max_rows: int | None = None):
    """The manifest's rows (the first ``max_rows``) under a progress bar counting rows, named for
    the work each row takes (``progress``: see :func:`omni.progress.progress`)."""
    rows = list(read_jsonl(manifest))[:max_rows]
    work = {"text": "tokenizing", "chat": "tokenizing", "continue": "codec-encoding",
            "speak": "codec-encoding"}
    desc = f"{work.get(spec.task, f'preparing {spec.media} of')} {manifest}"
    return progress_bar(rows, desc=desc, unit="row", enabled=progress)


def prepare_rows(manifest: Path, spec: TaskSpec, model, on_bad_sample: str = "skip",
                 progress: bool | None = False) -> tuple[list, int]:
    """Every usable row's media prepared by the model's encoder, and how many rows were skipped."""
    proc = as_processor(model)
    if spec.media not in proc.encoders:
        raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
    media, num_bad = [], 0
    for n, row in enumerate(_manifest_rows(manifest, spec, progress)):
        try:
            media.append(proc.prepare(spec.media, _media_path(row, spec.media, manifest.parent)))
        except BAD_FILE_ERRORS as e:
            _bad_row(manifest, n, row, e, on_bad_sample)
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


def _bad_row(manifest: Path, n: int, row: dict, error: Exception, on_bad_sample: str) -> None:
    """Row ``n`` (0-based) could not be prepared: raise a ValueError naming the manifest, the row and
    its media file when ``on_bad_sample`` is ``error``, else log the same and return (skip it)."""
    problem = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    files = [row[k] for k in ("image", "video", "audio") if isinstance(row.get(k), str)]
    unnamed = [f for f in files if Path(f).name not in problem]  # a MediaError names its file already
    if unnamed:
        problem = f"{', '.join(unnamed)}: {problem}"
    if on_bad_sample == "error":
        raise ValueError(f"{manifest}: row {n + 1}: {problem}") from error
    log.warning("%s: row %d skipped: %s", manifest, n + 1, problem)


def _render_episodes(manifest: Path, spec: TaskSpec, proc, seq_len: int, on_bad_sample: str,
                     progress: bool | None = False):
    media, num_bad = prepare_rows(manifest, spec, proc, on_bad_sample, progress)
    rendered = []
    for ep in episodes(media, spec, held_out=manifest.stem != "train"):
        r = proc.render(ep.sample())
        if len(r) > seq_len:
            raise ValueError(f"{manifest}: a {spec.ways}-way episode takes {len(r)} tokens, "
                             f"over data.seq_len={seq_len}")
        rendered.append(r)
    return rendered, num_bad


def render_manifest(manifest: str | Path, spec: TaskSpec, processor, seq_len: int,
                    on_bad_sample: str = "skip", progress: bool | None = False,
                    max_rows: int | None = None) -> tuple[list, int]:
    """Every usable row of a manifest (of its first ``max_rows``) rendered for ``spec`` by
    ``processor`` (:func:`text_processor`), and how many rows were skipped; ``progress``: a bar
    counting the rows (:func:`omni.progress.progress`)."""
    proc = text_processor(processor)
    manifest = Path(manifest)
    if task(spec.task).episodes:
        return _render_episodes(manifest, spec, proc, seq_len, on_bad_sample, progress)
    root = manifest.parent
    # speech: the transcript rides along with the audio slot for the encoder's CTC head
    ctc = (spec.task == "caption" and spec.transcript and spec.media in proc.encoders
           and getattr(proc.encoders[spec.media], "ctc_head", None) is not None)
    rendered, num_bad = [], 0
    for n, row in enumerate(_manifest_rows(manifest, spec, progress, max_rows)):
        try:
            r = proc.render(sample_for(row, spec, proc, root))
            if r.media and len(r) > seq_len:
                raise ValueError(f"{len(r)} tokens do not fit data.seq_len={seq_len}")
            if ctc:
                r.media[0].labels = torch.tensor(proc.tokenizer.encode(row[spec.target].strip()))
        except BAD_FILE_ERRORS as e:
            _bad_row(manifest, n, row, e, on_bad_sample)
            num_bad += 1
            continue
        rendered.append(r)
    if num_bad:
        log.warning("%s: skipped %d bad rows (data.on_bad_sample=skip)", manifest, num_bad)
    if not rendered:
        raise ValueError(f"{manifest}: no usable rows for task {spec.task!r}")
    return rendered, num_bad


class PackedDataset(torch.utils.data.Dataset):
    """Rendered samples packed into rows of ``seq_len`` tokens."""

    def __init__(self, rendered: list, seq_len: int, pad_id: int, split_across_rows: bool, num_bad: int = 0):
        self.num_bad = num_bad
        self.num_docs = len(rendered)
        self.num_tokens = sum(len(r) for r in rendered)
        self.rows: list[PackedRow] = pack(rendered, seq_len, pad_id, split_across_rows=split_across_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PackedRow:
        return self.rows[i]

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

    def __init__(self, manifest: str | Path, spec: TaskSpec, processor, seq_len: int,
                 on_bad_sample: str = "skip", progress: bool | None = False, max_rows: int | None = None):
        proc = text_processor(processor)
        tokenizer = proc.tokenizer
        manifest = Path(manifest)
        if spec.media not in proc.encoders:
            raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
        self.pairs, self.rows, self.num_bad = [], [], 0
        for n, row in enumerate(_manifest_rows(manifest, spec, progress, max_rows)):
            try:
                text = row.get(spec.target)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"no non-empty string field {spec.target!r}")
                body = tokenizer.encode(text.strip())[:seq_len - 2]
                ids = [tokenizer.vocab.bos_id] + body + [tokenizer.vocab.eos_id]
                data, _ = proc.prepare(spec.media, _media_path(row, spec.media, manifest.parent))
            except BAD_FILE_ERRORS as e:
                _bad_row(manifest, n, row, e, on_bad_sample)
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
    """A manifest rendered for one task and packed into rows of ``seq_len`` tokens."""

    def __init__(self, manifest: str | Path, spec: TaskSpec, processor, seq_len: int,
                 on_bad_sample: str = "skip", progress: bool | None = False, max_rows: int | None = None):
        proc = text_processor(processor)
        self.manifest, self.spec = Path(manifest), spec
        rendered, num_bad = render_manifest(manifest, spec, proc, seq_len, on_bad_sample, progress, max_rows)
        # Pre-training text and audio documents may flow across rows; a turn structure stays whole.
        super().__init__(rendered, seq_len, proc.vocab.pad_id, task(spec.task).documents, num_bad)


class MixtureDataset(PackedDataset):
    """Several tasks' samples in shared rows. ``weighted`` (training): each task contributes
    ``weight / sum(weights)`` of the samples, its own repeated or subsampled to that count (the
    total stays the tasks' combined size), shuffled together, its targets counting ``loss_weight``
    in the loss; else every sample once, unweighted (held-out splits). ``counts`` says how many
    samples each task put in."""

    def __init__(self, parts: list[tuple[str, str | Path, TaskSpec, float, float]], processor,
                 seq_len: int, on_bad_sample: str = "skip", weighted: bool = True, seed: int = 0,
                 progress: bool | None = False):
        proc = text_processor(processor)
        per_task, num_bad = [], 0
        for _, manifest, spec, _, loss_weight in parts:
            rendered, bad = render_manifest(manifest, spec, proc, seq_len, on_bad_sample, progress)
            if weighted:
                for r in rendered:
                    r.loss_weight = loss_weight
            per_task.append(rendered)
            num_bad += bad
        g = torch.Generator().manual_seed(seed)
        total, weight_sum = sum(len(r) for r in per_task), sum(w for _, _, _, w, _ in parts)
        chosen, self.counts = [], {}
        for (label, _, _, w, _), rendered in zip(parts, per_task):
            want = max(1, round(total * w / weight_sum)) if weighted else len(rendered)
            rounds = -(-want // len(rendered))
            idx = torch.cat([torch.randperm(len(rendered), generator=g) for _ in range(rounds)])
            chosen += [rendered[i] for i in idx[:want].tolist()]
            self.counts[label] = want
        order = torch.randperm(len(chosen), generator=g).tolist() if weighted else range(len(chosen))
        # Samples stay whole: a document cut across rows would lose its task's context.
        super().__init__([chosen[i] for i in order], seq_len, proc.vocab.pad_id, False, num_bad)


def dataset_for(data, split: str, processor, seed: int = 0,
                progress: bool | None = False) -> PackedDataset:
    """The recipe's ``data`` section (:class:`omni.config.DataConfig`) for one split; ``progress``: a
    bar per manifest counting its rows as they are rendered (:func:`omni.progress.progress`)."""
    if not data.mixture:
        cls = PairDataset if task(data.task).pairs else TaskDataset
        return cls(Path(data.path) / f"{split}.jsonl", TaskSpec.of(data), processor, data.seq_len,
                   data.on_bad_sample, progress)
    parts = [(p.label, Path(p.path) / f"{split}.jsonl", TaskSpec.of(p), p.weight, p.loss_weight)
             for p in data.mixture]
    return MixtureDataset(parts, processor, data.seq_len, data.on_bad_sample,
                          weighted=split == "train", seed=seed, progress=progress)


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
    media = [(i, slot) for i, r in enumerate(rows) for slot in r.media]
    if media:
        batch["media"] = media
    return batch
