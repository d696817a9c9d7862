"""The any-to-any facade: load a checkpoint, import one, and generate from prompts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from omni.generation import generate, iter_generate, left_pad
from omni.sequence import Message, Sample, Segment, render

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
    """The output modalities ``generate(..., output=...)`` supports for a checkpoint (audio output
    through the API lands with the audio issue; ``omni.generation.generate_audio_codes`` exists)."""
    return ["text"]


def _prompt_sample(model, prompt) -> Sample:
    """One prompt -> a Sample: text alone is continued as a document; a prompt with media is a
    user turn that the model answers."""
    pieces = [prompt] if isinstance(prompt, str) else list(prompt)
    if not pieces or all(isinstance(p, str) and not p for p in pieces):
        raise ValueError("the prompt is empty")
    segments = []
    for piece in pieces:
        if isinstance(piece, str):
            segments.append(Segment(text=piece))
            continue
        modality = _modality_of(piece)
        if modality is None:
            raise ValueError(f"a prompt piece must be text, omni.Audio, omni.Image or omni.Video; "
                             f"got {type(piece).__name__}")
        if modality not in model.encoders:
            raise ValueError(f"this checkpoint cannot read {modality}; it reads: {', '.join(reads(model))}")
        data, grid = model.encoders[modality].prepare(piece)
        segments.append(Segment(modality, data=data, grid=grid))
    if all(seg.modality == "text" for seg in segments):
        return Sample([Message(None, segments)])
    return Sample([Message("user", segments)])


def is_batch(prompts) -> bool:
    """A str or a list of pieces is one prompt; a list of lists is a batch of prompts."""
    return (isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and all(isinstance(p, (list, tuple)) for p in prompts))


def render_prompts(model, prompts: list) -> tuple[list, dict]:
    """Render and left-pad a batch of prompts: the rendered samples and the generation inputs."""
    rendered = [render(_prompt_sample(model, p), model.tokenizer, vocab=model.vocab,
                       audio_pattern=model.config.audio_pattern, mrope=model.uses_mrope,
                       add_generation_prompt=True) for p in prompts]
    for r in rendered:
        model._check_length(len(r), "the prompt")
    ids, mask = left_pad([r.ids for r in rendered], model.vocab.pad_id)
    inputs = dict(attention_mask=mask)
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
                          stream: bool = False, **sampling):
    """Generate for one prompt (a str, or a list of pieces) or a batch (a list of such lists).

    Returns a str for one prompt, a list of str for a batch; with ``stream=True`` an iterator
    of text pieces (one prompt) or of lists of pieces (a batch).
    """
    if output not in outputs(model):
        raise ValueError(f"output={output!r} is not supported by this checkpoint; it can produce: "
                         f"{', '.join(outputs(model))}")
    if model.tokenizer is None:
        raise ValueError("this model has no text tokenizer; pass token ids (a LongTensor) instead of strings")
    batch = list(prompts) if is_batch(prompts) else [prompts]
    rendered, inputs = render_prompts(model, batch)
    ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
    kwargs = dict(max_new_tokens=max_new_tokens, allowed=model.vocab.span(output), **inputs, **sampling)
    single = not is_batch(prompts)
    prompt_ids = [r.ids.tolist() for r in rendered]
    if stream:
        pieces = _stream_text(model, ids, prompt_ids, kwargs)
        return (p[0] for p in pieces) if single else pieces
    new = generate(model, ids, **kwargs)
    texts = [model.tokenizer.decode_continuation(_until_stop(row.tolist(), model.vocab), prompt)
             for row, prompt in zip(new, prompt_ids)]
    return texts[0] if single else texts


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
