"""From a recipe to a freshly initialised model: the one place a config becomes an OmniModel."""

from __future__ import annotations

import copy
from dataclasses import replace

from omni.model.backbone import backbone_config, default_mrope_section
from omni.model.omni_model import OmniModel, build_model, read_config


def model_from_recipe(cfg, tokenizer, codec=None) -> OmniModel:
    """A freshly initialised model for a recipe: backbone, media encoders, the tokenizer's text
    vocabulary and, with the recipe's codec (loaded from ``codec.path``), its codes. ``cfg`` is a
    recipe (:class:`omni.config.RecipeConfig`); its ``model`` and ``train.seed`` are read."""
    vocab = tokenizer.vocab
    if codec is not None:
        vocab = replace(vocab, num_codebooks=codec.num_codebooks, codebook_size=codec.cardinality)
    mc = cfg.model
    tie, media = mc.tie_embeddings, mc.media
    if mc.pretrained:  # its backbone; the weights load in training
        base = read_config(mc.pretrained)
        if base.vocab.text_size != vocab.text_size:
            raise ValueError(f"model.pretrained {mc.pretrained}: its vocabulary has {base.vocab.text_size} "
                             f"text ids but the tokenizer has {vocab.text_size}")
        if cfg.data.seq_len > base.backbone.max_seq_len:
            raise ValueError(f"data.seq_len ({cfg.data.seq_len}) exceeds the context of model.pretrained "
                             f"{mc.pretrained} ({base.backbone.max_seq_len})")
        # a checkpoint with cross-attention (an imported Whisper's decoder) keeps it unless the recipe
        # names its own; its media sections are the base the recipe's add to (e.g. spec_augment)
        bcfg = replace(base.backbone, attn_backend=mc.attn_backend,
                       cross_attention=mc.cross_attention or base.backbone.cross_attention)
        tie = base.tie_embeddings
        media = merged_media(base.media, mc.media)
    else:
        bcfg = backbone_config(mc.size, dim=mc.dim, num_layers=mc.num_layers, num_heads=mc.num_heads,
                               num_kv_heads=mc.num_kv_heads, ffn_dim=mc.ffn_dim, max_seq_len=mc.max_seq_len,
                               rope_theta=mc.rope_theta, attn_backend=mc.attn_backend,
                               cross_attention=mc.cross_attention)
    if mc.mrope:
        bcfg.mrope_section = default_mrope_section(bcfg.head_dim)
    return build_model(bcfg, vocab, tie_embeddings=tie, seed=cfg.train.seed,
                       media=media, audio_pattern=mc.audio_pattern,
                       contrastive=mc.contrastive, blip2=mc.blip2)


def merged_media(base: dict, recipe: dict) -> dict:
    """A pretrained checkpoint's ``media`` sections with a recipe's ``model.media`` laid over them
    key by key (nested dicts merged, other values replaced): ``{audio: {spec_augment: {...}}}`` adds
    SpecAugment to an imported Whisper's audio encoder and keeps its encoder, connector and 30-s
    window; a modality only the recipe names is added whole."""
    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return copy.deepcopy(b)

    return merge(dict(base or {}), dict(recipe or {}))
