"""Export an omni model as a transformers folder: the inverse of :mod:`omni.model.hf_import` and of
:func:`omni.model.whisper.import_whisper`.

    a text model (RMSNorm, SwiGLU, RoPE)  -> LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases;
                                             MistralForCausalLM when it was imported from one)
    an imported (fine-tuned) Whisper      -> WhisperForConditionalGeneration
    a model with media encoders           -> its language model as above, and beside it each encoder
                                             (tower + connector) in omni_media.safetensors, described by
                                             omni_media.json (how to rebuild them, how features enter)

The backbone's fused projections are split back into transformers' (``attn.wqkv`` -> q, k, v rows;
``ffn.w13`` -> gate, up rows) and LoRA adapters are folded into their weights
(``OmniModel.export_state_dict``). What transformers' classes cannot express (M-RoPE,
cross-attention blocks, LayerNorm or GELU blocks outside Whisper, an output-projection bias) is
refused with a ``ValueError`` naming it, never exported approximately.

The vocabulary: omni appends its markers (``<|user|>``, ``<|image|>``, ...) after an imported
model's ids. ``vocab="full"`` (default) exports every row the model has, the markers as special
added tokens of the tokenizer, so the logits match omni's on every id; ``vocab="model"`` drops the
marker rows and tokens and gives back the original model's vocabulary (a drop-in for the model it
was imported from; refused for a model that reads media or writes audio, which use the markers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni.io import atomic_dir, atomic_write_bytes, atomic_write_json, save_tensors
from omni.model.hf_import import SUPPORTED
from omni.model.omni_model import OmniModel
from omni.model.whisper import hf_whisper_config, hf_whisper_state
from omni.tokenizers.bpe import BPETokenizer
from omni.tokenizers.text import TextTokenizer
from omni.tokenizers.whisper import WhisperTokenizer
from omni.vocab import SPECIAL_TOKENS

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
VOCABS = ("full", "model")
MEDIA_WEIGHTS = "omni_media.safetensors"
MEDIA_JSON = "omni_media.json"
SIDE_PREFIXES = ("encoders.", "contrastive.", "blip2.")  # weights that go beside the language model


def export_hf(model: OmniModel, tokenizer, out: str | Path, dtype: str = "f32", vocab: str = "full",
              overwrite: bool = False) -> Path:
    """Write ``model`` (and its text ``tokenizer``, or None) as a transformers folder ``out``,
    atomically; ``dtype``: f32, f16 or bf16. See the module docstring for what is exported."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not a transformers export type; choose from "
                         f"{', '.join(DTYPES)} (q8_0 is for --to gguf)")
    if vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {', '.join(VOCABS)}, got {vocab!r}")
    out = check_out(out, overwrite)
    if is_whisper_model(model):
        files = whisper_files(model, tokenizer)
    else:
        files = lm_files(model, tokenizer, vocab)
    files["config.json"]["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    with atomic_dir(out) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_tensors(tmp / name, {k: _cast(v, DTYPES[dtype]) for k, v in content.items()},
                             metadata={"format": "pt"})
            elif isinstance(content, str):
                atomic_write_bytes(tmp / name, content.encode())
            else:
                atomic_write_json(tmp / name, content)
    return out


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out``, refused when it is a folder that holds anything (an export replaces it whole, and a
    mistyped ``--out`` must not delete a run) unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; the export would replace it whole. "
                         "Choose a new folder, or pass --overwrite")
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


# ---------------------------------------------------------------------------------------------
# The language model: LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM


def lm_problems(model: OmniModel) -> list[str]:
    """What keeps ``model``'s backbone from being a transformers Llama / Qwen2 (empty: nothing)."""
    b = model.config.backbone
    found = []
    if b.norm != "rms":
        found.append(f"backbone.norm={b.norm!r} (transformers' Llama/Qwen2 use RMSNorm)")
    if b.mlp != "swiglu":
        found.append(f"backbone.mlp={b.mlp!r} (transformers' Llama/Qwen2 use a SwiGLU MLP)")
    if b.positions != "rope":
        found.append(f"backbone.positions={b.positions!r} (transformers' Llama/Qwen2 use rotary positions)")
    if b.mrope_section is not None:
        found.append(f"backbone.mrope_section={b.mrope_section} (M-RoPE: 3-D positions for media spans)")
    if b.cross_attention is not None:
        found.append("backbone.cross_attention (cross-attention blocks reading media features)")
    if b.out_bias:
        found.append("backbone.out_bias (a bias on the attention output projection)")
    return found


