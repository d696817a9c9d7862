"""A Pipeline: a model and its processor, the object ``omni.load`` returns.

The model (:class:`~omni.model.omni_model.OmniModel`) takes tensors; the processor
(:class:`~omni.processor.Processor`) turns prompts into tensors and new ids or codes back into
text and audio; :mod:`omni.generation` decodes in between. A pipeline is used where a model was:
what it does not define itself (``encoders``, ``vocab``, ``config``, ``parameters()``, a forward
call, ...) is the model's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omni.generation import beam_search, generate, generate_audio_codes, iter_generate, left_pad
from omni.io import atomic_dir
from omni.media import BAD_FILE_ERRORS
from omni.media.audio import Audio
from omni.model.build import model_from_recipe
from omni.model.omni_model import CONFIG_FILE, OmniModel, read_config
from omni.processor import Processor
from omni.sequence import Sample
from omni.tokenizers.audio import load_codec
from omni.transcribe import FORMATS, TEMPERATURES, format_segments, transcribe_files

log = logging.getLogger(__name__)


class Pipeline:
    """``Pipeline(model, tokenizer=tok, codec=codec)`` or ``Pipeline(model, processor)``."""

    def __init__(self, model: OmniModel, processor: Processor | None = None, *, tokenizer=None, codec=None):
        if not isinstance(model, OmniModel):
            raise TypeError(f"a Pipeline wraps an OmniModel, got {type(model).__name__}")
        if processor is not None and (tokenizer is not None or codec is not None):
            raise ValueError("pass a processor, or the tokenizer and codec to make one, not both")
        self.model = model
        self.processor = processor or Processor.for_model(model, tokenizer, codec)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Pipeline:
        """An omni checkpoint directory: the model's config.json + model.safetensors, and the
        processor's tokenizer/ and codec/."""
        tokenizer, codec = Processor.read_files(path, read_config(path).vocab)
        return cls(OmniModel.from_pretrained(path, device=device), tokenizer=tokenizer, codec=codec)

    # -- the model's, for code written against a model --------------------------------------

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)

    @property
    def tokenizer(self):
        """The processor's text tokenizer (None: the model takes ids)."""
        return self.processor.tokenizer

    @property
    def codec(self):
        """The processor's audio codec (None: the model writes no audio)."""
        return self.processor.codec

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.model.__class__.__name__}, reads={self.processor.reads()}, "
            f"outputs={self.processor.outputs()})"
        )

    def to(self, *args, **kwargs) -> Pipeline:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> Pipeline:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> Pipeline:
        self.model.train(mode)
        return self

    # -- the public calls -------------------------------------------------------------------

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits for plain text ids."""
        return self.model.logits(input_ids)

    def save_pretrained(self, path: str | Path) -> Path:
        """The model's files and the processor's, swapped in together (``omni.io.atomic_dir``,
        config.json last; see :meth:`OmniModel.save_pretrained`)."""
        path = Path(path)
        with atomic_dir(path, merge=True, last=CONFIG_FILE) as tmp:
            self.model.write_files(tmp)
            self.processor.write_files(tmp)
        return path

    def generate(self, prompts, **kwargs):
        """ids in, new ids out (a LongTensor (B, T), like transformers, see
        :func:`omni.generation.generate`); or one prompt (a str, a list of pieces, a conversation)
        or a batch (a list of such lists) in, text or audio out.

        ``output="text"``: a str for one prompt, a list of str for a batch; with ``stream=True`` an
        iterator of text pieces (one prompt) or of lists of pieces (a batch). ``stop``: a string or
        a list of them; a prompt's generation ends when its text contains one, which is cut off
        with what follows (a stream holds back text that may be the start of one). ``num_beams > 1`` or
        ``ctc_weight > 0``: beam search, each prompt on its own; ``ctc_weight`` joins the scores of
        the audio encoder's CTC head to the decoder's (joint CTC/attention decoding of a
        transcript, see :func:`omni.generation.beam_search`).
        ``output="audio"``: the continuation as an :class:`omni.Audio` (a list for a batch), at most
        ``max_seconds`` long (default: ``max_new_tokens`` codec frames); an audio piece that ends
        the prompt is continued, otherwise the model starts a new clip after the prompt.
        """
        if isinstance(prompts, torch.Tensor):
            return generate(self.model, prompts, **kwargs)
        return self._generate(prompts, **kwargs)

    def _generate(
        self,
        prompts,
        *,
        output: str = "text",
        max_new_tokens: int = 64,
        stream: bool = False,
        stop: str | list[str] | None = None,
        max_seconds: float | None = None,
        num_beams: int = 1,
        ctc_weight: float = 0.0,
        **sampling,
    ):
        proc = self.processor
        if output not in proc.outputs():
            raise ValueError(
                f"output={output!r} is not supported by this checkpoint; it can produce: "
                f"{', '.join(proc.outputs())}"
            )
        if proc.tokenizer is None:
            raise ValueError(
                "this model has no text tokenizer; pass token ids (a LongTensor) instead of strings"
            )
        single = not is_batch(prompts)
        batch = [prompts] if single else list(prompts)
        stop = _stop_strings(stop)
        if output == "audio":
            if stream or stop:
                raise ValueError("stream=True and stop strings are for text output")
            frames = round(max_seconds * proc.codec.frame_rate) if max_seconds else max_new_tokens
            audio = self._generate_audio(batch, frames, **sampling)
            return audio[0] if single else audio
        if num_beams > 1 or ctc_weight:
            if stream or sampling:
                raise ValueError(
                    f"beam search is deterministic: it takes no stream=True or sampling settings "
                    f"({', '.join(sampling) or 'stream'})"
                )
            texts = []
            for prompt in batch:
                (r,), inputs = proc.batch([prompt])
                new = beam_search(
                    self.model,
                    r.ids[None],
                    num_beams=num_beams,
                    ctc_weight=ctc_weight,
                    max_new_tokens=max_new_tokens,
                    allowed=proc.vocab.span(output),
                    **inputs,
                )
                text = proc.decode_text(new, r.ids.tolist())
                texts.append(text[: _stop_at(text, stop)])
            return texts[0] if single else texts
        rendered, inputs = proc.batch(batch)
        ids = left_pad([r.ids for r in rendered], proc.vocab.pad_id)[0]
        sampling = {**proc.generation_defaults(), **sampling}
        kwargs = dict(max_new_tokens=max_new_tokens, allowed=proc.vocab.span(output), **inputs, **sampling)
        prompt_ids = [r.ids.tolist() for r in rendered]
        if stream:
            pieces = self._stream_text(ids, prompt_ids, kwargs, stop)
            return (p[0] for p in pieces) if single else pieces
        if stop:  # each row's text is checked as it grows, so a row can end at its stop string
            texts = ["".join(row) for row in zip(*self._stream_text(ids, prompt_ids, kwargs, stop))]
        else:
            new = generate(self.model, ids, **kwargs)
            texts = [proc.decode_text(row.tolist(), prompt) for row, prompt in zip(new, prompt_ids)]
        return texts[0] if single else texts

    def _generate_audio(self, batch: list, max_frames: int, **sampling) -> list[Audio]:
        """Render audio prompts, generate codec codes and decode each prompt's continuation."""
        proc = self.processor
        samples = [proc.sample(p, "audio") for p in batch]
        rendered, inputs = proc.batch(samples)
        ids = left_pad([r.ids for r in rendered], proc.vocab.pad_id)[0]
        prompt_codes = [s.messages[-1].segments[-1].codes for s in samples]  # the open span's known codes
        new = generate_audio_codes(
            self.model,
            ids,
            streams=inputs.get("streams"),
            attention_mask=inputs["attention_mask"],
            prompt_codes=prompt_codes,
            max_frames=max_frames,
            **sampling,
        )
        out = []
        for known, codes in zip(prompt_codes, new):
            wave = proc.decode_audio(known, codes)
            if len(wave):
                out.append(Audio(wave, sample_rate=proc.codec.sample_rate))
            else:
                log.warning(
                    "the model ended the audio at once (0 frames): returning an empty Audio; sample "
                    "again (another seed or temperature) or give a longer prompt"
                )
                out.append(Audio.empty(proc.codec.sample_rate))
        return out

    def _stream_text(self, ids, prompts: list[list[int]], kwargs, stop: tuple[str, ...]) -> Iterator[list]:
        """Yield, per step, the newly decoded text of each row (:class:`TextStream`); decoding ends
        when every row has."""
        rows = [TextStream(self.processor, p, stop) for p in prompts]
        for step in iter_generate(self.model, ids, **kwargs):
            yield [row.push(t) for row, t in zip(rows, step.tolist())]
            if all(row.finished for row in rows):
                break
        rest = [row.flush() for row in rows]  # rows cut by max_new_tokens: flush what was held back
        if any(rest):
            yield rest

    def describe(
        self,
        paths,
        *,
        prompt: str = "",
        batch_size: int = 8,
        window_s: float | None = 30.0,
        max_new_tokens: int = 64,
        progress: bool = True,
        num_beams: int = 1,
        ctc_weight: float = 0.0,
        return_exceptions: bool = False,
    ) -> list:
        """Text for each media file (a caption, or a transcript for speech), greedy, in batches; or
        by beam search (``num_beams``), jointly with the audio encoder's CTC head (``ctc_weight``).

        Audio is read in windows of ``window_s`` seconds and the windows' texts are joined; ``None``
        reads files whole. Files and windows are read lazily, ``batch_size`` clips at a time, so
        memory holds one batch of clips however many and however long the files are.

        A file that cannot be read or prepared (missing, corrupt, an unsupported sample rate or
        modality: :data:`omni.media.BAD_FILE_ERRORS`) raises; with ``return_exceptions=True`` (as in
        :func:`asyncio.gather`) its exception takes its place in the returned list and the other
        files are still described. Errors while generating are not a file's fault and always raise.
        """
        proc = self.processor
        paths = list(paths)
        texts: list[list[str]] = [[] for _ in paths]
        errors: list[Exception | None] = [None] * len(paths)
        tail = [prompt] if prompt else []

        def clips():  # (file index, prepared prompt), one at a time
            for i, path in enumerate(paths):
                try:
                    for piece in proc.pieces(path, window_s):
                        yield i, proc.sample([piece] + tail)  # decoded and prepared here, per file
                except BAD_FILE_ERRORS as e:
                    if not return_exceptions:
                        raise
                    errors[i] = e

        stream = clips()
        with tqdm(unit="clip", desc="describe", disable=not progress, delay=2) as bar:
            while batch := list(islice(stream, batch_size)):
                outs = self.generate(
                    [sample for _, sample in batch],
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    ctc_weight=ctc_weight,
                )
                for (i, _), text in zip(batch, outs):
                    texts[i].append(text.strip())
                bar.update(len(batch))
        return [e if e is not None else " ".join(t for t in parts if t) for e, parts in zip(errors, texts)]

    def transcribe(
        self,
        paths,
        *,
        language: str | None = None,
        task: str = "transcribe",
        format: str | None = "txt",
        condition_on_previous_text: bool = False,
        temperatures=TEMPERATURES,
        beam_size: int = 1,
        batch_size: int = 8,
        vad: bool = False,
        progress: bool | None = None,
        return_exceptions: bool = False,
    ):
        """Long-form transcripts of audio files with an imported Whisper (:mod:`omni.transcribe`):
        for each file its text in ``format`` (txt, json, srt, vtt, tsv), or with ``format=None`` its
        :class:`~omni.transcribe.Transcript` (a :class:`~omni.transcribe.Segment` list with its
        ``language``); one path gives one result. ``language=None``: a multilingual Whisper detects
        each file's language on its first window, an English-only one transcribes English. The
        current windows of ``batch_size`` files are decoded together; ``beam_size > 1``: beam
        search at temperature 0 (the fallback samples). ``vad=True``: only the speech Silero VAD
        finds is decoded and segments take its boundaries (needs the ``silero-vad`` package). A
        file that cannot be read raises, or with ``return_exceptions=True`` its exception takes its place."""
        if format is not None and format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)} (or None); got {format!r}")
        single = isinstance(paths, (str, Path))
        results = transcribe_files(self.model, self.processor, [paths] if single else paths,
                                   language=language, task=task, batch_size=batch_size, beam_size=beam_size,
                                   condition_on_previous_text=condition_on_previous_text,
                                   temperatures=temperatures, vad=vad, progress_bar=progress)
        out = []
        for r in results:
            if isinstance(r, Exception) and not return_exceptions:
                raise r
            out.append(r if isinstance(r, Exception) or format is None else format_segments(r, format))
        return out[0] if single else out


