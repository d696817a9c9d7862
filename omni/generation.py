"""Decoding with a KV cache: greedy, temperature, top-k, top-p, stop tokens, left-padded batches,
streaming, and constraining the sampled ids to one modality's span of the vocabulary."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from omni.model.backbone import KVCache


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape (B, T)")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    if (input_ids < 0).any() or (input_ids >= model.vocab.size).any():
        raise ValueError(f"input ids must be in [0, {model.vocab.size}) for this model's vocabulary")
    model._check_length(input_ids.shape[1], "the prompt")
    if input_ids.shape[1] == model.max_seq_len:
        raise ValueError(f"the prompt fills the model's whole context ({model.max_seq_len} tokens); "
                         "nothing can be generated")


def default_stop_ids(model) -> list[int]:
    """End of sequence and end of turn; an imported checkpoint's own eos id(s) when it has them."""
    imported = model.config.backbone.extra.get("eos_token_id")
    if imported is not None:
        return list(imported) if isinstance(imported, (list, tuple)) else [int(imported)]
    vocab = model.vocab
    return [vocab.eos_id] + ([vocab.specials["<|eot|>"]] if "<|eot|>" in vocab.specials else [])


@torch.inference_mode()
def iter_generate(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, stop_ids: Sequence[int] | None = None,
                  allowed: range | None = None, seed: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids ``(B,)`` step by step; finished rows yield ``pad_id``.

    attention_mask (B, T): 1 for real tokens, 0 for left padding. allowed: restrict sampling to
    this id range (a modality span). stop_ids default to end-of-sequence and end-of-turn.
    Generation also stops at the model's context length.
    """
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    vocab = model.vocab
    if stop_ids is None:
        stop_ids = default_stop_ids(model)
    stops = torch.tensor(list(stop_ids), device=model.device)
    B, T = input_ids.shape
    max_new_tokens = min(max_new_tokens, model.max_seq_len - T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    bias = None
    if allowed is not None:
        bias = torch.full((vocab.size,), float("-inf"), device=model.device)
        bias[allowed.start:allowed.stop] = 0.0

    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config.backbone, B, T + max_new_tokens, device=model.device, dtype=dtype)
    key_padding = attention_mask.bool().to(model.device) if attention_mask is not None else None
    logits = model(input_ids.to(model.device), key_padding=key_padding, cache=cache, last_only=True).logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        if bias is not None:
            logits = logits + bias
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, vocab.pad_id), nxt)
        yield nxt
        done = done | torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = model(nxt[:, None], cache=cache).logits[:, -1]


def generate(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Like transformers' ``generate`` but returns only the new ids: ``(B, N)``, pad after a stop."""
    steps = list(iter_generate(model, input_ids, **kwargs))
    return torch.stack(steps, dim=1).cpu()


def left_pad(seqs: list[list[int]] | list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad variable-length id lists into (B, T) ids and a (B, T) attention mask."""
    if not seqs:
        raise ValueError("no prompts given")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask
