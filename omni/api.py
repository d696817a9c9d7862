"""The any-to-any facade: load a checkpoint, import one, and generate from prompts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from omni.generation import generate, iter_generate, left_pad
from omni.model.audio_codes import EMPTY
from omni.sequence import Message, Sample, Segment, render

log = logging.getLogger(__name__)

def load(path: str | Path, device: str | torch.device = "cpu"):
    """Load an omni checkpoint directory (config.json + model.safetensors + tokenizer/)."""
    from omni.model.omni_model import OmniModel

    return OmniModel.from_pretrained(path, device=device)


def import_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A local transformers Llama- or Qwen2-family checkpoint -> an omni model with the same logits."""
    from omni.model.hf_import import import_hf as _import

    return _import(path, device=device, dtype=dtype)


def _modality_of(piece) -> str | None:
    from omni.media.audio import Audio
    from omni.media.image import Image
    from omni.media.video import Video

    for cls, name in ((Audio, "audio"), (Image, "image"), (Video, "video")):
        if isinstance(piece, cls):
            return name
    return None


def reads(model) -> list[str]:
    """The input modalities a checkpoint understands."""
    return ["text", *model.encoders] + (["audio codes"] if model.codec is not None else [])


def outputs(model) -> list[str]:
    """The output modalities ``generate(..., output=...)`` supports for a checkpoint: text, and
    audio when it has a codec (its codes are in the vocabulary)."""
    return ["text"] + (["audio"] if model.codec is not None and model.vocab.num_codebooks else [])


def media_for(model, path):
    """A media file as a prompt piece, by suffix. Video is sampled the way the checkpoint's video
    encoder was trained (its frame count / fps), other media decode as they are."""
    from omni.media import modality_of_path, open_media

    if modality_of_path(path) == "video" and "video" in model.encoders:
        return model.encoders["video"].video.load(path)
    return open_media(path)


def _prompt_sample(model, prompt, output: str = "text") -> Sample:
    """One prompt -> a Sample. For text output, text alone is continued as a document, a prompt
    with media is a user turn that the model answers, and a conversation (a list of
    ``{"role", "content"}`` messages, content a str or a list of pieces) is rendered turn by turn
    for the model to answer the last user turn. For audio output the prompt is a document whose
    audio pieces are codec codes, ending in an open audio span to continue. A :class:`Sample`
    (media already prepared) is used as it is."""
    if isinstance(prompt, Sample):
        return prompt
    pieces = [prompt] if isinstance(prompt, (str, dict)) else list(prompt)
    if pieces and all(isinstance(p, dict) for p in pieces):
        return _conversation(model, pieces)
    if not pieces or all(isinstance(p, str) and not p for p in pieces):
        raise ValueError("the prompt is empty")
    segments = _segments(model, pieces, output)
    if output == "audio":
        if segments[-1].codes is not None:
            segments[-1] = replace(segments[-1], open_end=True)
        else:
            segments.append(Segment("audio", codes=torch.zeros(model.vocab.num_codebooks, 0, dtype=torch.long),
                                    open_end=True))
        return Sample([Message(None, segments)])
    if all(seg.modality == "text" for seg in segments):
        return Sample([Message(None, segments)])
    return Sample([Message("user", segments)])


def _conversation(model, messages: list[dict]) -> Sample:
    out = []
    for n, m in enumerate(messages):
        if set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {n}: expected {{'role', 'content'}}, got keys {sorted(m)}")
        content = m["content"]
        content = [content] if isinstance(content, str) else list(content)
        out.append(Message(m["role"], _segments(model, content)))
    if out[-1].role != "user":
        raise ValueError(f"the conversation must end with a user turn for the model to answer, not {out[-1].role!r}")
    return Sample(out)


def _segments(model, pieces: list, output: str = "text") -> list[Segment]:
    segments = []
    for piece in pieces:
        if isinstance(piece, str):
            segments.append(Segment(text=piece))
            continue
        modality = _modality_of(piece)
        if modality is None:
            raise ValueError(f"a prompt piece must be text, omni.Audio, omni.Image or omni.Video; "
                             f"got {type(piece).__name__}")
        if output == "audio" and modality == "audio":
            from omni.data.tasks import encode_audio

            segments.append(Segment("audio", codes=encode_audio(model, piece)))
            continue
        if modality not in model.encoders:
            raise ValueError(f"this checkpoint cannot read {modality}; it reads: {', '.join(reads(model))}")
        data, grid = model.encoders[modality].prepare(piece)
        segments.append(Segment(modality, data=data, grid=grid))
    return segments