def architecture(model: OmniModel) -> str:
    """The transformers ``model_type`` the backbone maps onto; a backbone that maps onto none is a
    ``ValueError`` naming every option in the way."""
    found = lm_problems(model)
    if found:
        raise ValueError("this model cannot be exported as a transformers language model: "
                         + "; ".join(found))
    b = model.config.backbone
    if b.qkv_bias:
        return "qwen2"
    return "mistral" if b.extra.get("imported_from") == "mistral" else "llama"


def lm_rows(model: OmniModel, tokenizer, vocab: str) -> int:
    """Embedding rows to export: every row (``full``) or the imported model's own (``model``)."""
    if vocab == "full":
        return model.vocab.size
    if not isinstance(tokenizer, BPETokenizer) or isinstance(tokenizer, WhisperTokenizer):
        raise ValueError("vocab='model' (dropping omni's markers) needs an imported model's BPE tokenizer; "
                         f"this model's is {type(tokenizer).__name__}: export the full vocabulary")
    if model.encoders or model.vocab.num_codebooks:
        raise ValueError("vocab='model' would drop omni's markers, which this model uses (it reads media "
                         "or writes audio codes): export the full vocabulary")
    # a checkpoint padded past the tokenizer keeps its rows (the markers sat in the padding)
    return tokenizer.model_ids if model.vocab.text_size == tokenizer.num_ids else model.vocab.text_size


def lm_state(model: OmniModel, rows: int) -> dict[str, torch.Tensor]:
    """The language model's weights under transformers' names (LoRA merged, the first ``rows``
    rows of the embedding and head); a backbone weight left unmapped is a ``ValueError``."""
    b = model.config.backbone
    sd = model.export_state_dict()
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name]

    out = {"model.embed_tokens.weight": get("embed.weight")[:rows]}
    split = [b.num_heads * b.head_dim, b.num_kv_heads * b.head_dim, b.num_kv_heads * b.head_dim]
    for i in range(b.num_layers):
        src, dst = f"backbone.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if b.qkv_bias else ("weight",):
            for x, t in zip("qkv", get(f"{src}attn.wqkv.{kind}").split(split)):
                out[f"{dst}self_attn.{x}_proj.{kind}"] = t
        out[f"{dst}self_attn.o_proj.weight"] = get(f"{src}attn.wo.weight")
        gate, up = get(f"{src}ffn.w13.weight").chunk(2)
        out[f"{dst}mlp.gate_proj.weight"], out[f"{dst}mlp.up_proj.weight"] = gate, up
        out[f"{dst}mlp.down_proj.weight"] = get(f"{src}ffn.w2.weight")
        out[f"{dst}input_layernorm.weight"] = get(f"{src}attn_norm.weight")
        out[f"{dst}post_attention_layernorm.weight"] = get(f"{src}ffn_norm.weight")
    out["model.norm.weight"] = get("backbone.norm.weight")
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")[:rows]
    left = sorted(k for k in sd if k not in used and not k.startswith(SIDE_PREFIXES))
    assert not left, f"backbone weights without a transformers name: {left[:5]}"
    return {k: v.detach().clone() for k, v in out.items()}  # views of a shared tensor cannot be saved


