"""Task datasets: manifest rows -> :class:`~omni.sequence.Sample` (the task's template) ->
rendered -> packed rows, plus the collate that turns rows into a model batch.

A task is a template and which segments carry loss:

``text``       ``{"text"}`` -> a document (loss on all of it)
``caption``    ``{<media>: path, <target>: str}`` -> user: [media, prompt]; assistant: target.
               Speech recognition is this task with ``media=audio``, ``target=text``.
``continue``   ``{"audio": path}`` -> a document of [prompt text] + the clip's codec codes (loss on
               all of it): audio continuation (AudioLM / MusicGen style)

Media files are decoded and preprocessed once, when the dataset is built. A row that cannot be
used (a missing or corrupt file, an empty target) is skipped and counted, or raises with
``data.on_bad_sample=error``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from omni.io import read_jsonl
from omni.media import MediaError
from omni.sequence import Message, PackedRow, Sample, Segment, pack, render

log = logging.getLogger(__name__)

TASKS = ("text", "caption", "continue")


@dataclass
class TaskSpec:
    """What a dataset needs to know about its task (from the recipe's ``data`` section)."""

    task: str = "text"
    media: str = "image"  # caption: which manifest field / modality holds the input
    target: str = "caption"  # caption: which manifest field holds the text to produce
    prompt: str = ""  # caption: text after the media in the user turn; continue: text before the audio
    max_audio_s: float = 10.0  # continue: clips are cut to this length

    @property
    def text_field(self) -> str:
        """The manifest field holding the text the model writes (what a tokenizer trains on)."""
        return self.target if self.task == "caption" else "text"

    @classmethod
    def of(cls, data) -> TaskSpec:
        """From a recipe's ``data`` section (:class:`omni.config.DataConfig`)."""
        return cls(data.task, data.media, data.target, data.prompt, data.max_audio_s)


def sample_for(row: dict, spec: TaskSpec, model, root: Path) -> Sample:
    """One manifest row -> a Sample; raises ValueError/MediaError for an unusable row."""
    if spec.task == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("no non-empty string field 'text'")
        return Sample.document(text)
    if spec.task == "caption":
        target = row.get(spec.target)
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"no non-empty string field {spec.target!r}")
        if spec.media not in model.encoders:
            raise ValueError(f"the model has no {spec.media} encoder (model.media.{spec.media})")
        data, grid = model.encoders[spec.media].prepare(_media_path(row, spec.media, root))
        user = [Segment(spec.media, data=data, grid=grid)] + ([Segment(text=spec.prompt)] if spec.prompt else [])
        return Sample([Message("user", user), Message("assistant", [Segment(text=target.strip())])])
    if spec.task == "continue":
        codes = encode_audio(model, _media_path(row, "audio", root), spec.max_audio_s)
        prefix = [Segment(text=spec.prompt)] if spec.prompt else []
        return Sample([Message(None, prefix + [Segment("audio", codes=codes)])])
    raise ValueError(f"unknown task {spec.task!r}; expected one of {', '.join(TASKS)}")


def _media_path(row: dict, key: str, root: Path) -> Path:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"no {key!r} path")
    path = Path(value)
    return path if path.is_absolute() else root / path


def encode_audio(model, audio, max_seconds: float | None = None) -> torch.Tensor:
    """A file or :class:`~omni.media.audio.Audio` -> the model's codec codes (K, T), the clip cut
    to ``max_seconds``."""
    from omni.media.audio import Audio

    if model.codec is None:
        raise ValueError("the model has no audio codec (recipe section `codec`)")
    audio = audio if isinstance(audio, Audio) else Audio(audio)
    wave = audio.resample(model.codec.sample_rate).waveform
    if max_seconds:
        wave = wave[:int(max_seconds * model.codec.sample_rate)]
    with torch.no_grad():
        return model.codec.encode(wave).long()


class TaskDataset(torch.utils.data.Dataset):
    """A manifest rendered for one task and packed into rows of ``seq_len`` tokens."""

    def __init__(self, manifest: str | Path, spec: TaskSpec, model, tokenizer, seq_len: int,
                 on_bad_sample: str = "skip"):
        self.manifest = Path(manifest)
        self.spec = spec
        root = self.manifest.parent
        # speech: the transcript rides along with the audio slot for the encoder's CTC head
        encoder = model.encoders[spec.media] if spec.task == "caption" and spec.media in model.encoders else None
        ctc = getattr(encoder, "ctc_head", None) is not None
        rendered, self.num_bad = [], 0
        for n, row in enumerate(read_jsonl(self.manifest)):
            try:
                r = render(sample_for(row, spec, model, root), tokenizer, vocab=model.vocab,
                           audio_pattern=model.config.audio_pattern, mrope=model.uses_mrope)
                if r.media and len(r) > seq_len:
                    raise ValueError(f"{len(r)} tokens do not fit data.seq_len={seq_len}")
                if ctc:
                    r.media[0].labels = torch.tensor(tokenizer.encode(row[spec.target].strip()))
            except (ValueError, MediaError) as e:
                if on_bad_sample == "error":
                    raise ValueError(f"{self.manifest}: row {n + 1}: {e}") from None
                log.warning("%s: row %d skipped: %s", self.manifest, n + 1, e)
                self.num_bad += 1
                continue
            rendered.append(r)
        if self.num_bad:
            log.warning("%s: skipped %d bad rows (data.on_bad_sample=skip)", self.manifest, self.num_bad)
        if not rendered:
            raise ValueError(f"{self.manifest}: no usable rows for task {spec.task!r}")
        self.num_docs = len(rendered)
        self.num_tokens = sum(len(r) for r in rendered)
        # Pre-training text may flow across rows; a sample with a turn structure stays whole.
        self.rows: list[PackedRow] = pack(rendered, seq_len, model.vocab.pad_id,
                                          split_across_rows=spec.task in ("text", "continue"))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PackedRow:
        return self.rows[i]


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
    media = [(i, slot) for i, r in enumerate(rows) for slot in r.media]
    if media:
        batch["media"] = media
    return batch
