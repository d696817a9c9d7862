"""Import Llama / Qwen2 / Mistral weights from a local transformers checkpoint into an ``OmniModel``.

Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) with safetensors only; pickled ``.bin`` files are refused. The
HF projections are fused into the backbone's layout while loading:

    self_attn.{q,k,v}_proj   -> attn.wqkv   (rows, and Qwen2 biases, in q, k, v order)
    self_attn.o_proj         -> attn.wo
    mlp.{gate,up}_proj       -> ffn.w13     (rows: gate then up)
    mlp.down_proj            -> ffn.w2
    input_layernorm          -> attn_norm
    post_attention_layernorm -> ffn_norm

The model is built on the meta device and filled tensor by tensor, so there is no random-init
cost and no second full copy of the weights in memory. :func:`model_from_tensors` does that for any
source of transformers-named tensors: the safetensors files here, a GGUF file in ``omni.model.gguf``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from omni.io import read_json
from omni.model.backbone import BackboneConfig
from omni.model.omni_model import OmniConfig, OmniModel
from omni.tokenizers.bpe import BPETokenizer
from omni.vocab import Vocab

log = logging.getLogger(__name__)

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Tensors some checkpoints carry that the backbone recomputes; safe to skip.
_IGNORABLE = ("rotary_emb.inv_freq",)


def import_hf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> tuple[OmniModel, BPETokenizer | None]:
    """A local transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM``
    checkpoint directory -> an ``OmniModel`` (in eval mode) with the same logits, and its tokenizer
    when the folder has ``tokenizer.json`` (omni's markers appended as new ids, their embedding rows
    the mean of the model's; ``config.vocab`` is the tokenizer's), else None: ids in, ids out.
    ``config.backbone.extra`` records where it came from, including the checkpoint's bos/eos ids.
    """
    path = Path(path)
    dtype = check_dtype(dtype)
    if not path.is_dir():
        raise ValueError(f"{path}: checkpoint directory not found")
    raw = _read_config(path)
    config = hf_config_to_omni(raw, source=str(path / CONFIG_FILE))
    source: TensorSource = _Reader(_weight_files(path), path)
    tokenizer = BPETokenizer.from_transformers(path, text_size=config.vocab.text_size)
    if tokenizer is not None:
        if tokenizer.model_ids > config.vocab.text_size:
            raise ValueError(f"{path}: tokenizer.json has {tokenizer.model_ids} ids but the embedding "
                             f"{config.vocab.text_size} rows (config vocab_size)")
        source = _WithMarkerRows(source, tokenizer.model_ids, tokenizer.vocab.text_size)
        config = dataclasses.replace(config, vocab=tokenizer.vocab)
    return model_from_tensors(config, source, device, dtype), tokenizer


def check_dtype(dtype) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) as a floating torch dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError("dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), "
                         f"got {dtype!r}")
    return dtype


def model_from_tensors(config: OmniConfig, source: TensorSource, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> OmniModel:
    """The ``OmniModel`` of ``config`` (in eval mode), filled from ``source``'s transformers-named
    tensors; a missing, misshapen or unexpected tensor is a ``ValueError`` naming its file."""
    with torch.device("meta"):
        model = OmniModel(config)
    model.to(dtype)
    model.to_empty(device=device)
    # inv_freq is not in the file and must stay float32 (it was cast by .to(dtype) above).
    model.backbone.rotary.float()
    model.backbone.rotary.reset_buffers()
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    _load_weights(model, source)
    model.backbone.set_attn_backend(config.backbone.attn_backend, torch.device(device))
    return model.eval()


def with_appended_rows(weight: torch.Tensor, base: int, size: int) -> torch.Tensor:
    """An embedding (or lm_head) matrix for a vocabulary of ``size`` ids whose first ``base`` are the
    model's own: rows ``base..size-1`` (ids appended to the tokenizer) are the mean of rows ``0..base-1``."""
    out = weight.new_empty(max(size, weight.shape[0]), *weight.shape[1:])
    out[:weight.shape[0]] = weight
    out[base:size] = weight[:base].mean(0)
    return out


# ---------------------------------------------------------------------------------------------
# Config


def _read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a transformers checkpoint ({CONFIG_FILE} is missing)")
    return read_json(cfg_file)


