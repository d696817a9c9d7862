"""The Processor: everything between a user's inputs and the model's tensors, both ways.

In: text (the text tokenizer), media objects and files (decoded by :mod:`omni.media`, then
preprocessed the way each media encoder was trained: pixels resized, kept uint8 (the encoder
normalises them on the model's device), video frames sampled, audio resampled to log-mel, or to
codec codes with a cache), chat messages (the chat template), all rendered to ids, positions,
delay-pattern streams and media slots, left-padded into a batch. Out: new ids to text, codec
codes to a waveform.

One processor object serves datasets, generation, eval, the API and the CLI (torchtune's model
transforms are the pattern): the model itself takes tensors only. A processor is made for a
model with :meth:`Processor.for_model`; it holds no weights that train (a frozen audio tower's
features may be computed here, see ``precompute`` in ``omni.model.media_encoder``). Its files sit beside the
model's in a checkpoint folder: ``tokenizer/`` and ``codec/`` (:meth:`Processor.write_files`,
:meth:`Processor.read_files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path

import torch

from omni.generation import left_pad
from omni.media import MediaError, modality_of_path, open_media
from omni.media.audio import Audio, iter_audio_windows
from omni.media.image import Image
from omni.media.video import Video
from omni.model.audio_codes import EMPTY
from omni.model.media_encoder import AUDIO_SAMPLE_RATE
from omni.model.omni_model import check_length
from omni.model.whisper import render_whisper
from omni.sequence import Message, Sample, Segment, render
from omni.tokenizers.audio import load_codec
from omni.tokenizers.text import load_text_tokenizer
from omni.tokenizers.whisper import WhisperTokenizer

MEDIA_TYPES = {"audio": Audio, "image": Image, "video": Video}
TOKENIZER_DIR = "tokenizer"
CODEC_DIR = "codec"

# codec -> {(file, mtime, max_seconds): codes}; dropped with the codec
_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def modality_of(piece) -> str | None:
    """``audio`` / ``image`` / ``video`` for a media object, None for anything else."""
    for name, cls in MEDIA_TYPES.items():
        if isinstance(piece, cls):
            return name
    return None


def as_processor(obj) -> Processor:
    """``obj`` if it is a Processor, else the processor of a pipeline (its ``processor``) or of a
    model (:meth:`Processor.for_model`): what datasets and eval take."""
    if isinstance(obj, Processor):
        return obj
    proc = getattr(obj, "processor", None)
    return proc if isinstance(proc, Processor) else Processor.for_model(obj)


class Processor:
    """Inputs <-> tensors for one model: its text tokenizer, its media encoders' preprocessing,
    its codec, and how its sequences are rendered (``render_options``)."""

    def __init__(
        self,
        vocab,
        tokenizer=None,
        codec=None,
        encoders: dict | None = None,
        render_options: dict | None = None,
        max_seq_len: int | None = None,
    ):
        self.vocab, self.tokenizer, self.codec = vocab, tokenizer, codec
        self.encoders = dict(encoders or {})
        self.render_options = dict(render_options or {"vocab": vocab})
        self.max_seq_len = max_seq_len

    @classmethod
    def for_model(cls, model, tokenizer=None, codec=None) -> Processor:
        """The processor of an :class:`~omni.model.omni_model.OmniModel` with this text tokenizer
        and audio codec (None: the model takes ids, or writes no audio): the model's vocabulary,
        rendering options and media encoders' preprocessing (the encoders are shared, not copied).
        The tokenizer's size must be the model's text vocabulary."""
        if tokenizer is not None and tokenizer.vocab.text_size != model.vocab.text_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab.text_size} pieces but the model's text "
                             f"vocabulary has {model.vocab.text_size} (config vocab.text_size)")
        return cls(
            model.vocab,
            tokenizer,
            codec,
            dict(model.encoders),
            model.render_options(),
            model.max_seq_len,
        )

    @staticmethod
    def read_files(path: str | Path, vocab) -> tuple:
        """The ``(tokenizer, codec)`` saved in the checkpoint folder ``path`` (``tokenizer/`` and
        ``codec/``, each optional, None when absent); the tokenizer must fit ``vocab``, the
        model's (its config.json's)."""
        path = Path(path)
        tokenizer = codec = None
        if (path / TOKENIZER_DIR).is_dir():
            tokenizer = load_text_tokenizer(path / TOKENIZER_DIR)
            if tokenizer.vocab.text_size != vocab.text_size:
                raise ValueError(f"{path}: tokenizer has {tokenizer.vocab.text_size} pieces but config.json "
                                 f"says {vocab.text_size}")
        if (path / CODEC_DIR).is_dir():
            codec = load_codec(path / CODEC_DIR)
        return tokenizer, codec

    def write_files(self, folder: Path) -> None:
        """``tokenizer/`` and ``codec/`` (those the processor has) into ``folder``."""
        if self.tokenizer is not None:
            self.tokenizer.save(folder / TOKENIZER_DIR)
        if self.codec is not None:
            self.codec.save(folder / CODEC_DIR)

    def fingerprint(self) -> str:
        """A hash of everything that decides what :meth:`prepare`, :meth:`encode_audio` and
        :meth:`render` produce: the tokenizer's files, the codec's files (its weights), each media
        encoder's preprocessing config and ``data_format`` (and a frozen tower's weights when it
        ``precompute``s its features here or a tagger retrieves by them; an image tagger's weights and
        memory digest) and the rendering options. A prepared-sample cache is keyed by it
        (``omni.data.cache``), so a changed tokenizer, codec, tower or tagger never reuses one."""
        h = hashlib.sha256()
        with tempfile.TemporaryDirectory(prefix="omni_fingerprint.") as tmp:
            self.write_files(Path(tmp))
            for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                h.update(f.relative_to(tmp).as_posix().encode() + b"\0" + f.read_bytes())
        options = {k: sorted(v) if isinstance(v, set) else dataclasses.asdict(v) if k == "vocab" else v
                   for k, v in self.render_options.items()}
        encoders = {m: [type(e).__name__, e.data_format, e.standalone_config()]
                    for m, e in sorted(self.encoders.items())}
        h.update(json.dumps([options, encoders], sort_keys=True, default=repr).encode())
        for m, e in sorted(self.encoders.items()):
            # the slot's data are a frozen tower's features; a tagger's labels are rendered text
            tower, tagger = e.precomputed(), getattr(e, "tagger", None)
            if tower is None and tagger is not None and tagger.retriever is not None:
                tower = e.tokenizer  # the tagger's neighbours are found by the tower's features
            for state in (tower.state_dict() if tower is not None else {},
                          tagger.keyed_state() if tagger is not None else {}):
                for name, t in sorted(state.items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()

    # -- what the model reads and writes ----------------------------------------------------

    def reads(self) -> list[str]:
        """The input modalities the model understands."""
        return ["text", *self.encoders] + (["audio codes"] if self.codec is not None else [])

    def outputs(self) -> list[str]:
        """What ``generate(..., output=...)`` can produce: text, and audio when the model has a
        codec (its codes are in the vocabulary)."""
        return ["text"] + (["audio"] if self.codec is not None and self.vocab.num_codebooks else [])

    def check_length(self, n: int, what: str = "input") -> None:
        check_length(n, self.max_seq_len, what)

    # -- media -> tensors -------------------------------------------------------------------

    def media_for(self, path, start: float | None = None, end: float | None = None):
        """A media file as a prompt piece, by suffix. Video is sampled the way the model's video
        encoder was trained (its frame count / fps / max_frames), over ``[start, end)`` seconds when
        given; other media decode as they are."""
        if modality_of_path(path) == "video" and "video" in self.encoders:
            return self.encoders["video"].video.load(path, start=start, end=end)
        return open_media(path)

    def prepare(self, modality: str, obj) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A media object or file -> the tensor its slot carries and the token grid ``(t, h, w)``
        the model's encoder will produce for it (budgets are checked here, before any forward)."""
        if modality not in self.encoders:
            raise ValueError(f"the model has no {modality} encoder (model.media.{modality})")
        if isinstance(obj, (str, Path)):
            obj = self.media_for(obj) if modality == "video" else MEDIA_TYPES[modality](obj)
        if isinstance(obj, Video):
            obj = obj.frames
        elif isinstance(obj, Audio):
            obj = obj.resample(AUDIO_SAMPLE_RATE).waveform
        return self.encoders[modality].prepare(obj)

    def segment(self, modality: str, obj, start: float | None = None, end: float | None = None) -> Segment:
        """A media object or file -> its :class:`~omni.sequence.Segment`: :meth:`prepare`'s tensor and
        grid, and for a video the M-RoPE time position of each frame from its timestamp (when the
        video encoder sets ``positions_per_second``); for an image, the text its encoder's tagger
        writes after it. ``start`` / ``end``: a video file's window."""
        if modality == "video" and isinstance(obj, (str, Path)):
            obj = self.media_for(obj, start, end)
        if modality == "image" and isinstance(obj, (str, Path)):
            obj = Image(obj)  # decoded once, for the tower and the tagger
        data, grid = self.prepare(modality, obj)
        if modality == "image":
            return Segment(modality, data=data, grid=grid, text=self.encoders[modality].tag_text(obj))
        offsets = None
        if isinstance(obj, Video):
            offsets = self.encoders["video"].video.time_offsets(obj.timestamps)
            if offsets is not None and len(offsets) != grid[0]:
                offsets = None  # the connector regrouped time; its steps are not the frames
        return Segment(modality, data=data, grid=grid, time_offsets=offsets)

    def encode_audio(self, audio, max_seconds: float | None = None) -> torch.Tensor:
        """A file or :class:`~omni.media.audio.Audio` -> codec codes (K, T), the clip cut to
        ``max_seconds``. A file's codes are cached (a mixture's audio tasks share clips)."""
        if self.codec is None:
            raise ValueError("the model has no audio codec (recipe section `codec`)")
        key = None
        if isinstance(audio, (str, Path)) and Path(audio).is_file():
            key = (str(Path(audio).resolve()), Path(audio).stat().st_mtime_ns, max_seconds)
            cached = _CODES.setdefault(self.codec, {}).get(key)
            if cached is not None:
                return cached
        audio = audio if isinstance(audio, Audio) else Audio(audio)
        wave = audio.resample(self.codec.sample_rate).waveform
        if max_seconds:
            wave = wave[: int(max_seconds * self.codec.sample_rate)]
        with torch.no_grad():
            codes = self.codec.encode(wave).long()
        if key is not None:
            _CODES[self.codec][key] = codes
        return codes

    def pieces(self, path, window_s: float | None):
        """One media file as prompt pieces: audio in windows of ``window_s`` seconds at the log-mel
        front end's rate (streamed from disk), other media (or ``window_s=None``) whole."""
        modality = modality_of_path(path)
        if modality is None:
            raise MediaError(path, "not a media file this command reads (audio, image or video by suffix)")
        if modality not in self.encoders:
            raise ValueError(
                f"{path}: this checkpoint cannot read {modality}; it reads: {', '.join(self.reads())}"
            )
        if modality == "audio" and window_s:
            rate = AUDIO_SAMPLE_RATE
            yield from (
                Audio(w, sample_rate=rate) for w in iter_audio_windows(path, window_s, rate) if len(w)
            )
        else:
            yield self.media_for(path)

    # -- prompts -> samples -> tensors ------------------------------------------------------

    def sample(self, prompt, output: str = "text") -> Sample:
        """One prompt -> a Sample. For text output, text alone is continued as a document, a prompt
        with media is a user turn that the model answers, and a conversation (a list of
        ``{"role", "content"}`` messages, content a str or a list of pieces) is rendered turn by
        turn for the model to answer the last user turn. For audio output the prompt is a document
        whose audio pieces are codec codes, ending in an open audio span to continue. A
        :class:`Sample` (media already prepared) is used as it is."""
        if isinstance(prompt, Sample):
            return prompt
        pieces = [prompt] if isinstance(prompt, (str, dict)) else list(prompt)
        if pieces and all(isinstance(p, dict) for p in pieces):
            return self._conversation(pieces)
        if not pieces or all(isinstance(p, str) and not p for p in pieces):
            raise ValueError("the prompt is empty")
        segments = self._segments(pieces, output)
        if output == "audio":
            if segments[-1].codes is not None:
                segments[-1] = replace(segments[-1], open_end=True)
            else:
                segments.append(
                    Segment(
                        "audio",
                        codes=torch.zeros(self.vocab.num_codebooks, 0, dtype=torch.long),
                        open_end=True,
                    )
                )
            return Sample([Message(None, segments)])
        if all(seg.modality == "text" for seg in segments):
            return Sample([Message(None, segments)])
        return Sample([Message("user", segments)])

    def _conversation(self, messages: list[dict]) -> Sample:
        out = []
        for n, m in enumerate(messages):
            if set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                raise ValueError(f"message {n}: expected {{'role', 'content'}}, got keys {sorted(m)}")
            content = m["content"]
            content = [content] if isinstance(content, str) else list(content)
            out.append(Message(m["role"], self._segments(content)))
        if out[-1].role != "user":
            raise ValueError(
                f"the conversation must end with a user turn for the model to answer, not {out[-1].role!r}"
            )
        return Sample(out)

    def _segments(self, pieces: list, output: str = "text") -> list[Segment]:
        segments = []
        for piece in pieces:
            if isinstance(piece, str):
                segments.append(Segment(text=piece))
                continue
            modality = modality_of(piece)
            if modality is None:
                raise ValueError(
                    f"a prompt piece must be text, omni.Audio, omni.Image or omni.Video; "
                    f"got {type(piece).__name__}"
                )
            if output == "audio" and modality == "audio":
                segments.append(Segment("audio", codes=self.encode_audio(piece)))
                continue
            if modality not in self.encoders:
                raise ValueError(
                    f"this checkpoint cannot read {modality}; it reads: {', '.join(self.reads())}"
                )
            segments.append(self.segment(modality, piece))
        return segments

    def render(self, sample: Sample, **kwargs):
        """One sample -> ids, targets, positions, streams and media slots (``omni.sequence.render``
        with this model's vocabulary, audio layout, positions and which media are tokens); a
        Whisper tokenizer's samples are laid out as Whisper's decoder reads them (``render_whisper``)."""
        if isinstance(self.tokenizer, WhisperTokenizer):
            return render_whisper(sample, self.tokenizer, **kwargs)
        return render(sample, self.tokenizer, **self.render_options, **kwargs)

    def generation_defaults(self) -> dict:
        """Decoding rules the tokenizer brings (Whisper's suppressed ids) for ``omni.generation``."""
        if isinstance(self.tokenizer, WhisperTokenizer):
            return dict(suppress_ids=self.tokenizer.suppress_ids(),
                        begin_suppress_ids=self.tokenizer.begin_suppress_ids())
        return {}

    def batch(self, prompts: list, output: str = "text", **render_options) -> tuple[list, dict]:
        """Render and left-pad a batch of prompts: the rendered samples and the generation inputs
        (``attention_mask``, and ``streams``, ``positions`` and ``media`` when they have them).
        ``render_options`` go to :meth:`render` (a Whisper prompt's language, task, timestamps)."""
        samples = [self.sample(p, output) for p in prompts]
        rendered = [self.render(s, add_generation_prompt=True, **render_options) for s in samples]
        for r in rendered:
            self.check_length(len(r), "the prompt")
        ids, mask = left_pad([r.ids for r in rendered], self.vocab.pad_id)
        inputs = dict(attention_mask=mask)
        if any(r.streams is not None for r in rendered):  # delay-layout audio codes: codebooks 1..K-1
            streams = torch.full(
                (len(rendered), self.vocab.num_codebooks - 1, ids.shape[1]), EMPTY, dtype=torch.long
            )
            for i, r in enumerate(rendered):
                if r.streams is not None:
                    streams[i, :, ids.shape[1] - len(r) :] = r.streams
            inputs["streams"] = streams
        if any(r.media for r in rendered):
            T = ids.shape[1]
            positions = torch.zeros(3, len(rendered), T, dtype=torch.long)
            media = []
            for i, r in enumerate(rendered):
                pad = T - len(r)
                positions[:, i, pad:] = r.positions
                media += [(i, replace(slot, start=slot.start + pad)) for slot in r.media]
            inputs.update(
                positions=positions if self.render_options.get("mrope") else positions[0], media=media
            )
        return rendered, inputs

    # -- tensors -> outputs -----------------------------------------------------------------

    def until_stop(self, ids: list[int]) -> list[int]:
        """``ids`` up to the first end of text (eos, pad or end of turn)."""
        stops = {self.vocab.eos_id, self.vocab.pad_id, self.vocab.specials.get("<|eot|>", -1)}
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids

    def decode_text(self, new: list[int], prompt: list[int], final: bool = True) -> str:
        """New ids after ``prompt`` -> their text, up to the first stop (decoded in the prompt's
        context, so a piece's leading space is kept). ``final=False``: a trailing partial
        character (U+FFFD from a byte-fallback piece whose last byte has not come) is held back."""
        text = self.tokenizer.decode_continuation(self.until_stop(new), prompt)
        return text if final else text.rstrip("\ufffd")

    def decode_audio(self, known: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """New codec codes (K, T) after the prompt's ``known`` ones -> the new waveform (decoded
        with the known frames in front, so the codec has context, then cut off)."""
        with torch.no_grad():
            wave = self.codec.decode(torch.cat([known, codes.to(known)], dim=1))
        return wave.reshape(-1)[known.shape[1] * self.codec.hop_length :].cpu()
