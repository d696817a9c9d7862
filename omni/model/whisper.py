"""Whole Whisper models on omni's blocks: import, and the decoder's prompt.

:func:`import_whisper` reads a transformers ``WhisperForConditionalGeneration`` folder
(``config.json`` with ``model_type: whisper`` + safetensors) or a CTranslate2 Whisper folder
(``model.bin``, or ``model.bin.part1..N`` spread over several folders, + ``config.json`` +
``tokenizer.json``; fp16 widened to fp32) into an :class:`OmniModel` and a
:class:`~omni.tokenizers.whisper.WhisperTokenizer`:

    encoder (conv stem, position table, pre-LN layers) -> WhisperStyleEncoder, identity connector,
        log-mel of the clip padded to 30 s (``pad_to_s``)
    decoder -> the backbone with LayerNorm, GELU MLP, learned positions, q/v + output biases and a
        cross-attention block between self-attention and MLP in every layer; tied output embedding

q, k, v are fused in omni's layout; Whisper's k projections have no bias (a zero slot in the fused
bias, which softmax ignores). :func:`render_whisper` lays a sample out as Whisper's decoder reads
it, the clip being the cross-attention memory from the first token on.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from omni.io import read_json
from omni.model.backbone import BackboneConfig
from omni.model.hf_import import check_dtype, with_appended_rows
from omni.model.omni_model import OmniConfig, OmniModel
from omni.sequence import IGNORE, MediaSlot, Rendered, Sample
from omni.tokenizers.audio import load_safetensors_dir
from omni.tokenizers.whisper import WhisperTokenizer

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
CT2_GELU = 3  # CTranslate2's ActivationType::GELU
MULTILINGUAL_VOCAB = 51865  # Whisper's rule: multilingual models have at least this many ids
ENCODER_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "max_source_positions")


def is_whisper(path: str | Path) -> bool:
    """Whether ``path`` is a transformers Whisper folder or a CTranslate2 one."""
    path = Path(path)
    if not path.is_dir():
        return False
    if _ct2_parts([path]):
        return True
    cfg = path / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") == "whisper"


def import_whisper(path: str | Path | Sequence[str | Path], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[OmniModel, WhisperTokenizer]:
    """A Whisper folder (or the folders a CTranslate2 model's parts are spread over) -> the model
    (in eval mode) and its tokenizer."""
    dirs = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    dtype = check_dtype(dtype)
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{d}: Whisper folder not found")
    if _ct2_parts(dirs):
        raw, state, suppress = _read_ct2(dirs)
        multilingual = raw["vocab_size"] >= MULTILINGUAL_VOCAB
        source = str(dirs[0])
    else:
        raw = read_json(dirs[0] / "config.json")
        if raw.get("model_type") != "whisper":
            raise ValueError(f"{dirs[0]}: not a Whisper checkpoint (model_type {raw.get('model_type')!r})")
        gen = dirs[0] / "generation_config.json"
        gen = read_json(gen) if gen.is_file() else {}
        suppress = {k: gen.get(k, raw.get(k)) for k in ("suppress_tokens", "begin_suppress_tokens")}
        multilingual = gen.get("is_multilingual", raw["vocab_size"] >= MULTILINGUAL_VOCAB)
        state, source = load_safetensors_dir(dirs[0]), str(dirs[0])
    tok_file = next((d / "tokenizer.json" for d in dirs if (d / "tokenizer.json").is_file()), None)
    if tok_file is None:
        raise ValueError(f"{source}: no tokenizer.json (Whisper's tokenizer) found")
    tokenizer = WhisperTokenizer.from_file(tok_file, multilingual=multilingual, text_size=raw["vocab_size"],
                                           suppress=suppress["suppress_tokens"] or (),
                                           begin_suppress=suppress["begin_suppress_tokens"])
    if tokenizer.model_ids != raw["vocab_size"]:
        raise ValueError(f"{tok_file}: the tokenizer has {tokenizer.model_ids} ids but the model "
                         f"{raw['vocab_size']} (vocab_size)")
    config = whisper_config(raw, tokenizer, source)
    model = OmniModel(config)
    model.load_weights(_omni_state(state, config, raw["vocab_size"], source), source)
    return model.to(device, dtype).eval(), tokenizer


def whisper_config(raw: dict, tokenizer: WhisperTokenizer, source: str = "config.json") -> OmniConfig:
    """A transformers Whisper ``config.json`` dict -> the ``OmniConfig`` of the same model."""
    if raw.get("activation_function", "gelu") != "gelu" or raw.get("scale_embedding"):
        raise ValueError(f"{source}: only Whisper's own layout (gelu, unscaled embeddings) is supported")
    if not raw.get("tie_word_embeddings", True):
        raise ValueError(f"{source}: untied output embeddings are not supported")
    heads = raw["decoder_attention_heads"]
    backbone = BackboneConfig(
        dim=raw["d_model"], num_layers=raw["decoder_layers"], num_heads=heads, num_kv_heads=heads,
        ffn_dim=raw["decoder_ffn_dim"], max_seq_len=raw["max_target_positions"], qkv_bias=True, out_bias=True,
        norm="layer", mlp="gelu", positions="learned",
        cross_attention={"every": 1, "placement": "after_attn", "memory_norm": False, "bias": True},
        extra={"imported_from": "whisper", "architecture": "WhisperForConditionalGeneration",
               "eos_token_id": tokenizer.eot})
    encoder = {"kind": "whisper_style", "n_mels": raw["num_mel_bins"],
               "whisper_config": {k: raw[k] for k in ENCODER_KEYS}}
    media = {"audio": {"encoder": encoder, "connector": {"kind": "identity"}, "pad_to_s": 30.0}}
    return OmniConfig(backbone, tokenizer.vocab, tie_embeddings=True, media=media)


# ---------------------------------------------------------------------------------------------
# Weights: transformers names -> omni's


def _omni_state(sd: dict, config: OmniConfig, rows: int, source: str) -> dict[str, torch.Tensor]:
    pre = "model." if "model.decoder.embed_tokens.weight" in sd else ""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if pre + name not in sd:
            raise ValueError(f"{source}: tensor {pre + name!r} is missing")
        used.add(pre + name)
        return sd[pre + name].float()

    def linear(dst: str, src: str) -> dict:
        return {f"{dst}.weight": get(f"{src}.weight"), f"{dst}.bias": get(f"{src}.bias")}

    def fused(names: str, src: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``{x}_proj`` for x in names, fused; k has no bias (zeros)."""
        w = torch.cat([get(f"{src}.{x}_proj.weight") for x in names])
        zero = torch.zeros(get(f"{src}.v_proj.bias").shape)
        b = torch.cat([zero if x == "k" else get(f"{src}.{x}_proj.bias") for x in names])
        return w, b

    out: dict[str, torch.Tensor] = {}
    enc = "encoders.audio.encoder."
    out.update(linear(enc + "conv1", "encoder.conv1"))
    out.update(linear(enc + "conv2", "encoder.conv2"))
    out[enc + "positions"] = get("encoder.embed_positions.weight")
    for i in range(config.media["audio"]["encoder"]["whisper_config"]["encoder_layers"]):
        src, dst = f"encoder.layers.{i}", f"{enc}layers.layers.{i}"
        w, b = fused("qkv", f"{src}.self_attn")
        out[f"{dst}.self_attn.in_proj_weight"], out[f"{dst}.self_attn.in_proj_bias"] = w, b
        out.update(linear(f"{dst}.self_attn.out_proj", f"{src}.self_attn.out_proj"))
        out.update(linear(f"{dst}.norm1", f"{src}.self_attn_layer_norm"))
        out.update(linear(f"{dst}.linear1", f"{src}.fc1"))
        out.update(linear(f"{dst}.linear2", f"{src}.fc2"))
        out.update(linear(f"{dst}.norm2", f"{src}.final_layer_norm"))
    out.update(linear(enc + "norm", "encoder.layer_norm"))

    embed = get("decoder.embed_tokens.weight")
    out["embed.weight"] = with_appended_rows(embed, rows, config.vocab.text_size)
    out["backbone.pos_embed.weight"] = get("decoder.embed_positions.weight")
    for i in range(config.backbone.num_layers):
        src, dst, xa = f"decoder.layers.{i}", f"backbone.layers.{i}", f"backbone.cross.{i}"
        out[f"{dst}.attn.wqkv.weight"], out[f"{dst}.attn.wqkv.bias"] = fused("qkv", f"{src}.self_attn")
        out.update(linear(f"{dst}.attn.wo", f"{src}.self_attn.out_proj"))
        out.update(linear(f"{dst}.attn_norm", f"{src}.self_attn_layer_norm"))
        out.update(linear(f"{xa}.norm", f"{src}.encoder_attn_layer_norm"))
        out.update(linear(f"{xa}.attn.wq", f"{src}.encoder_attn.q_proj"))
        out[f"{xa}.attn.wkv.weight"], out[f"{xa}.attn.wkv.bias"] = fused("kv", f"{src}.encoder_attn")
        out.update(linear(f"{xa}.attn.wo", f"{src}.encoder_attn.out_proj"))
        out.update(linear(f"{dst}.ffn_norm", f"{src}.final_layer_norm"))
        out.update(linear(f"{dst}.ffn.w1", f"{src}.fc1"))
        out.update(linear(f"{dst}.ffn.w2", f"{src}.fc2"))
    out.update(linear("backbone.norm", "decoder.layer_norm"))
    proj = sd.get("proj_out.weight")
    if proj is not None and not torch.equal(proj.float(), embed):
        raise ValueError(f"{source}: proj_out.weight differs from the embeddings; untied heads are not "
                         "supported")
    unexpected = sorted(set(sd) - used - {"proj_out.weight"})
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors for a Whisper model: {', '.join(unexpected[:5])}")
    return out


# options that change training only (augmentation, caching, a frozen tower), not what the model computes
_TRAINING_ONLY = ("spec_augment", "precompute", "freeze", "attn_backend", "extra")


def _inference_view(section: dict) -> dict:
    return {k: _inference_view(v) if isinstance(v, dict) else v for k, v in section.items()
            if k not in _TRAINING_ONLY}


def hf_whisper_state(model: OmniModel, rows: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_omni_state`: an imported (and perhaps fine-tuned, LoRA merged) Whisper's
    weights under transformers' ``WhisperForConditionalGeneration`` names, the first ``rows``
    embedding rows (omni's markers dropped). The fused k bias slots are dropped: a bias on the keys
    adds the same amount to every score of a query, which softmax ignores, so this is exact."""
    sd = model.export_state_dict()
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name]

    out: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}.weight"), get(f"{src}.bias")

    def unfuse(dst: str, names: str, w: torch.Tensor, b: torch.Tensor) -> None:
        for x, wx, bx in zip(names, w.chunk(len(names)), b.chunk(len(names))):
            out[f"{dst}.{x}_proj.weight"] = wx
            if x != "k":
                out[f"{dst}.{x}_proj.bias"] = bx

    enc = "encoders.audio.encoder."
    linear("model.encoder.conv1", enc + "conv1")
    linear("model.encoder.conv2", enc + "conv2")
    out["model.encoder.embed_positions.weight"] = get(enc + "positions")
    for i in range(model.config.media["audio"]["encoder"]["whisper_config"]["encoder_layers"]):
        dst, src = f"model.encoder.layers.{i}", f"{enc}layers.layers.{i}"
        unfuse(f"{dst}.self_attn", "qkv", get(f"{src}.self_attn.in_proj_weight"),
               get(f"{src}.self_attn.in_proj_bias"))
        linear(f"{dst}.self_attn.out_proj", f"{src}.self_attn.out_proj")
        linear(f"{dst}.self_attn_layer_norm", f"{src}.norm1")
        linear(f"{dst}.fc1", f"{src}.linear1")
        linear(f"{dst}.fc2", f"{src}.linear2")
        linear(f"{dst}.final_layer_norm", f"{src}.norm2")
    linear("model.encoder.layer_norm", enc + "norm")

    out["model.decoder.embed_tokens.weight"] = get("embed.weight")[:rows]
    out["model.decoder.embed_positions.weight"] = get("backbone.pos_embed.weight")
    for i in range(model.config.backbone.num_layers):
        dst, src, xa = f"model.decoder.layers.{i}", f"backbone.layers.{i}", f"backbone.cross.{i}"
        unfuse(f"{dst}.self_attn", "qkv", get(f"{src}.attn.wqkv.weight"), get(f"{src}.attn.wqkv.bias"))
        linear(f"{dst}.self_attn.out_proj", f"{src}.attn.wo")
        linear(f"{dst}.self_attn_layer_norm", f"{src}.attn_norm")
        linear(f"{dst}.encoder_attn_layer_norm", f"{xa}.norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{xa}.attn.wq")
        unfuse(f"{dst}.encoder_attn", "kv", get(f"{xa}.attn.wkv.weight"), get(f"{xa}.attn.wkv.bias"))
        linear(f"{dst}.encoder_attn.out_proj", f"{xa}.attn.wo")
        linear(f"{dst}.final_layer_norm", f"{src}.ffn_norm")
        linear(f"{dst}.fc1", f"{src}.ffn.w1")
        linear(f"{dst}.fc2", f"{src}.ffn.w2")
    linear("model.decoder.layer_norm", "backbone.norm")
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"this Whisper model has weights transformers' Whisper has no place for: "
                         f"{', '.join(left[:5])}")
    return {k: v.detach().clone() for k, v in out.items()}


def hf_whisper_config(model: OmniModel, tokenizer: WhisperTokenizer) -> tuple[dict, dict]:
    """(config.json, generation_config.json) of the transformers Whisper that ``model`` is; a model
    that is no longer Whisper's layout (another encoder or connector, other decoder options) is a
    ``ValueError`` naming what differs."""
    section = model.config.media.get("audio", {})
    wc = section.get("encoder", {}).get("whisper_config")
    b = model.config.backbone
    expected = whisper_config({**wc, "decoder_attention_heads": b.num_heads, "decoder_layers": b.num_layers,
                               "decoder_ffn_dim": b.ffn_dim, "max_target_positions": b.max_seq_len},
                              tokenizer) if wc else None
    if expected is None or set(model.config.media) != {"audio"} or \
            _inference_view(section) != _inference_view(expected.media["audio"]) or \
            _inference_view(b.to_dict()) != _inference_view(expected.backbone.to_dict()):
        raise ValueError("this model was imported from Whisper but no longer has Whisper's layout (its "
                         "config.json's backbone or media section differs from what the import wrote), so "
                         "it cannot be exported as WhisperForConditionalGeneration")
    rows = tokenizer.model_ids
    eot, sot = tokenizer.eot, tokenizer.sot
    config = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
              "vocab_size": rows, **{k: wc[k] for k in ENCODER_KEYS},
              "decoder_layers": b.num_layers, "decoder_attention_heads": b.num_heads,
              "decoder_ffn_dim": b.ffn_dim, "max_target_positions": b.max_seq_len,
              "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
              "pad_token_id": eot, "bos_token_id": eot, "eos_token_id": eot, "decoder_start_token_id": sot,
              "use_cache": True}
    generation = {"decoder_start_token_id": sot, "bos_token_id": eot, "eos_token_id": eot,
                  "pad_token_id": eot, "max_length": b.max_seq_len, "is_multilingual": tokenizer.multilingual,
                  "no_timestamps_token_id": tokenizer.no_timestamps, "suppress_tokens": tokenizer.suppress,
                  "begin_suppress_tokens": tokenizer.begin_suppress,
                  "task_to_id": dict(tokenizer.tasks) if tokenizer.multilingual else {},
                  "lang_to_id": ({f"<|{lang}|>": i for lang, i in tokenizer.languages.items()}
                                 if tokenizer.multilingual else {})}
    return config, generation


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin (binary version 6): u32 version, str spec, u32 revision, u32 count,
# count x (str name, u8 ndim, ndim x u32, u8 dtype, u32 nbytes, bytes), u32 aliases, (str, str)...;
# str = u16 length (with a trailing NUL) + bytes.


def _ct2_parts(dirs: list[Path]) -> list[Path]:
    """The model.bin of ``dirs``, or its parts model.bin.part1..N in order (empty: none)."""
    for d in dirs:
        if (d / "model.bin").is_file():
            return [d / "model.bin"]
    parts = {int(m[1]): d / m[0] for d in dirs if d.is_dir() for m in
             (re.fullmatch(r"model\.bin\.part(\d+)", f.name) for f in d.iterdir()) if m}
    if parts and sorted(parts) != list(range(1, len(parts) + 1)):
        raise ValueError(f"{dirs[0]}: model.bin parts {sorted(parts)} are not 1..N (a part's package is "
                         "missing?)")
    return [parts[n] for n in sorted(parts)]


def _parse_ct2(buf: bytes, source: str) -> dict[str, np.ndarray]:
    off = 0

    def unpack(fmt: str):
        nonlocal off
        val = struct.unpack_from("<" + fmt, buf, off)[0]
        off += struct.calcsize("<" + fmt)
        return val

    def string() -> str:
        nonlocal off
        n = unpack("H")
        off += n
        return buf[off - n:off - 1].decode("utf-8")

    try:
        if unpack("I") != 6:
            raise ValueError("only CTranslate2 binary version 6 is supported")
        if string() != "WhisperSpec":
            raise ValueError("not a CTranslate2 Whisper model (spec is not WhisperSpec)")
        unpack("I")  # revision
        out: dict[str, np.ndarray] = {}
        for _ in range(unpack("I")):
            name = string()
            shape = [unpack("I") for _ in range(unpack("B"))]
            dtype, nbytes = CT2_DTYPES[unpack("B")], unpack("I")
            if off + nbytes > len(buf):
                raise ValueError("truncated")
            out[name] = np.frombuffer(buf, dtype, nbytes // np.dtype(dtype).itemsize, off).reshape(shape)
            off += nbytes
        for _ in range(unpack("I")):
            alias, target = string(), string()
            out[alias] = out[target]
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: unreadable CTranslate2 model.bin ({e})") from None
    return out


def _read_ct2(dirs: list[Path]) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """A CTranslate2 Whisper -> (transformers config fields, transformers-named fp32 tensors,
    suppress lists)."""
    parts = _ct2_parts(dirs)
    source = str(parts[0])
    v = _parse_ct2(b"".join(p.read_bytes() for p in parts), source)
    if v["decoder/activation"].item() != CT2_GELU or v["decoder/scale_embeddings"].item() \
            or v["decoder/alibi"].item():
        raise ValueError(f"{source}: not Whisper's layout (activation, embedding scale or alibi differ)")

    def t(name: str) -> torch.Tensor:
        if v[name].dtype == np.uint16:  # bfloat16 bit patterns
            return torch.from_numpy(v[name].astype(np.int32) << 16).view(torch.float32)
        return torch.from_numpy(v[name].astype(np.float32))

    sd: dict[str, torch.Tensor] = {}

    def linear(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/weight"), t(f"{src}/bias")

    def norm(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def split(dst, src, names):  # fused rows -> x_proj, k without its (zero) bias
        for x, w, b in zip(names, t(f"{src}/weight").chunk(len(names)), t(f"{src}/bias").chunk(len(names))):
            sd[f"{dst}.{x}_proj.weight"] = w
            if x != "k":
                sd[f"{dst}.{x}_proj.bias"] = b

    def layer(dst, src):
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", "qkv")
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")

    def count(side):
        return 1 + max(int(m[1]) for k in v if (m := re.match(side + r"/layer_(\d+)/", k)))

    n_enc, n_dec = count("encoder"), count("decoder")
    for side in ("encoder", "decoder"):
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    for i in range(n_enc):
        layer(f"model.encoder.layers.{i}", f"encoder/layer_{i}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    for i in range(n_dec):
        dst, src = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        layer(dst, src)
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", "kv")
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    if "decoder/projection/weight" in v:
        sd["proj_out.weight"] = t("decoder/projection/weight")
    rows, d = v["decoder/embeddings/weight"].shape
    raw = {"model_type": "whisper", "vocab_size": rows, "num_mel_bins": v["encoder/conv1/weight"].shape[1],
           "d_model": d, "encoder_layers": n_enc, "decoder_layers": n_dec,
           "encoder_attention_heads": int(v["encoder/num_heads"]),
           "decoder_attention_heads": int(v["decoder/num_heads"]),
           "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
           "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
           "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
           "max_target_positions": v["decoder/position_encodings/encodings"].shape[0]}
    cfg_file = next((d / "config.json" for d in dirs if (d / "config.json").is_file()), None)
    ct2 = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file else {}
    suppress = {"suppress_tokens": ct2.get("suppress_ids"),
                "begin_suppress_tokens": ct2.get("suppress_ids_begin")}
    return raw, sd, suppress


# ---------------------------------------------------------------------------------------------
# The decoder's prompt


def render_whisper(sample: Sample, tokenizer: WhisperTokenizer, *, add_generation_prompt: bool = False,
                   language: str | None = None, task: str = "transcribe", timestamps: bool = False,
                   **_) -> Rendered:
    """``[<|startofprev|> prompt] <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
    transcript <|endoftext|>``: the user turn's text is the previous-text prompt, the assistant
    turn's (or a document's) the transcript, learned with its end; the one audio clip is the
    memory every token reads. ``add_generation_prompt``: stop before the transcript;
    ``timestamps``: no ``<|notimestamps|>`` (the transcript is decoded with timestamp tokens)."""
    audio = [s for m in sample.messages for s in m.segments if s.modality == "audio"]
    if len(audio) != 1 or audio[0].data is None:
        raise ValueError(f"a Whisper prompt holds exactly one audio clip, this one has {len(audio)}")

    def text(roles) -> str:
        return " ".join(s.text.strip() for m in sample.messages if m.role in roles
                        for s in m.segments if s.modality == "text" and s.text.strip())

    prev = text(("system", "user"))
    ids = [tokenizer.sot_prev, *tokenizer.encode(" " + prev)] if prev else []
    ids += tokenizer.prompt(language, task, timestamps)
    n_prompt = len(ids)
    if not add_generation_prompt:
        ids += tokenizer.encode(" " + text(("assistant", None))) + [tokenizer.eot]
    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = torch.full_like(ids_t, IGNORE)
    targets[n_prompt - 1:-1] = ids_t[n_prompt:]
    positions = torch.arange(len(ids)).expand(3, -1).contiguous()
    return Rendered(ids_t, targets, positions, [MediaSlot(0, audio[0].num_tokens, "audio", audio[0].data)])
