"""The any-to-any facade: load a checkpoint, import one, and the calls the CLI and docs use.

``omni.load`` returns a :class:`~omni.pipeline.Pipeline` (the model and its processor); the
functions here take one (or a model, which gets its processor) and are what ``omni transcribe``,
``omni caption`` and ``omni generate`` run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from omni.io import atomic_write_json
from omni.model.gguf_export import export_gguf
from omni.model.gguf_import import import_gguf
from omni.model.hf_export import export_hf
from omni.model.hf_import import import_hf as _import_hf
from omni.model.quant import quantize_int8
from omni.model.whisper import import_whisper, is_whisper
from omni.pipeline import Pipeline, is_batch
from omni.processor import Processor, modality_of

__all__ = [
    "Chat",
    "Pipeline",
    "describe",
    "export",
    "import_hf",
    "is_batch",
    "load",
    "media_for",
    "outputs",
    "reads",
    "render_prompts",
]


def load(path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None) -> Pipeline:
    """Load an omni checkpoint directory (config.json + model.safetensors + tokenizer/ + codec/).
    ``quantize="int8"``: the language model's linear layers as int8 weights with per-channel scales
    (:func:`omni.model.quant.quantize_int8`), a quarter of the bytes a decoding step reads, for
    inference only."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: the choices are None and 'int8'")
    pipe = Pipeline.from_pretrained(path, device=device)
    if quantize:
        quantize_int8(pipe.model)
    return pipe


def import_hf(
    path: str | Path | list, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Pipeline:
    """A local checkpoint -> an omni model with the same logits, with its tokenizer (and chat
    template) when it has them: a Llama- or Qwen2-family transformers folder (config.json +
    safetensors + tokenizer.json) or ``.gguf`` file (or a folder holding one; weights dequantized),
    or a Whisper folder, transformers' or CTranslate2's (a list of folders when its model.bin parts
    are spread over several)."""
    if isinstance(path, (list, tuple)) or is_whisper(path):
        load = import_whisper
    else:
        path = Path(path)
        is_gguf = path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()
                                            and any(path.glob("*.gguf")))
        load = import_gguf if is_gguf else _import_hf
    model, tokenizer = load(path, device=device, dtype=dtype)
    return Pipeline(model, tokenizer=tokenizer)


EXPORT_FORMATS = ("hf", "gguf")


def export(model, out: str | Path, to: str = "hf", dtype: str | None = None, vocab: str = "full",
           overwrite: bool = False) -> Path:
    """Write ``model`` (a pipeline, or a checkpoint folder's path) for other tools: ``to="hf"`` a
    transformers folder (``dtype`` f32 (default), f16 or bf16), ``to="gguf"`` a GGUF file for
    llama.cpp (f32, f16 (default) or q8_0). LoRA adapters are merged; ``vocab="model"`` drops omni's
    markers from an imported model's vocabulary (docs/checkpoints.md, "Export"). Returns the
    folder or file written."""
    if to not in EXPORT_FORMATS:
        raise ValueError(f"export format {to!r} is not one of {', '.join(EXPORT_FORMATS)}")
    pipe = load(model) if isinstance(model, (str, Path)) else pipeline(model)
    if to == "hf":
        return export_hf(pipe.model, pipe.tokenizer, out, dtype or "f32", vocab, overwrite)
    return export_gguf(pipe.model, pipe.tokenizer, out, dtype or "f16", vocab, overwrite)


def pipeline(model) -> Pipeline:
    """``model`` as a pipeline: a Pipeline as it is, an OmniModel with its processor."""
    return model if isinstance(model, Pipeline) else Pipeline(model)


def processor(model) -> Processor:
    return pipeline(model).processor


def reads(model) -> list[str]:
    """The input modalities a checkpoint understands."""
    return processor(model).reads()


def outputs(model) -> list[str]:
    """The output modalities ``generate(..., output=...)`` supports for a checkpoint."""
    return processor(model).outputs()


def media_for(model, path):
    """A media file as a prompt piece, by suffix (video sampled as the checkpoint was trained)."""
    return processor(model).media_for(path)


def render_prompts(model, prompts: list, output: str = "text") -> tuple[list, dict]:
    """Render and left-pad a batch of prompts: the rendered samples and the generation inputs."""
    return processor(model).batch(prompts, output)


def describe(model, paths, **kwargs) -> list:
    """Text for each media file: :meth:`omni.pipeline.Pipeline.describe`."""
    return pipeline(model).describe(paths, **kwargs)


class Chat:
    """A conversation with a checkpoint that keeps its history across calls.

    >>> chat = omni.Chat(model)
    >>> chat([omni.Image("cat.png"), "What is this?"])   # a user turn: text and media pieces
    'A cat.'
    >>> chat("What colour is it?")                      # answered with the whole history in view
    """

    def __init__(self, model, system: str | None = None):
        self.model = pipeline(model)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.attached: list = []  # media for the next user turn

    def attach(self, path) -> None:
        """Add a media file (image, audio or video, by suffix) to the next user turn. It is read now,
        so a file this checkpoint cannot read raises here (a ValueError naming it)."""
        proc = self.model.processor
        piece = next(proc.pieces(path, None))
        proc.prepare(modality_of(piece), piece)
        self.attached.append(piece)

    def __call__(self, content, **generate_kwargs):
        """Add a user turn (a str or a list of text / media pieces, after the attached files),
        answer it (a str; with ``stream=True`` an iterator of text pieces), and keep both in the
        history."""
        if isinstance(content, str) and not content.strip() or isinstance(content, list) and not content:
            raise ValueError("the user turn is empty")
        if self.attached:
            content = self.attached + ([content] if isinstance(content, str) else list(content))
        turn = {"role": "user", "content": content}
        if generate_kwargs.get("stream"):
            return self._stream(turn, generate_kwargs)
        reply = self.model.generate(self.messages + [turn], **generate_kwargs)
        self._keep(turn, reply)
        return reply

    def _stream(self, turn: dict, generate_kwargs: dict) -> Iterator[str]:
        pieces = []
        for piece in self.model.generate(self.messages + [turn], **generate_kwargs):
            pieces.append(piece)
            yield piece
        self._keep(turn, "".join(pieces))

    def _keep(self, turn: dict, reply: str) -> None:
        self.messages += [turn, {"role": "assistant", "content": reply.strip()}]
        self.attached = []

    def reset(self) -> None:
        """Forget every turn but the system prompt, and the attached files."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.attached = []

    def save(self, path: str | Path) -> Path:
        """The conversation as JSON, ``{"messages": [{"role", "content"}, ...]}`` as OpenAI writes
        messages (media parts as ``{"type": "image", "path": ...}``), written atomically."""
        messages = [{"role": m["role"], "content": _json_content(m["content"])} for m in self.messages]
        atomic_write_json(path, {"messages": messages})
        return Path(path)


def _json_content(content):
    """A message's content for JSON: a str as it is, a list of pieces as OpenAI-style parts."""
    if isinstance(content, str):
        return content
    parts = []
    for piece in content:
        if isinstance(piece, str):
            parts.append({"type": "text", "text": piece})
        else:
            source = getattr(piece, "path", None) or getattr(piece, "source", None)
            path = str(source) if isinstance(source, (str, Path)) else None  # None: made from a tensor
            parts.append({"type": modality_of(piece), "path": path})
    return parts
