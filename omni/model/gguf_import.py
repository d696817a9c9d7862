"""Import a llama- or qwen2-architecture GGUF file (llama.cpp's format) as an ``OmniModel`` plus its
BPE tokenizer.

The file is read with the ``gguf`` package (``GGUFReader``); every tensor is dequantized to fp32
(then the requested dtype). GGUF metadata becomes a transformers-style config dict and GGUF tensor
names become transformers names, so ``hf_import`` does the rest::

    token_embd -> model.embed_tokens       blk.N.attn_{q,k,v}  -> model.layers.N.self_attn.{q,k,v}_proj
    output_norm -> model.norm              blk.N.attn_output   -> model.layers.N.self_attn.o_proj
    output -> lm_head (absent: tied)       blk.N.ffn_{gate,up,down} -> model.layers.N.mlp.*_proj
                                           blk.N.attn_norm / ffn_norm -> input_ / post_attention_layernorm

llama.cpp's converter permutes the rows of llama's Q and K projections (weights and biases) into
its rotary layout (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``); the import undoes that.
qwen2 is written unpermuted. The tokenizer's appended omni markers get embedding (and untied
lm_head) rows initialised to the mean of the model's rows. Named ``gguf_import`` after
``hf_import``, and so as not to be mistaken for the ``gguf`` package.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import torch

from omni.model.hf_import import (
    TensorSource,
    check_dtype,
    hf_config_to_omni,
    model_from_tensors,
    with_appended_rows,
)
from omni.model.omni_model import OmniModel
from omni.tokenizers.bpe import BPETokenizer

ARCHITECTURES = ("llama", "qwen2")
_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def import_gguf(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[OmniModel, BPETokenizer]:
    """A ``.gguf`` file (or a folder holding one model, or one part of a split model) -> the
    ``OmniModel`` (eval mode) with the file's logits for the model's ids, and its tokenizer, whose
    vocabulary (omni's markers appended) is ``model.config.vocab``."""
    dtype = check_dtype(dtype)
    file = GGUFFile(path)
    tokenizer = BPETokenizer.from_gguf_metadata(file.meta, source=file.source)
    source = _GGUFTensors(file, tokenizer.vocab.text_size)
    config = hf_config_to_omni(gguf_config(file.meta, file.source, set(file.tensors), source.rows),
                               source=file.source)
    config = dataclasses.replace(config, vocab=tokenizer.vocab)
    return model_from_tensors(config, source, device, dtype), tokenizer


def read_gguf_tokenizer(path: str | Path) -> BPETokenizer:
    """Only the tokenizer of a GGUF file (see :func:`import_gguf` for ``path``)."""
    file = GGUFFile(path)
    return BPETokenizer.from_gguf_metadata(file.meta, source=file.source)


# ---------------------------------------------------------------------------------------------
# Files


def gguf_files(path: str | Path) -> list[Path]:
    """The files of one GGUF model, in order: ``path`` itself, the one model in a folder, or every
    part ``<name>-0000i-of-0000N.gguf`` of a split model; missing parts are a ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        models = sorted({_model_name(p) for p in files})
        if len(models) != 1:
            raise ValueError(f"{path}: expected one GGUF model in the folder, found "
                             f"{', '.join(models) if models else 'none'}")
        path = files[0]
    if not path.is_file():
        raise ValueError(f"{path}: GGUF file not found")
    split = _SPLIT.match(path.name)
    if split is None:
        return [path]
    count = int(split["count"])
    parts = [path.with_name(f"{split['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"{path}: split GGUF model is missing part(s) {', '.join(missing)}")
    return parts


def _model_name(file: Path) -> str:
    """``name.gguf`` -> itself; a split part ``name-00002-of-00003.gguf`` -> ``name-*-of-00003.gguf``."""
    return _SPLIT.sub(r"\g<prefix>-*-of-\g<count>.gguf", file.name)


class GGUFFile:
    """The metadata (key -> Python value; the first part's, for a split model) and the tensors of one
    GGUF model, opened with ``gguf.GGUFReader`` (memory-mapped)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.files = gguf_files(path)
        self.source = str(self.files[0])
        self.tensors: dict = {}  # GGUF name -> (ReaderTensor, file)
        self.meta: dict = {}
        for i, file in enumerate(self.files):
            try:
                reader = GGUFReader(file)
                meta = {k: f.contents() for k, f in reader.fields.items()} if i == 0 else {}
            except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
                unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
                problem = (f"a tensor has unknown quantisation type {unknown[1]}" if unknown else
                           f"not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})")
                raise ValueError(f"{file}: {problem}") from None
            self.meta = self.meta or meta
            self.tensors.update({t.name: (t, file) for t in reader.tensors})
        expected = self.meta.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise ValueError(f"{self.source}: the split model should hold {expected} tensors, its "
                             f"{len(self.files)} part(s) hold {len(self.tensors)}")

    def tensor(self, name: str) -> torch.Tensor:
        """The GGUF tensor ``name`` dequantized to fp32, in transformers' (out, in) layout."""
        from gguf.quants import dequantize

        t, file = self.tensors[name]
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{file}: tensor {name!r} has quantisation type {t.tensor_type.name}, which the "
                             "gguf package cannot dequantize") from None
        shape = tuple(int(n) for n in reversed(t.shape))
        return torch.from_numpy(np.require(data, np.float32, ["W"]).reshape(shape))  # F32 is a read-only view


# ---------------------------------------------------------------------------------------------
# Config and tensors


def gguf_config(meta: dict, source: str, tensor_names: set[str], rows: int) -> dict:
    """GGUF metadata (and tensor names, embedding rows) -> a transformers ``config.json`` dict for
    ``hf_config_to_omni``."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported; "
                         f"supported: {', '.join(ARCHITECTURES)}")

    def key(name: str, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{source}: metadata {arch}.{name} is missing")
        return value

    heads, dim = int(key("attention.head_count")), int(key("embedding_length"))
    head_dim = int(key("attention.key_length", dim // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{source}: rotary embeddings on part of each head ({arch}.rope.dimension_count="
                         f"{meta[f'{arch}.rope.dimension_count']}, head size {head_dim}) are not supported")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: rope scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not "
                         "supported for GGUF files")
    return {
        "model_type": arch,
        "hidden_size": dim,
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(key("feed_forward_length")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": rows,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


class _GGUFTensors(TensorSource):
    """A GGUF file's tensors under transformers' names: dequantized, llama's Q/K rows unpermuted,
    the embedding and lm_head grown to ``text_size`` rows."""

    def __init__(self, file: GGUFFile, text_size: int):
        self.file, self.text_size = file, text_size
        self.hf_names = {self._hf_name(n): n for n in file.tensors}
        self.names = set(self.hf_names)
        if "token_embd.weight" not in file.tensors:
            raise ValueError(f"{file.source}: tensor 'token_embd.weight' is missing")
        embd = file.tensors["token_embd.weight"][0]
        self.rows = int(embd.shape[-1])  # ggml order: (dim, rows)
        base = len(file.meta.get("tokenizer.ggml.tokens", ()))
        if base != self.rows:
            raise ValueError(f"{file.source}: the tokenizer has {base} tokens but the embedding has "
                             f"{self.rows} rows; they must match")

    def _hf_name(self, name: str) -> str:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m and m[2] in BLOCK_NAMES:
            return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.{m[3]}"
        m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
        if m and m[1] in TOP_NAMES:
            return f"{TOP_NAMES[m[1]]}.{m[2]}"
        raise ValueError(f"{self.file.source}: unexpected tensor {name!r} for a "
                         f"{self.file.meta.get('general.architecture')} model")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.hf_names:
            raise ValueError(f"{self.file.source}: tensor {name!r} is missing")
        gguf_name = self.hf_names[name]
        t = self.file.tensor(gguf_name)
        arch, meta = self.file.meta["general.architecture"], self.file.meta
        if arch == "llama" and re.search(r"\.attn_[qk]\.", gguf_name):
            heads = meta[f"{arch}.attention.head_count"]
            if ".attn_k." in gguf_name:
                heads = meta.get(f"{arch}.attention.head_count_kv", heads)
            t = _unpermute(t, int(heads))
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = with_appended_rows(t, self.rows, self.text_size)
        return t

    def where(self, name: str) -> Path:
        return self.file.tensors[self.hf_names[name]][1] if name in self.hf_names else Path(self.file.source)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: per head, rows (pair, half) -> (half, pair) back to transformers'."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