def is_batch(prompts) -> bool:
    """A str, a list of pieces or a conversation (a list of message dicts) is one prompt; a list
    of lists (or of :class:`Sample`) is a batch of prompts."""
    return (isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and all(isinstance(p, (list, tuple, Sample)) for p in prompts))


def render_prompts(model, prompts: list, output: str = "text") -> tuple[list, dict]:
    """Render and left-pad a batch of prompts: the rendered samples and the generation inputs."""
    return _render_samples(model, [_prompt_sample(model, p, output) for p in prompts])


def _render_samples(model, samples: list[Sample]) -> tuple[list, dict]:
    rendered = [render(sample, model.tokenizer, **model.render_options(), add_generation_prompt=True) for sample in samples]
    for r in rendered:
        model._check_length(len(r), "the prompt")
    ids, mask = left_pad([r.ids for r in rendered], model.vocab.pad_id)
    inputs = dict(attention_mask=mask)
    if any(r.streams is not None for r in rendered):  # delay-layout audio codes: codebooks 1..K-1
        streams = torch.full((len(rendered), model.vocab.num_codebooks - 1, ids.shape[1]), EMPTY, dtype=torch.long)
        for i, r in enumerate(rendered):
            if r.streams is not None:
                streams[i, :, ids.shape[1] - len(r):] = r.streams
        inputs["streams"] = streams
    if any(r.media for r in rendered):
        T = ids.shape[1]
        positions = torch.zeros(3, len(rendered), T, dtype=torch.long)
        media = []
        for i, r in enumerate(rendered):
            pad = T - len(r)
            positions[:, i, pad:] = r.positions
            media += [(i, replace(slot, start=slot.start + pad)) for slot in r.media]
        inputs.update(positions=positions if model.uses_mrope else positions[0], media=media)
    return rendered, inputs


def generate_from_prompts(model, prompts, *, output: str = "text", max_new_tokens: int = 64,
                          stream: bool = False, max_seconds: float | None = None, num_beams: int = 1,
                          ctc_weight: float = 0.0, **sampling):
    """Generate for one prompt (a str, or a list of pieces) or a batch (a list of such lists).

    ``output="text"``: a str for one prompt, a list of str for a batch; with ``stream=True`` an
    iterator of text pieces (one prompt) or of lists of pieces (a batch). ``num_beams > 1`` or
    ``ctc_weight > 0``: beam search, each prompt on its own; ``ctc_weight`` joins the scores of the
    audio encoder's CTC head to the decoder's (joint CTC/attention decoding of a transcript, see
    :func:`omni.generation.beam_search`).
    ``output="audio"``: the continuation as an :class:`omni.Audio` (a list for a batch), at most
    ``max_seconds`` long (default: ``max_new_tokens`` codec frames); an audio piece that ends the
    prompt is continued, otherwise the model starts a new clip after the prompt.
    """
    if output not in outputs(model):
        raise ValueError(f"output={output!r} is not supported by this checkpoint; it can produce: "
                         f"{', '.join(outputs(model))}")
    if model.tokenizer is None:
        raise ValueError("this model has no text tokenizer; pass token ids (a LongTensor) instead of strings")
    batch = list(prompts) if is_batch(prompts) else [prompts]
    if output == "audio":
        if stream:
            raise ValueError("stream=True is for text output")
        frames = round(max_seconds * model.codec.frame_rate) if max_seconds else max_new_tokens
        audio = _generate_audio(model, batch, frames, **sampling)
        return audio if is_batch(prompts) else audio[0]
    single = not is_batch(prompts)
    if num_beams > 1 or ctc_weight:
        if stream or sampling:
            raise ValueError(f"beam search is deterministic: it takes no stream=True or sampling settings "
                             f"({', '.join(sampling) or 'stream'})")
        from omni.generation import beam_search

        texts = []
        for prompt in batch:
            (r,), inputs = render_prompts(model, [prompt])
            new = beam_search(model, r.ids[None], num_beams=num_beams, ctc_weight=ctc_weight,
                              max_new_tokens=max_new_tokens, allowed=model.vocab.span(output), **inputs)
            texts.append(model.tokenizer.decode_continuation(_until_stop(new, model.vocab), r.ids.tolist()))
        return texts[0] if single else texts
    rendered, inputs = render_prompts(model, batch)
    ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
    kwargs = dict(max_new_tokens=max_new_tokens, allowed=model.vocab.span(output), **inputs, **sampling)
    prompt_ids = [r.ids.tolist() for r in rendered]
    if stream:
        pieces = _stream_text(model, ids, prompt_ids, kwargs)
        return (p[0] for p in pieces) if single else pieces
    new = generate(model, ids, **kwargs)
    texts = [model.tokenizer.decode_continuation(_until_stop(row.tolist(), model.vocab), prompt)
             for row, prompt in zip(new, prompt_ids)]
    return texts[0] if single else texts