class TextStream:
    """One row's text as its ids arrive, decoded incrementally so the pieces join up.

    A character spelled by several byte-fallback pieces decodes to U+FFFD until its last byte
    arrives, so a trailing U+FFFD is held back until more text follows or the row ends. The row
    ends at an end-of-text id or its first stop string, which is cut with what follows; text that
    may be the start of one is held back until it is not (or the row ends: :meth:`flush`).
    """

    def __init__(self, processor: Processor, prompt: list[int], stop: tuple[str, ...] = ()):
        self.processor, self.prompt, self.stop = processor, prompt, stop
        self.ids: list[int] = []
        self.shown = ""
        self.finished = False

    def push(self, token: int) -> str:
        """The new text after ``token`` ("" once finished)."""
        if self.finished:
            return ""
        if self.processor.until_stop([token]):
            self.ids.append(token)
        else:
            self.finished = True
        return self._new_text(self.finished)

    def flush(self) -> str:
        """The held-back text, at the end of the row."""
        if self.finished:
            return ""
        return self._new_text(True)

    def _new_text(self, final: bool) -> str:
        text = self.processor.decode_text(self.ids, self.prompt, final)
        cut = _stop_at(text, self.stop)
        if cut is not None:
            self.finished = True
        elif not final:
            cut = len(text) - _partial_stop(text, self.stop)
        piece = text[len(self.shown) : cut]
        self.shown += piece
        return piece


def pipeline_from_recipe(cfg, tokenizer) -> Pipeline:
    """A freshly initialised model for the recipe ``cfg`` (:func:`omni.model.build.model_from_recipe`)
    with its processor: ``tokenizer`` and the recipe's codec (``codec.path``), if it names one."""
    codec = load_codec(cfg.codec.path) if cfg.codec.path else None
    return Pipeline(model_from_recipe(cfg, tokenizer, codec), tokenizer=tokenizer, codec=codec)


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """``stop`` (a string, a list of them or None) as a tuple of non-empty strings."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    return stop


def _stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string in ``text`` begins (None: there is none)."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins a stop string (0: none does)."""
    longest = max((len(s) for s in stop), default=1)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return k
    return 0


def is_batch(prompts) -> bool:
    """A str, a list of pieces or a conversation (a list of message dicts) is one prompt; a list
    of lists (or of :class:`~omni.sequence.Sample`) is a batch of prompts."""
    return (
        isinstance(prompts, (list, tuple))
        and len(prompts) > 0
        and all(isinstance(p, (list, tuple, Sample)) for p in prompts)
    )