def lm_config(model: OmniModel, rows: int, arch: str, tokenizer) -> dict:
    """The transformers ``config.json`` of the language model."""
    b = model.config.backbone
    rope = {"rope_type": "default", "rope_theta": b.rope_theta, **(b.rope_scaling or {})}
    cfg = {
        "architectures": [SUPPORTED[arch]], "model_type": arch,
        "hidden_size": b.dim, "num_hidden_layers": b.num_layers, "num_attention_heads": b.num_heads,
        "num_key_value_heads": b.num_kv_heads, "head_dim": b.head_dim, "intermediate_size": b.ffn_dim,
        "hidden_act": "silu", "max_position_embeddings": b.max_seq_len, "rms_norm_eps": b.norm_eps,
        "rope_theta": b.rope_theta, "rope_parameters": rope, "vocab_size": rows,
        "tie_word_embeddings": model.config.tie_embeddings, **special_ids(model, tokenizer),
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if b.rope_scaling:
        cfg["rope_scaling"] = dict(b.rope_scaling)
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # qwen2, mistral: full attention (an import capped max_seq_len at any window)
        cfg.update(sliding_window=None, use_sliding_window=False)
    return cfg


def lm_files(model: OmniModel, tokenizer, vocab: str) -> dict:
    """{file name: tensors, JSON object or text} of the language model's folder, media beside it."""
    arch = architecture(model)
    rows = lm_rows(model, tokenizer, vocab)
    files: dict = {"config.json": lm_config(model, rows, arch, tokenizer),
                   "generation_config.json": special_ids(model, tokenizer),
                   "model.safetensors": lm_state(model, rows)}
    if tokenizer is not None:
        files.update(tokenizer_files(tokenizer, keep_markers=vocab == "full",
                                     max_len=model.config.backbone.max_seq_len))
    files.update(media_files(model))
    return files


def special_ids(model: OmniModel, tokenizer) -> dict:
    """bos / eos / pad ids: the tokenizer's, or (a model imported without one) those the imported
    checkpoint named."""
    v, extra = model.vocab, model.config.backbone.extra
    if tokenizer is not None:
        return {"bos_token_id": v.bos_id, "eos_token_id": v.eos_id, "pad_token_id": v.pad_id}
    return {k: extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in extra}


# ---------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_files(tokenizer, keep_markers: bool, max_len: int) -> dict:
    """``tokenizer.json`` + ``tokenizer_config.json`` (special tokens, chat template) that
    ``AutoTokenizer`` reads and that encode as omni's tokenizer does."""
    if isinstance(tokenizer, TextTokenizer):
        return sentencepiece_files(tokenizer, max_len)
    if not isinstance(tokenizer, BPETokenizer):
        raise ValueError(f"cannot export a {type(tokenizer).__name__} text tokenizer to transformers")
    tok = json.loads(tokenizer.tokenizer_json())
    if not keep_markers:
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in SPECIAL_TOKENS]
    cfg = _tokenizer_config(tok, tokenizer.vocab, tokenizer.add_bos, max_len)
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False, indent=1), "tokenizer_config.json": cfg}


def _tokenizer_config(tok: dict, v, add_bos: bool, max_len: int) -> dict:
    """tokenizer_config.json for the ``tokenizer.json`` dict ``tok`` (given a bos post-processor
    when ``add_bos``: transformers adds bos from there)."""
    names = {t["id"]: t["content"] for t in tok["added_tokens"]}
    model_vocab = tok["model"]["vocab"]
    pieces = ({i: p for p, i in model_vocab.items()} if isinstance(model_vocab, dict)
              else {i: p for i, (p, _) in enumerate(model_vocab)})

    def token(i: int) -> str:
        return names.get(i, pieces.get(i))

    bos = token(v.bos_id)
    if add_bos:
        seq = [{"Sequence": {"id": "A", "type_id": 0}}]
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, *seq],
                                 "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, *seq,
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {bos: {"id": bos, "ids": [v.bos_id], "tokens": [bos]}}}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "bos_token": bos,
            "eos_token": token(v.eos_id), "pad_token": token(v.pad_id), "unk_token": token(v.unk_id),
            "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False}