def _generate_audio(model, batch: list, max_frames: int, **sampling) -> list:
    """Render audio prompts, generate codec codes and decode each prompt's continuation."""
    from omni.generation import generate_audio_codes
    from omni.media.audio import Audio

    samples = [_prompt_sample(model, p, "audio") for p in batch]
    rendered, inputs = _render_samples(model, samples)
    ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
    prompt_codes = [s.messages[-1].segments[-1].codes for s in samples]  # the open span's known codes
    new = generate_audio_codes(model, ids, streams=inputs.get("streams"), attention_mask=inputs["attention_mask"],
                               prompt_codes=prompt_codes, max_frames=max_frames, **sampling)
    out = []
    for known, codes in zip(prompt_codes, new):
        # decode with the prompt's frames in front so the codec has context, then cut them off
        with torch.no_grad():
            wave = model.codec.decode(torch.cat([known, codes.to(known)], dim=1))
        cut = known.shape[1] * model.codec.hop_length
        wave = wave.reshape(-1)[cut:].cpu()
        if len(wave):
            out.append(Audio(wave, sample_rate=model.codec.sample_rate))
        else:
            log.warning("the model ended the audio at once (0 frames): returning an empty Audio; sample again "
                        "(another seed or temperature) or give a longer prompt")
            out.append(Audio.empty(model.codec.sample_rate))
    return out


def describe(model, paths, *, prompt: str = "", batch_size: int = 8, window_s: float | None = 30.0,
             max_new_tokens: int = 64, progress: bool = True, num_beams: int = 1, ctc_weight: float = 0.0,
             return_exceptions: bool = False) -> list:
    """Text for each media file (a caption, or a transcript for speech), greedy, in batches; or by
    beam search (``num_beams``), jointly with the audio encoder's CTC head (``ctc_weight``).

    Audio is read in windows of ``window_s`` seconds and the windows' texts are joined; ``None``
    reads files whole. Files and windows are read lazily, ``batch_size`` clips at a time, so memory
    holds one batch of clips however many and however long the files are.

    A file that cannot be read or prepared (missing, corrupt, an unsupported sample rate or
    modality: :data:`omni.media.BAD_FILE_ERRORS`) raises; with ``return_exceptions=True`` (as in
    :func:`asyncio.gather`) its exception takes its place in the returned list and the other files
    are still described. Errors while generating are not a file's fault and always raise.
    """
    from itertools import islice

    from tqdm.auto import tqdm

    from omni.media import BAD_FILE_ERRORS

    paths = list(paths)
    texts: list[list[str]] = [[] for _ in paths]
    errors: list[Exception | None] = [None] * len(paths)
    tail = [prompt] if prompt else []

    def clips():  # (file index, prepared prompt), one at a time
        for i, path in enumerate(paths):
            try:
                for piece in _pieces(model, path, window_s):
                    yield i, _prompt_sample(model, [piece] + tail)  # decoded and prepared here, per file
            except BAD_FILE_ERRORS as e:
                if not return_exceptions:
                    raise
                errors[i] = e

    stream = clips()
    with tqdm(unit="clip", desc="describe", disable=not progress, delay=2) as bar:
        while batch := list(islice(stream, batch_size)):
            outs = model.generate([sample for _, sample in batch], max_new_tokens=max_new_tokens,
                                  num_beams=num_beams, ctc_weight=ctc_weight)
            for (i, _), text in zip(batch, outs):
                texts[i].append(text.strip())
            bar.update(len(batch))
    return [e if e is not None else " ".join(t for t in parts if t) for e, parts in zip(errors, texts)]