def hf_config_to_omni(raw: dict, source: str = CONFIG_FILE) -> OmniConfig:
    """A transformers ``config.json`` dict -> ``OmniConfig``; anything the backbone cannot
    reproduce exactly is a ``ValueError`` naming the key."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(SUPPORTED))} ({', '.join(SUPPORTED.values())})")

    def need(key):
        if raw.get(key) is None:
            raise ValueError(f"{source}: required key {key!r} is missing")
        return raw[key]

    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (the backbone uses SwiGLU, 'silu')")
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported (the backbone's SwiGLU has no biases)")
    if raw.get("pretraining_tp", 1) not in (1, None):
        log.info("%s: ignoring pretraining_tp=%s (it only changes how transformers splits matmuls)",
                 source, raw["pretraining_tp"])

    num_heads = int(need("num_attention_heads"))
    dim = int(need("hidden_size"))
    qkv_bias = model_type == "qwen2" or bool(raw.get("attention_bias", False))
    theta, scaling = _rope(raw, source)
    max_seq_len = int(raw.get("max_position_embeddings") or 2048)
    window = _sliding_window(raw, model_type, int(need("num_hidden_layers")))
    if window is not None and window < max_seq_len:
        # Up to `window` tokens, sliding-window attention is exactly full causal attention, so
        # capping the context keeps the imported model exact instead of silently diverging.
        log.warning("%s: the checkpoint uses sliding-window attention (window %d) which omni's backbone "
                    "does not implement; capping max_seq_len from %d to %d so results stay exact",
                    source, window, max_seq_len, window)
        max_seq_len = window

    extra = {"imported_from": model_type, "architecture": SUPPORTED[model_type]}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if raw.get(key) is not None:
            extra[key] = raw[key]
    backbone = BackboneConfig(
        dim=dim,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        ffn_dim=int(need("intermediate_size")),
        head_dim=int(raw["head_dim"]) if raw.get("head_dim") else None,
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        extra=extra,
    )
    vocab = Vocab(text_size=int(need("vocab_size")), specials={})
    return OmniConfig(backbone, vocab, tie_embeddings=bool(raw.get("tie_word_embeddings", False)))


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 ``rope_parameters`` or the older
    top-level ``rope_theta`` + ``rope_scaling``."""
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope_parameters ({sorted(params)}) are not supported")
    old = raw.get("rope_scaling") or {}
    if not isinstance(old, dict):
        raise ValueError(f"{source}: rope_scaling must be an object, got {old!r}")
    merged = {**old, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{source}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return float(theta), None
    missing = [k for k in _LLAMA3_KEYS if merged.get(k) is None]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling needs {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: merged[k] for k in _LLAMA3_KEYS}}


def _sliding_window(raw: dict, model_type: str, num_layers: int) -> int | None:
    """The attention window transformers would apply to some layer of this checkpoint, or None."""
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "qwen2":
        if not raw.get("use_sliding_window", False):
            return None  # transformers' Qwen2Config drops the window in that case
        types = raw.get("layer_types")
        if types is not None:
            return int(window) if "sliding_attention" in types else None
        max_window_layers = raw.get("max_window_layers", 28)
        return int(window) if num_layers > max_window_layers else None
    return int(window)  # mistral: every layer


# ---------------------------------------------------------------------------------------------
# Weights


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object")
        return {name: path / fname for name, fname in weight_map.items()}
    single = path / WEIGHTS_FILE
    if single.is_file():
        return {name: single for name in _keys(single)}
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{path}: only pickled weights found ({', '.join(pickled[:3])}); "
                         "omni never unpickles files it is handed. Re-save the checkpoint as safetensors "
                         "(load it in transformers and call model.save_pretrained(dir); "
                         "transformers 4 needs safe_serialization=True) and import that")
    raise ValueError(f"{path}: no weights found (expected {WEIGHTS_FILE} or {INDEX_FILE})")


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises SafetensorError with a terse message
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None