# omni's own chat layout (omni.sequence.render) for a SentencePiece model, as a Jinja template
OMNI_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
                      "{{ message['content'] }}<|eot|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sentencepiece_files(tokenizer: TextTokenizer, max_len: int) -> dict:
    """omni's SentencePiece model as a ``tokenizer.json`` (a Unigram model with SentencePiece's
    whitespace handling and byte fallback: the settings omni trains with, as transformers'
    ``SpmConverter`` writes them) that encodes text as ``sp.encode`` does; omni's markers and
    SentencePiece's control pieces are special added tokens, and the chat template is omni's
    layout. A SentencePiece model that is not a unigram one is refused."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{tokenizer.source}: a SentencePiece {kind} model cannot be exported to "
                         "transformers yet (only unigram models, omni's default)")
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ValueError(f"{tokenizer.source}: the SentencePiece model normalizes text (rule "
                         f"{norm.name!r}); only omni's identity normalization is exported")
    tok = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
                            byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Replace(" ", "\u2581")]
    if norm.add_dummy_prefix:  # Metaspace skips the prefix of a text starting with "▁"; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    pre = [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always" if norm.add_dummy_prefix
                                    else "never", split=False)]
    if proto.trainer_spec.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    # control pieces (<s>, omni's markers) are special tokens: a chat template's text reaches them
    # (transformers' split_special_tokens=True encodes a typed one as its own piece, never bytes)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                            if p.type in (p.CONTROL, p.UNKNOWN)])
    raw = json.loads(tok.to_str())
    cfg = _tokenizer_config(raw, tokenizer.vocab, True, max_len)
    cfg["chat_template"] = OMNI_CHAT_TEMPLATE
    return {"tokenizer.json": json.dumps(raw, ensure_ascii=False, indent=1), "tokenizer_config.json": cfg}


# ---------------------------------------------------------------------------------------------
# Media encoders: beside the language model


def media_files(model: OmniModel) -> dict:
    """omni_media.safetensors (each encoder's weights: tower + connector, and any contrastive /
    BLIP-2 head) and omni_media.json (how to rebuild them and where their features go); empty for
    a text model."""
    extra = {k: v for k, v in model.export_state_dict().items()
             if k.startswith(SIDE_PREFIXES)}
    if not extra:
        return {}
    cfg = model.standalone_config()
    markers = {m: {"begin": f"<|{m}|>", "end": f"<|/{m}|>", "feature": "<|feat|>"} for m in cfg.media}
    described = {
        "format": "omni-media", "format_version": 1, "hidden_size": cfg.backbone.dim,
        "media": cfg.media, "contrastive": cfg.contrastive, "blip2": cfg.blip2,
        "vocab": cfg.vocab.to_dict(), "audio_pattern": cfg.audio_pattern,
        "markers": markers,
        "rebuild": ("encoder = omni.model.media_encoder.build_media_encoder(modality, media[modality], "
                    "hidden_size, vocab['text_size']); encoder.load_state_dict(the tensors under "
                    "'encoders.<modality>.', prefix removed)"),
        "placement": ("a media span is <begin> <feature> x N <end> in the token ids (N: the encoder's "
                      "output length; 1-D positions); the encoder's N x hidden_size outputs replace the "
                      "embeddings of the <feature> tokens before the first decoder layer (inputs_embeds)"),
    }
    if cfg.vocab.num_codebooks:
        described["audio_codes"] = (f"ids {cfg.vocab.text_size}.. are {cfg.vocab.num_codebooks} audio "
                                    f"codebooks of {cfg.vocab.codebook_size} codes ({cfg.audio_pattern} "
                                    "layout); in the delay layout codebooks 1..K-1 are embedded and summed "
                                    "into the same step, which transformers' model does not do")
    return {MEDIA_WEIGHTS: extra, MEDIA_JSON: described}


# ---------------------------------------------------------------------------------------------
# Whisper


def is_whisper_model(model: OmniModel) -> bool:
    return model.config.backbone.extra.get("imported_from") == "whisper"


def whisper_files(model: OmniModel, tokenizer) -> dict:
    """A ``WhisperForConditionalGeneration`` folder: weights, config, generation config (prompt
    ids, suppress lists), the feature extractor's settings and the tokenizer, Whisper's own ids
    only (omni's markers, which a Whisper never uses, are dropped)."""
    if not isinstance(tokenizer, WhisperTokenizer):
        raise ValueError(f"an imported Whisper exports with its WhisperTokenizer; this checkpoint has "
                         f"{type(tokenizer).__name__}")
    config, generation = hf_whisper_config(model, tokenizer)
    tok = json.loads(tokenizer.tokenizer_json())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in SPECIAL_TOKENS]
    n_mels = config["num_mel_bins"]
    return {
        "config.json": config, "generation_config.json": generation,
        "model.safetensors": hf_whisper_state(model, tokenizer.model_ids),
        "tokenizer.json": json.dumps(tok, ensure_ascii=False, indent=1),
        "tokenizer_config.json": {"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024,
                                  "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "add_prefix_space": False, "clean_up_tokenization_spaces": False},
        # Whisper's log-mel front end, which omni's LogMel computes (16 kHz, 25 ms / 10 ms, 30-s window)
        "preprocessor_config.json": {"feature_extractor_type": "WhisperFeatureExtractor",
                                     "processor_class": "WhisperProcessor", "feature_size": n_mels,
                                     "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
                                     "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000,
                                     "padding_side": "right", "padding_value": 0.0,
                                     "return_attention_mask": False},
    }