def _pieces(model, path, window_s: float | None) -> Iterator:
    """One media file as prompt pieces: audio in windows of ``window_s`` seconds at the log-mel
    front end's rate (streamed from disk), other media (or ``window_s=None``) whole."""
    from omni.media import MediaError, modality_of_path
    from omni.media.audio import Audio, iter_audio_windows

    modality = modality_of_path(path)
    if modality is None:
        raise MediaError(path, "not a media file this command reads (audio, image or video by suffix)")
    if modality not in model.encoders:
        raise ValueError(f"{path}: this checkpoint cannot read {modality}; it reads: {', '.join(reads(model))}")
    if modality == "audio" and window_s:
        rate = 16000  # the log-mel front end's rate
        yield from (Audio(w, sample_rate=rate) for w in iter_audio_windows(path, window_s, rate) if len(w))
    else:
        yield media_for(model, path)


def _until_stop(ids: list[int], vocab) -> list[int]:
    stops = {vocab.eos_id, vocab.pad_id, vocab.specials.get("<|eot|>", -1)}
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _stream_text(model, ids, prompts: list[list[int]], kwargs) -> Iterator[list[str]]:
    """Yield, per step, the newly decoded text of each row (decoded incrementally so pieces join up).

    A character spelled by several byte-fallback pieces decodes to U+FFFD until its last byte
    arrives, so a trailing U+FFFD is held back until more text follows or the row ends.
    """
    B, tok = ids.shape[0], model.tokenizer
    produced: list[list[int]] = [[] for _ in range(B)]
    shown = [""] * B
    finished = [False] * B

    def new_text(i: int, final: bool) -> str:
        text = tok.decode_continuation(produced[i], prompts[i])
        if not final:
            text = text.rstrip("\ufffd")
        piece = text[len(shown[i]):]
        shown[i] = text
        return piece

    for step in iter_generate(model, ids, **kwargs):
        out = []
        for i, t in enumerate(step.tolist()):
            if not finished[i]:
                if _until_stop([t], model.vocab):
                    produced[i].append(t)
                else:
                    finished[i] = True
            out.append(new_text(i, finished[i]))
        yield out
    rest = [new_text(i, True) for i in range(B)]  # rows cut by max_new_tokens: flush what was held back
    if any(rest):
        yield rest


class Chat:
    """A conversation with a checkpoint that keeps its history across calls.

    >>> chat = omni.Chat(model)
    >>> chat([omni.Image("cat.png"), "What is this?"])   # a user turn: text and media pieces
    'A cat.'
    >>> chat("What colour is it?")                      # answered with the whole history in view
    """

    def __init__(self, model, system: str | None = None):
        self.model = model
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def __call__(self, content, **generate_kwargs):
        """Add a user turn (a str or a list of text / media pieces), answer it (a str; with
        ``stream=True`` an iterator of text pieces), and keep both in the history."""
        if isinstance(content, str) and not content.strip() or isinstance(content, list) and not content:
            raise ValueError("the user turn is empty")
        turn = {"role": "user", "content": content}
        if generate_kwargs.get("stream"):
            return self._stream(turn, generate_kwargs)
        reply = self.model.generate(self.messages + [turn], **generate_kwargs)
        self.messages += [turn, {"role": "assistant", "content": reply.strip()}]
        return reply

    def _stream(self, turn: dict, generate_kwargs: dict) -> Iterator[str]:
        pieces = []
        for piece in self.model.generate(self.messages + [turn], **generate_kwargs):
            pieces.append(piece)
            yield piece
        self.messages += [turn, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        """Forget every turn but the system prompt."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
