"""Export an omni text model as a GGUF file (llama.cpp's format) through the ``gguf`` package's
``GGUFWriter``: the inverse of :mod:`omni.model.gguf_import`.

The language model is taken as :mod:`omni.model.hf_export` takes it (LoRA merged, the same
refusals, ``vocab`` full or model), then renamed to GGUF's tensor names; llama's Q and K rows are
permuted into llama.cpp's rotary layout (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``), qwen2's
are written as they are. Matrices are stored as ``f32``, ``f16`` or ``q8_0`` (a matrix whose rows
are not a multiple of 32 values falls back to f16, as llama.cpp's converter does); norms and biases
are always f32. The tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE) tokenizer: tokens,
types (control for special tokens, omni's markers included; user-defined for other added tokens),
merges, the ``tokenizer.ggml.pre`` whose split behaves as the tokenizer's, special ids, add_bos and
the chat template.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from omni.io import default_mode, fsync_dir
from omni.model.gguf_import import BLOCK_NAMES, TOP_NAMES
from omni.model.hf_export import architecture, check_out, is_whisper_model, lm_rows, lm_state
from omni.model.omni_model import OmniModel
from omni.tokenizers.bpe import CONTROL, PRE_TOKENIZERS, USER_DEFINED, BPETokenizer
from omni.tokenizers.whisper import WhisperTokenizer

log = logging.getLogger(__name__)

TYPES = ("f32", "f16", "q8_0")
NORMAL, UNUSED = 1, 5  # llama.cpp's token types
Q8_BLOCK = 32
# text whose pre-tokenizer split tells the tokenizer.ggml.pre names apart
_PROBE = ("Hello world's 12345 don't  stop\n\n  x\t中文字符 naïve!! ?? 3.14 I'M HERE ''", "  a  b   ")
_HF_TO_GGUF = {**{v: k for k, v in BLOCK_NAMES.items()}, **{v: k for k, v in TOP_NAMES.items()}}


def export_gguf(model: OmniModel, tokenizer, out: str | Path, dtype: str = "f16", vocab: str = "full",
                overwrite: bool = False) -> Path:
    """Write ``model`` with its BPE ``tokenizer`` as one GGUF file: ``out`` itself when it ends in
    ``.gguf``, else ``out/model-<dtype>.gguf``; written to a temporary file and renamed into place."""
    import gguf

    if dtype not in TYPES:
        raise ValueError(f"--dtype {dtype!r} is not a GGUF export type; choose from {', '.join(TYPES)}")
    out = Path(out)
    file = out if out.suffix == ".gguf" else out / f"model-{dtype}.gguf"
    if file.exists() and not overwrite:
        raise ValueError(f"{file}: already exists; choose another --out, or pass --overwrite")
    if out.suffix != ".gguf":
        check_out(out, overwrite)
    arch = gguf_architecture(model)
    if not isinstance(tokenizer, BPETokenizer) or isinstance(tokenizer, WhisperTokenizer):
        raise ValueError("GGUF export writes llama.cpp's byte-level BPE tokenizer; this model's tokenizer "
                         f"is {type(tokenizer).__name__} (omni's own SentencePiece models: use --to hf)")
    rows = lm_rows(model, tokenizer, vocab)
    b = model.config.backbone
    tokens, types, merges, pre = _tokenizer(tokenizer, rows)

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(str(b.extra.get("name", "omni export")))
        w.add_block_count(b.num_layers)
        w.add_context_length(b.max_seq_len)
        w.add_embedding_length(b.dim)
        w.add_feed_forward_length(b.ffn_dim)
        w.add_head_count(b.num_heads)
        w.add_head_count_kv(b.num_kv_heads)
        w.add_key_length(b.head_dim)
        w.add_value_length(b.head_dim)
        w.add_rope_dimension_count(b.head_dim)
        w.add_rope_freq_base(b.rope_theta)
        w.add_layer_norm_rms_eps(b.norm_eps)
        w.add_vocab_size(rows)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        v = tokenizer.vocab
        w.add_bos_token_id(v.bos_id)
        w.add_eos_token_id(v.eos_id)
        w.add_pad_token_id(v.pad_id)
        w.add_unk_token_id(v.unk_id)
        w.add_add_bos_token(tokenizer.add_bos)
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        for name, t in lm_state(model, rows).items():
            gname = gguf_name(name)
            x = t.float().numpy()
            if arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
                x = permute(x, b.num_heads if ".attn_q." in gname else b.num_kv_heads)
            _add(w, gguf, gname, x, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, default_mode())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(file.parent)
    return file


def gguf_architecture(model: OmniModel) -> str:
    """``llama`` or ``qwen2``; what GGUF cannot hold here is a ``ValueError`` naming it."""
    if is_whisper_model(model):
        raise ValueError("GGUF export is for llama / qwen2 text models; an imported Whisper exports --to hf "
                         "(WhisperForConditionalGeneration)")
    arch = architecture(model)  # the refusals transformers' classes need, named
    if model.encoders or model.config.contrastive or model.config.blip2:
        raise ValueError(f"GGUF export writes a language model alone; this model also has "
                         f"{', '.join(model.encoders) or 'a pair objective head'} (use --to hf, which writes "
                         "the media encoders beside the language model)")
    scaling = model.config.backbone.rope_scaling
    if scaling:
        raise ValueError(f"GGUF export of rope scaling ({scaling.get('rope_type')}) is not "
                         "supported (llama.cpp keeps it as a rope_freqs tensor); use --to hf")
    return "llama" if arch == "mistral" else arch


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_HF_TO_GGUF[rest]}.{kind}"
    return f"{_HF_TO_GGUF[stem]}.{kind}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``permute``: per head, rows (half, pair) -> (pair, half); gguf_import's
    ``_unpermute`` undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(w, gguf, name: str, x: np.ndarray, dtype: str) -> None:
    if x.ndim == 1 or dtype == "f32":
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    elif dtype == "q8_0" and x.shape[-1] % Q8_BLOCK == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x, np.float32), q), raw_dtype=q)
    else:
        if dtype == "q8_0":
            log.warning("%s: rows of %d values are not whole q8_0 blocks of %d; stored as f16",
                        name, x.shape[-1], Q8_BLOCK)
        w.add_tensor(name, np.ascontiguousarray(x, np.float16))


def _tokenizer(tokenizer: BPETokenizer, rows: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, tokenizer.ggml.pre) for the first ``rows`` ids; ids past the
    tokenizer's (padding) are ``[PAD<i>]`` of type unused, as llama.cpp's converter writes them."""
    from tokenizers import Tokenizer

    raw = json.loads(tokenizer.tokenizer_json())
    if raw["model"].get("type") != "BPE":
        raise ValueError(f"{tokenizer.source}: GGUF export needs a BPE tokenizer, this one is "
                         f"{raw['model'].get('type')}")
    if raw.get("normalizer"):
        raise ValueError(f"{tokenizer.source}: the tokenizer has a normalizer, which llama.cpp's gpt2 "
                         "tokenizer does not apply")
    tok = Tokenizer.from_str(tokenizer.tokenizer_json())
    added = {t["id"]: t for t in raw["added_tokens"]}
    tokens, types = [], []
    for i in range(rows):
        piece = tok.id_to_token(i) if i < tokenizer.num_ids else None
        if piece is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(piece)
            types.append((CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"]["merges"]]
    return tokens, types, merges, _pre_name(tok, tokenizer.source)


def _pre_name(tok, source: str) -> str:
    """The ``tokenizer.ggml.pre`` whose split (:data:`PRE_TOKENIZERS`) is ``tok``'s on probe text."""
    from tokenizers import pre_tokenizers

    if tok.pre_tokenizer is None:
        raise ValueError(f"{source}: the tokenizer has no pre-tokenizer; GGUF's gpt2 tokenizer needs one")

    def split(pre) -> list:
        return [[p for p, _ in pre.pre_tokenize_str(text)] for text in _PROBE]

    mine = split(tok.pre_tokenizer)
    for name, make in PRE_TOKENIZERS.items():
        if split(pre_tokenizers.Sequence(make())) == mine:
            return name
    raise ValueError(f"{source}: the tokenizer's pre-tokenizer splits text like none of the llama.cpp "
                     f"pre-tokenizers omni knows ({', '.join(PRE_TOKENIZERS)}); GGUF export is not supported")
