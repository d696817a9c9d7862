"""The any-to-any facade: load a checkpoint, import one, and the calls the CLI and docs use.

``omni.load`` returns a :class:`~omni.pipeline.Pipeline` (the model and its processor); the
functions here take one (or a model, which gets its processor) and are what ``omni transcribe``,
``omni caption`` and ``omni generate`` run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from omni.model.gguf_import import import_gguf
from omni.model.hf_import import import_hf as _import_hf
from omni.pipeline import Pipeline, is_batch
from omni.processor import Processor

__all__ = [
    "Chat",
    "Pipeline",
    "describe",
    "import_hf",
    "is_batch",
    "load",
    "media_for",
    "outputs",
    "reads",
    "render_prompts",
]


def load(path: str | Path, device: str | torch.device = "cpu") -> Pipeline:
    """Load an omni checkpoint directory (config.json + model.safetensors + tokenizer/ + codec/)."""
    return Pipeline.from_pretrained(path, device=device)


def import_hf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Pipeline:
    """A local Llama- or Qwen2-family checkpoint -> an omni model with the same logits, with its
    tokenizer and chat template when it has them: a transformers folder (config.json + safetensors
    + tokenizer.json), or a ``.gguf`` file (or a folder holding one; weights dequantized)."""
    path = Path(path)
    is_gguf = path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()
                                        and any(path.glob("*.gguf")))
    load = import_gguf if is_gguf else _import_hf
    model, tokenizer = load(path, device=device, dtype=dtype)
    return Pipeline(model, tokenizer=tokenizer)


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