class TensorSource:
    """Where the tensors of a checkpoint come from, under transformers' names (``model.layers.0....``)."""

    names: set[str]  # every tensor the source holds

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; a missing or unreadable one is a ``ValueError`` naming the file."""
        raise NotImplementedError

    def where(self, name: str) -> Path:
        """The file that holds ``name`` (or would), for error messages."""
        raise NotImplementedError


class _WithMarkerRows(TensorSource):
    """``source`` with the embedding and lm_head grown to ``size`` rows for ids appended after its
    ``base`` (:func:`with_appended_rows`)."""

    def __init__(self, source: TensorSource, base: int, size: int):
        self.source, self.base, self.size, self.names = source, base, size, source.names

    def get(self, name: str) -> torch.Tensor:
        t = self.source.get(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = with_appended_rows(t, self.base, self.size)
        return t

    def where(self, name: str) -> Path:
        return self.source.where(name)


class _Reader(TensorSource):
    """Opens each safetensors file once (memory-mapped) and reads tensors on demand."""

    def __init__(self, files: dict[str, Path], root: Path):
        self.files, self.root = files, root
        self.names = set(files)
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise ValueError(f"{self.where(name)}: tensor {name!r} is missing")
        try:
            if file not in self._open:
                if not file.is_file():
                    raise ValueError(f"{file}: shard listed in {INDEX_FILE} not found")
                self._open[file] = safe_open(file, framework="pt")
            handle = self._open[file]
            if name not in handle.keys():
                raise ValueError(f"{file}: tensor {name!r} is missing")
            return handle.get_tensor(name)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None

    def where(self, name: str) -> Path:
        if name in self.files:
            return self.files[name]
        return self.root / (INDEX_FILE if (self.root / INDEX_FILE).is_file() else WEIGHTS_FILE)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, where: Path) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{where}: tensor {name!r} has shape {tuple(src.shape)}, the config implies "
                         f"{tuple(dst.shape)}")
    dst.copy_(src)


@torch.no_grad()
def _load_weights(model: OmniModel, r: TensorSource) -> None:
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return r.get(name)

    # Checkpoints saved from the bare LlamaModel have no "model." prefix.
    pre = "model." if "model.embed_tokens.weight" in r.names or "embed_tokens.weight" not in r.names else ""

    def load(dst: torch.Tensor, name: str) -> None:
        _copy(dst, get(name), name, r.where(name))

    def load_rows(dst: torch.Tensor, names: list[str]) -> None:
        """Fill dst's rows (dim 0) from several tensors in order: the fused projections."""
        start = 0
        tensors = [(n, get(n)) for n in names]
        total = sum(t.shape[0] for _, t in tensors)
        if total != dst.shape[0]:
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors)
            raise ValueError(f"{r.where(names[0])}: {shapes} do not add up to the {tuple(dst.shape)} that "
                             "the config implies")
        for n, t in tensors:
            _copy(dst[start:start + t.shape[0]], t, n, r.where(n))
            start += t.shape[0]

    load(model.embed.weight, f"{pre}embed_tokens.weight")
    for i, block in enumerate(model.backbone.layers):
        p = f"{pre}layers.{i}."
        attn = f"{p}self_attn."
        load_rows(block.attn.wqkv.weight, [f"{attn}{x}_proj.weight" for x in "qkv"])
        if block.attn.wqkv.bias is not None:
            load_rows(block.attn.wqkv.bias, [f"{attn}{x}_proj.bias" for x in "qkv"])
        load(block.attn.wo.weight, f"{attn}o_proj.weight")
        if f"{attn}o_proj.bias" in r.names:  # llama attention_bias=true also biases o_proj
            if bool(get(f"{attn}o_proj.bias").any()):
                raise ValueError(f"{r.where(attn + 'o_proj.bias')}: {attn}o_proj.bias is non-zero; omni's "
                                 "backbone has no output-projection bias")
        load_rows(block.ffn.w13.weight, [f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"])
        load(block.ffn.w2.weight, f"{p}mlp.down_proj.weight")
        load(block.attn_norm.weight, f"{p}input_layernorm.weight")
        load(block.ffn_norm.weight, f"{p}post_attention_layernorm.weight")
    load(model.backbone.norm.weight, f"{pre}norm.weight")
    if not model.config.tie_embeddings:
        load(model.lm_head.weight, "lm_head.weight")
    elif "lm_head.weight" in r.names:
        used.add("lm_head.weight")  # some tied checkpoints store the alias anyway

    unexpected = sorted(n for n in r.names - used if not n.endswith(_IGNORABLE))
    if unexpected:
        raise ValueError(f"{r.where(unexpected[0])}: the weights do not match the config; unexpected "
                         f"tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
