"""Decoding with a KV cache: greedy, temperature, top-k, top-p, a repetition penalty, stop tokens,
left-padded batches, streaming, and constraining the sampled ids to one modality's span of the vocabulary."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from omni.model.audio_codes import EMPTY
from omni.model.backbone import KVCache
from omni.model.compiled import compiled_step, static_cache_len


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


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al., 2019), as transformers applies it: the logits
    (B, V) of ids already seen (a (B, V) bool mask) are divided by ``penalty`` where positive and
    multiplied by it where negative; 1.0 leaves them as they are."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
           repetition_penalty=1.0):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape (B, T)")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} "
                         f"!= input_ids {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 0) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
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
                  top_p: float | None = None, repetition_penalty: float = 1.0,
                  stop_ids: Sequence[int] | None = None,
                  allowed: range | Callable[[int], range] | None = None,
                  suppress_ids: Sequence[int] = (), begin_suppress_ids: Sequence[int] = (),
                  seed: int | None = None, positions: torch.Tensor | None = None,
                  media: list | None = None, streams: torch.Tensor | None = None,
                  compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next ids ``(B,)`` step by step; finished rows yield ``pad_id``.

    attention_mask (B, T): 1 for real tokens, 0 for left padding. allowed: restrict sampling to
    this id range (a modality span), or a function of the step giving the range. suppress_ids are
    never sampled, begin_suppress_ids not as the first new id (transformers' ``suppress_tokens`` and
    ``begin_suppress_tokens``: Whisper's checkpoints carry both). stop_ids default
    to end-of-sequence and end-of-turn. repetition_penalty: see :func:`penalize_repeats`; it counts
    each row's prompt (not its padding) and what it generated.
    Generation also stops at the model's context length. positions ((B, T) or (3, B, T)) and
    media (``(row, MediaSlot)`` pairs) come from rendered prompts that hold media; streams
    (B, K-1, T) from prompts that hold audio codes in the delay layout. compile: decode through
    the compiled static-shape step (:mod:`omni.model.compiled`; its first call compiles, tens of
    seconds), the same ids faster.
    """
    _check(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    vocab = model.vocab
    if stop_ids is None:
        stop_ids = default_stop_ids(model)
    stops = torch.tensor(list(stop_ids), device=model.device)
    B, T = input_ids.shape
    max_new_tokens = min(max_new_tokens, model.max_seq_len - T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    def bias_at(step: int) -> torch.Tensor | None:
        span = allowed(step) if callable(allowed) else allowed
        return None if span is None else _span_bias(vocab.size, span, model.device)

    suppress, begin = (torch.tensor(list(ids), dtype=torch.long, device=model.device)
                       for ids in (suppress_ids, begin_suppress_ids))
    fixed_bias = None
    if not callable(allowed):  # the span and the suppressed ids in one bias, added once a step
        fixed_bias = bias_at(0)
        if len(suppress):
            fixed_bias = (torch.zeros(vocab.size, device=model.device) if fixed_bias is None
                          else fixed_bias).index_fill(0, suppress, float("-inf"))
        suppress = suppress[:0]

    dtype = next(model.parameters()).dtype
    size = static_cache_len(T + max_new_tokens, model.max_seq_len) if compile else T + max_new_tokens
    cache = KVCache(model.config.backbone, B, size, device=model.device, dtype=dtype)
    key_padding = attention_mask.bool().to(model.device) if attention_mask is not None else None
    if positions is not None:
        positions = positions.to(model.device)
    logits = model(input_ids.to(model.device), positions=positions, key_padding=key_padding, cache=cache,
                   media=media, streams=None if streams is None else streams.to(model.device),
                   last_only=True).logits[:, -1]
    decode = _decoder(model, cache, compile)
    next_pos = _next_positions(positions)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    seen = None  # ids seen per row (B, V), kept for the repetition penalty only
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab.size, dtype=torch.bool, device=model.device)
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows, cols = real.to(model.device).nonzero(as_tuple=True)
        seen[rows, input_ids.to(model.device)[rows, cols]] = True  # each row's prompt, not its padding
    for step in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        bias = bias_at(step) if callable(allowed) else fixed_bias
        if bias is not None:
            logits = logits + bias
        for ids in (suppress, begin) if step == 0 else (suppress,):
            if len(ids):
                logits = logits.index_fill(-1, ids, float("-inf"))
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, vocab.pad_id), nxt)
        yield nxt
        if seen is not None:
            seen[torch.arange(B, device=seen.device), nxt] = True
        done = done | torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = decode(nxt[:, None], _step_positions(next_pos, positions, step))


def _decoder(model, cache: KVCache, compile: bool):
    """A decoding step's model call, ``(ids (B, 1), positions or None: counted by the cache) ->
    logits (B, V)``: the eager forward, or the compiled step on the cache made static."""
    if not compile:
        return lambda ids, pos: model(ids, cache=cache, positions=pos).logits[:, -1]
    step = compiled_step()
    cache.make_static()

    def run(ids, pos):
        logits = step(model.decode_step, ids, cache.num_valid if pos is None else pos, cache)
        cache.advance(1, None)
        return logits

    return run


def _span_bias(size: int, span: range, device) -> torch.Tensor:
    """(size,) logit bias: 0 inside ``span``, -inf elsewhere."""
    bias = torch.full((size,), float("-inf"), device=device)
    bias[span.start:span.stop] = 0.0
    return bias


def _next_positions(positions: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) the position after each row's prompt when positions were given explicitly (M-RoPE
    prompts, whose media spans advance positions by less than their token count)."""
    if positions is None:
        return None
    return (positions.amax(dim=0) if positions.dim() == 3 else positions).amax(dim=-1) + 1


def _step_positions(next_pos, positions, step: int):
    """Positions of decode step ``step`` (text: the same value on every M-RoPE axis)."""
    if next_pos is None:
        return None  # the model counts from the cache
    pos = (next_pos + step)[:, None]
    return pos.expand(3, *pos.shape) if positions.dim() == 3 else pos


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


@torch.inference_mode()
def generate_audio_codes(model, input_ids: torch.Tensor, *, streams: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None,
                         prompt_codes: list[torch.Tensor] | None = None, max_frames: int = 150,
                         temperature: float = 1.0, top_k: int | None = 50,
                         top_p: float | None = None, seed: int | None = None) -> list[torch.Tensor]:
    """Generate audio codes after a prompt that ends inside an audio span (``<|audio|>`` and
    optionally the open-ended codes of a clip to continue), in the model's ``delay`` layout.

    input_ids (B, T) and streams (B, K-1, T): the rendered prompt (left padded). prompt_codes:
    per row the ``(K, P)`` codes already in the prompt (P may be 0): generation starts at frame P,
    and codebooks the prompt's last frames still lack are filled from these known codes.
    Stream 0 may end the span with ``<|/audio|>``; ``max_frames`` caps new frames per row.
    Returns per row the new frames' codes ``(K, F)`` (codebook-local ids).
    """
    vocab = model.vocab
    K = vocab.num_codebooks
    if not K:
        raise ValueError("this model has no audio codebooks, so it cannot generate audio")
    if model.config.audio_pattern != "delay" or K == 1:
        return _generate_audio_flat(model, input_ids, attention_mask, prompt_codes, max_frames,
                                    dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    B, T = input_ids.shape
    _check(model, input_ids, attention_mask, max_frames, temperature, top_k, top_p)
    prompt_codes = prompt_codes or [torch.zeros(K, 0, dtype=torch.long)] * B
    n0 = [int(c.shape[1]) for c in prompt_codes]
    steps = max_frames + K - 1
    if T + steps > model.max_seq_len:
        steps = model.max_seq_len - T
        if steps < K:
            raise ValueError(f"the prompt ({T} tokens) leaves no room for audio in the model's "
                             f"context of {model.max_seq_len}")
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    end_id = vocab.id("<|/audio|>")
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config.backbone, B, T + steps, device=model.device, dtype=dtype)
    key_padding = attention_mask.bool().to(model.device) if attention_mask is not None else None
    logits = model(input_ids.to(model.device), streams=None if streams is None else streams.to(model.device),
                   key_padding=key_padding, cache=cache, last_only=True).logits[:, -1]
    frames: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]  # row -> codebook -> codes
    end_step: list[int | None] = [None] * B
    ranges = [vocab.codebook_range(k) for k in range(K)]
    for g in range(steps):
        step_ids = torch.full((B, K), EMPTY, dtype=torch.long)
        for k in range(K):
            r = ranges[k]
            if k == 0:
                allowed = torch.full((vocab.size,), float("-inf"), device=logits.device)
                allowed[r.start:r.stop] = 0
                allowed[end_id] = 0
                pick = sample_next(logits + allowed, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
            else:
                pick = r.start + sample_next(logits[:, r.start:r.stop], temperature=temperature, top_k=top_k,
                                             top_p=top_p, generator=generator)
            for b in range(B):
                f = n0[b] + g - k  # the frame stream k carries at this step
                end = end_step[b]
                if f < 0 or (end is not None and n0[b] + end <= f + (k == 0)):
                    continue  # before the stream starts, or after the span ended
                if k == 0 and end is None and (g == max_frames or int(pick[b]) == end_id):
                    end_step[b] = g
                    step_ids[b, 0] = end_id
                elif f < n0[b]:
                    step_ids[b, k] = r.start + int(prompt_codes[b][k, f])  # known from the prompt
                else:
                    step_ids[b, k] = int(pick[b])
                    frames[b][k].append(int(pick[b]) - r.start)
        if all(e is not None and g >= e + K - 2 for e in end_step):
            break
        logits = model(step_ids[:, :1].to(model.device), streams=step_ids[:, 1:, None].to(model.device),
                       cache=cache).logits[:, -1]
    out = []
    for b in range(B):
        F_b = min(len(c) for c in frames[b])
        out.append(torch.tensor([c[:F_b] for c in frames[b]], dtype=torch.long).reshape(K, F_b))
    return out


def _generate_audio_flat(model, input_ids, attention_mask, prompt_codes, max_frames,
                         sampling) -> list[torch.Tensor]:
    """Flatten layout: one token per code, codebook k = step mod K (a prompt's open codes are whole
    frames, so generation starts at codebook 0); each step is constrained to its codebook."""
    vocab = model.vocab
    K = vocab.num_codebooks
    steps = iter_generate(model, input_ids, attention_mask=attention_mask, max_new_tokens=max_frames * K,
                          stop_ids=[], allowed=lambda step: vocab.codebook_range(step % K), **sampling)
    flat = torch.stack(list(steps), dim=1).cpu()  # (B, n)
    T = flat.shape[1] // K
    local = (flat[:, :T * K] - vocab.text_size) % vocab.codebook_size
    return [row.reshape(T, K).T.contiguous() for row in local]


class CTCPrefixScorer:
    """CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017; ESPnet's
    ``CTCPrefixScore``): ``log P(the transcript starts with h | audio)``, summed over every CTC
    alignment, for a beam of prefixes ``h`` and their candidate next tokens, one frame at a time.

    ``log_probs: (T, V)``, the CTC head's log-probabilities of one clip, ``blank`` its blank id. A
    prefix's state is ``(T, 2)``: the log-probability of it having been read by frame ``t`` ending in
    a non-blank (``r_n``) or a blank (``r_b``)."""

    def __init__(self, log_probs: torch.Tensor, blank: int = 0):
        self.x, self.blank = log_probs.float(), blank

    def initial_state(self) -> torch.Tensor:
        """``(1, T, 2)``: the empty prefix, read by blanks alone."""
        r = torch.full((1, self.x.shape[0], 2), float("-inf"), device=self.x.device)
        r[0, :, 1] = self.x[:, self.blank].cumsum(0)
        return r

    def final(self, state: torch.Tensor) -> torch.Tensor:
        """``(N,)``: log P(transcript == h) for prefix states ``(N, T, 2)``."""
        return torch.logaddexp(state[:, -1, 0], state[:, -1, 1])

    def score(self, state: torch.Tensor, length: int, last: torch.Tensor | None,
              cands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefixes of ``length`` tokens (states ``(N, T, 2)``, last ids ``(N,)``) extended by
        ``cands (N, K)``: their prefix log-probabilities ``(N, K)`` and states ``(N, K, T, 2)``."""
        x, T = self.x, self.x.shape[0]
        N, K = cands.shape
        xs = x[:, cands].permute(1, 2, 0)  # (N, K, T)
        r_sum = torch.logaddexp(state[..., 0], state[..., 1])  # (N, T)
        phi = r_sum[:, None, :].expand(N, K, T)
        if length > 0:  # a repeated token needs a blank between: only r_b leads into it
            phi = torch.where((cands == last[:, None])[..., None], state[:, None, :, 1], phi)
        r_n = torch.full((N, K, T), float("-inf"), device=x.device)
        r_b = torch.full_like(r_n, float("-inf"))
        if length == 0:
            r_n[..., 0] = xs[..., 0]
        start = max(length, 1)
        psi = r_n[..., start - 1].clone()
        for t in range(start, T):
            r_n[..., t] = torch.logaddexp(r_n[..., t - 1], phi[..., t - 1]) + xs[..., t]
            r_b[..., t] = torch.logaddexp(r_n[..., t - 1], r_b[..., t - 1]) + x[t, self.blank]
            psi = torch.logaddexp(psi, phi[..., t - 1] + xs[..., t])
        return psi, torch.stack([r_n, r_b], dim=-1)


@torch.inference_mode()
def beam_search(model, input_ids: torch.Tensor, *, num_beams: int = 4, ctc_weight: float = 0.0,
                max_new_tokens: int = 64, allowed: range | None = None, stop_ids: Sequence[int] | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                media: list | None = None, streams: torch.Tensor | None = None) -> list[int]:
    """The best continuation of one prompt ``(1, T)`` by beam search; its ids end with the stop id
    unless the length limit came first.

    ``ctc_weight > 0``: joint CTC/attention decoding (ESPnet's): each hypothesis scores
    ``(1 - w) * log P_decoder + w * log P_CTC-prefix``, the latter from the CTC head of the audio
    encoder over the prompt's one audio clip, so a transcript the decoder likes but the audio does
    not support (a dropped or invented word) loses. Hypotheses are ranked by that sum, with no
    length normalisation: the CTC term already penalises transcripts that stop early. Each
    hypothesis extends by its ``4 * num_beams`` likeliest tokens under the decoder and, when
    decoding jointly, by every token the CTC head ranks first at some frame (a word the decoder
    missed altogether can still come in)."""
    _check(model, input_ids, attention_mask, max_new_tokens, 0.0, None, None)
    if input_ids.shape[0] != 1:
        raise ValueError("beam search takes one prompt at a time")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    vocab, device = model.vocab, model.device
    stops = torch.tensor(list(stop_ids if stop_ids is not None else default_stop_ids(model)),
                         dtype=torch.long, device=device)
    scorer = _ctc_scorer(model, media, allowed) if ctc_weight else None
    T = input_ids.shape[1]
    max_new_tokens = min(max_new_tokens, model.max_seq_len - T)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config.backbone, 1, T + max_new_tokens, device=device, dtype=dtype)
    key_padding = attention_mask.bool().to(device) if attention_mask is not None else None
    if positions is not None:
        positions = positions.to(device)
    logits = model(input_ids.to(device), positions=positions, key_padding=key_padding, cache=cache,
                   media=media, streams=None if streams is None else streams.to(device),
                   last_only=True).logits[:, -1]
    next_pos = _next_positions(positions)
    bias = _span_bias(vocab.size, allowed or range(vocab.size), device)
    allowed_ids = torch.isfinite(bias)
    if scorer is not None:
        allowed_ids[scorer.blank] = False  # the blank (the pad id) is no transcript token
    pre_beam = min(4 * num_beams, int(allowed_ids.sum()))
    extra = stops if scorer is None else torch.cat([stops, scorer.x.argmax(-1).unique()])
    seqs, att, last = [[]], torch.zeros(1, device=device), None
    state = scorer.initial_state() if scorer else None
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        logp = (logits.float() + bias).log_softmax(-1)
        cands, valid = _candidates(logp, pre_beam, extra, allowed_ids)
        cand_att = logp.gather(1, cands).masked_fill(~valid, float("-inf"))  # (N, K)
        att_total = att[:, None] + cand_att
        joint = att_total
        if scorer is not None:
            psi, states = scorer.score(state, step, last, cands)
            psi = torch.where(torch.isin(cands, stops), scorer.final(state)[:, None], psi)
            joint = ((1 - ctc_weight) * att_total + ctc_weight * psi).masked_fill(~valid, float("-inf"))
        top, flat = joint.flatten().topk(min(num_beams, joint.numel()))
        toks = cands.flatten()[flat]
        ended = torch.isin(toks, stops) | (step == max_new_tokens - 1)
        K = cands.shape[1]
        for score, i, tok, end in zip(top.tolist(), flat.tolist(), toks.tolist(), ended.tolist()):
            if end:
                finished.append((score, seqs[i // K] + [tok]))
        keep = (~ended).nonzero().flatten()
        if not len(keep) or (finished and max(f[0] for f in finished) >= float(top[keep].max())):
            break  # scores only fall as hypotheses grow: no live one can overtake
        flat, toks = flat[keep], toks[keep]
        parents = flat // K
        seqs = [seqs[p] + [t] for p, t in zip(parents.tolist(), toks.tolist())]
        att = att_total.flatten()[flat]
        if scorer is not None:
            state = states.flatten(0, 1)[flat]
        last = toks
        cache.reorder(parents)
        if next_pos is not None:
            next_pos = next_pos[parents]
        logits = model(toks[:, None], cache=cache,
                       positions=_step_positions(next_pos, positions, step)).logits[:, -1]
    return max(finished, key=lambda f: f[0])[1]


def _candidates(logp: torch.Tensor, k: int, extra: torch.Tensor, allowed: torch.Tensor):
    """Each row's ``k`` likeliest ids and the ``extra`` ones, within ``allowed`` (V,), without
    repeats: ids ``(N, K)`` and which of them are real ``(N, K)`` (rows hold different counts)."""
    mask = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, logp.topk(k, dim=-1).indices, True)
    mask[:, extra] = True
    mask &= allowed
    counts = mask.sum(1)
    K = int(counts.max())
    cands = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]
    return cands, torch.arange(K, device=logp.device)[None, :] < counts[:, None]


def _ctc_scorer(model, media: list | None, allowed: range | None) -> CTCPrefixScorer:
    """The CTC prefix scorer over the prompt's one audio clip."""
    audio = [slot for _, slot in media or [] if slot.modality == "audio"]
    encoder = model.encoders["audio"] if "audio" in model.encoders else None
    if encoder is None or not getattr(encoder, "ctc_weight", 0):
        raise ValueError("ctc_weight needs a checkpoint whose audio encoder has a CTC head "
                         "(model.media.audio.ctc_weight in its recipe)")
    if len(audio) != 1:
        raise ValueError(f"ctc_weight needs a prompt with exactly one audio clip, this one has {len(audio)}")
    if allowed is None or allowed.stop > encoder.text_size:
        raise ValueError("joint CTC decoding produces text only (output='text')")
    log_probs, n = encoder.ctc_log_probs([audio[0].data.to(model.device)], model.embed.weight)
    return CTCPrefixScorer(log_probs[0, :int(n[0])])


# ---------------------------------------------------------------------------------------------
# Continuous batching


def _unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each (left-padded) prompt's own ids."""
    if attention_mask is None:
        return list(input_ids)
    return [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]


def _common_prefix(rows: list[torch.Tensor], ref: torch.Tensor) -> int:
    """How many ids every row shares with ``ref`` from its start, at most each row's length - 1
    (every row keeps an id of its own to prefill, whose logits it samples from)."""
    common = len(ref)
    for row in rows:
        n = min(len(row) - 1, len(ref))
        differ = (row[:n] != ref[:n]).nonzero()
        common = min(common, int(differ[0]) if len(differ) else n)
    return max(common, 0)


@dataclass
class RowSettings:
    """One prompt's decoding settings in a :class:`ContinuousBatch` (each row has its own)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class _Row:
    key: int
    settings: RowSettings
    generator: torch.Generator | None
    count: int = 0  # ids sampled so far
    cancelled: bool = False
    pending: int | None = None  # the id sampled last, until the forward that feeds it back (``advance``)


@dataclass
class _Group:
    """Rows decoding on one KV cache in its static layout: every step writes at ``cache.slot``
    and each row's ``cache.valid`` hides the slots that are not its own. Live rows come first."""

    cache: KVCache
    rows: list[_Row]
    logits: torch.Tensor  # (n, V): what each row samples next
    next_pos: torch.Tensor  # (rows of the cache,): each row's next position
    shared: bool  # the group new rows join (no cross-attention memory)

    @property
    def slot(self) -> int:
        return self.cache.length


class ContinuousBatch:
    """Continuous batching on a plain KV cache (vLLM's scheduling without its paged memory):
    prompts join a running decode at any step and rows leave it as they finish or are cancelled.

    ``add`` prefills a batch of prompts together (left padded, as :func:`iter_generate`) and copies
    their keys and values into the shared cache, whose rows are the live sequences: a row's slots are
    wherever its keys were written, since rotary positions are applied before caching and a mask
    says which slots each row reads. A joining prompt longer than the write slot moves the slot on
    (the skipped slots are nobody's); when the cache is full its rows are compacted to the left,
    and it grows (rows or slots, doubling) only when compaction is not enough. A leaving row is
    replaced by the last live row, so a step decodes exactly the live rows. ``step`` samples one id
    for every row (each with its own :class:`RowSettings`) and runs one decoding forward.

    Prompts of ids alone that begin alike (a chat template's system prompt) prefill their common
    prefix once; the keys and values of the last such prompt are kept, and a later prompt that
    begins as it did copies them instead of computing its prefix again (a one-entry prefix cache).
    Prompts that carry a cross-attention memory (Whisper-style audio) keep their own cache and
    are stepped beside the shared one, one forward per such group.
    """

    initial_size = (8, 256)  # rows and slots of the shared cache when it is made
    min_shared_prefix = 8  # a common prefix this long is prefilled once (or taken from the kept prompt)

    def __init__(self, model, *, allowed: range | None = None, stop_ids: Sequence[int] | None = None,
                 suppress_ids: Sequence[int] = (), begin_suppress_ids: Sequence[int] = ()):
        self.model = model
        self.stops = set(stop_ids if stop_ids is not None else default_stop_ids(model))
        size, device = model.vocab.size, model.device
        self.bias = (_span_bias(size, allowed, device) if allowed is not None
                     else torch.zeros(size, device=device))
        if len(suppress_ids):
            self.bias[torch.tensor(list(suppress_ids), device=device)] = float("-inf")
        self.begin = torch.tensor(list(begin_suppress_ids), dtype=torch.long, device=device)
        self.groups: list[_Group] = []
        self._keys = 0
        self._kept: tuple | None = None  # the last plain prompt: ids (P,), keys and values [(1, Hkv, P, hd)]
        self.num_reused = 0  # prompt ids whose keys and values were copied, not computed

    def __len__(self) -> int:
        """Live rows."""
        return sum(len(g.rows) for g in self.groups)

    @torch.inference_mode()
    def add(self, input_ids: torch.Tensor, settings: list[RowSettings], *,
            attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
            media: list | None = None, streams: torch.Tensor | None = None) -> list[int]:
        """Prefill prompts ``(B, T)`` (left padded; the inputs of :func:`iter_generate`) and
        return a key per row; their first ids come with the next :meth:`step`."""
        model = self.model
        _check(model, input_ids, attention_mask, 1, 0.0, None, None)
        if len(settings) != input_ids.shape[0]:
            raise ValueError(f"{len(settings)} settings for {input_ids.shape[0]} prompts")
        for s in settings:
            s.check()
        B, T = input_ids.shape
        device = model.device
        real = attention_mask.sum(-1).tolist() if attention_mask is not None else [T] * B
        for s, n in zip(settings, real):  # the context holds the prompt and what it generates
            s.max_new_tokens = min(s.max_new_tokens, model.max_seq_len - int(n))
        extra = max(s.max_new_tokens for s in settings)
        plain = media is None and streams is None and positions is None  # ids alone: a prefix can be shared
        rows = _unpadded(input_ids, attention_mask)
        kept = _common_prefix(rows, self._kept[0]) if plain and self._kept is not None else 0
        prefix = _common_prefix(rows, rows[0]) if plain and B > 1 else 0
        if max(kept, prefix) >= self.min_shared_prefix:
            cache, logits = self._prefill_shared(rows, max(kept, prefix), extra, reuse=kept >= prefix)
        else:
            cache = KVCache(model.config.backbone, B, T + extra, device=device,
                            dtype=next(model.parameters()).dtype)
            key_padding = attention_mask.bool().to(device) if attention_mask is not None else None
            out = model(input_ids.to(device), positions=None if positions is None else positions.to(device),
                        key_padding=key_padding, cache=cache, media=media,
                        streams=None if streams is None else streams.to(device), last_only=True)
            logits = out.logits[:, -1]
        if plain:  # the first prompt's keys and values, for the next prompts that begin as it does
            slots = cache.valid[0, :cache.length].nonzero().squeeze(1)
            self._kept = (rows[0].cpu(), [k[:1, :, slots] for k in cache.k],
                          [v[:1, :, slots] for v in cache.v])
        next_pos = (_next_positions(positions.to(device)) if positions is not None
                    else cache.num_valid[:, 0].clone())
        rows = []
        for s in settings:
            gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
            rows.append(_Row(self._keys, s, gen))
            self._keys += 1
        cache.make_static()
        if cache.memory is not None:  # cross-attention memory: a group of its own
            self.groups.append(_Group(cache, rows, logits, next_pos, shared=False))
        else:
            self._join(cache, rows, logits, next_pos)
        return [r.key for r in rows]

    def _prefill_shared(self, rows: list[torch.Tensor], prefix: int, extra: int,
                        reuse: bool) -> tuple[KVCache, torch.Tensor]:
        """Prefill prompts that all begin with the same ``prefix`` ids (a chat template's system
        prompt): the prefix once (or, ``reuse``, the kept prompt's keys and values for it), copied
        to every row, then each row's rest, left padded after it (padding in the middle of a row is
        masked like padding in front)."""
        model, device = self.model, self.model.device
        B = len(rows)
        rest_ids, rest_mask = left_pad([r[prefix:] for r in rows], model.vocab.pad_id)
        dtype = next(model.parameters()).dtype
        if reuse:
            keys, values = ([t[:, :, :prefix] for t in kv] for kv in self._kept[1:])
            self.num_reused += B * prefix
        else:
            one = KVCache(model.config.backbone, 1, prefix, device=device, dtype=dtype)
            model(rows[0][None, :prefix].to(device), cache=one)
            keys, values = one.k, one.v
            self.num_reused += (B - 1) * prefix
        size = prefix + rest_ids.shape[1] + extra
        cache = KVCache(model.config.backbone, B, size, device=device, dtype=dtype)
        for dst_kv, src_kv in ((cache.k, keys), (cache.v, values)):
            for dst, part in zip(dst_kv, src_kv):
                dst[:, :, :prefix] = part
        cache.length = prefix
        cache.num_valid.fill_(prefix)
        logits = model(rest_ids.to(device), key_padding=rest_mask.bool().to(device), cache=cache,
                       last_only=True).logits[:, -1]
        return cache, logits

    def cancel(self, key: int) -> None:
        """Drop a row before the next step samples (a client went away, a stop string was seen)."""
        for g in self.groups:
            for r in g.rows:
                if r.key == key:
                    r.cancelled = True

    def step(self) -> list[tuple[int, int | None, bool]]:
        """One id for every live row: ``(key, id, finished)``; ``id`` is None when the row ended at
        a stop id (which is not returned). A finished row has left the batch. The same as
        :meth:`sample` then :meth:`advance`."""
        out = self.sample()
        self.advance()
        return out

    @torch.inference_mode()
    def sample(self) -> list[tuple[int, int | None, bool]]:
        """:meth:`step` without its forward, for the rows that have no id waiting for one: the ids
        can go out to the clients before :meth:`advance` feeds them back. A server sends each id
        as soon as it is sampled, and when prompts arrive meanwhile it :meth:`add` s them before
        the forward, samples their first ids (the other rows keep theirs) and then runs one
        forward for all: a new prompt's first id waits for its prefill, not for a decoding step."""
        out = []
        for g in self.groups:
            self._drop(g, [i for i, r in enumerate(g.rows) if r.cancelled])
            todo = [i for i, r in enumerate(g.rows) if r.pending is None]
            if not todo:
                continue
            ended = []
            for i, t in zip(todo, self._sample(g, todo).tolist()):
                r = g.rows[i]
                r.count += 1
                stop = t in self.stops
                done = stop or r.count >= r.settings.max_new_tokens
                out.append((r.key, None if stop else t, done))
                r.pending = t
                if done:
                    ended.append(i)
            self._drop(g, ended)  # reorders the rows
        self.groups = [g for g in self.groups if g.rows or g.shared]
        return out

    @torch.inference_mode()
    def advance(self) -> None:
        """The decoding forward of the sampled ids, for each group whose rows all have one (after
        :meth:`sample`; rows added since are sampled first)."""
        for g in self.groups:
            if g.rows and all(r.pending is not None for r in g.rows):
                self._forward(g, torch.tensor([r.pending for r in g.rows], device=g.logits.device))
                for r in g.rows:
                    r.pending = None

    # -- internals ----------------------------------------------------------------------------

    def _sample(self, g: _Group, todo: list[int]) -> torch.Tensor:
        """Ids for rows ``todo`` (indices into ``g.rows``), in that order."""
        rows_of = [g.rows[i] for i in todo]
        logits = g.logits[torch.tensor(todo, device=g.logits.device)].float() + self.bias
        first = [i for i, r in enumerate(rows_of) if r.count == 0]
        if first and len(self.begin):
            logits[torch.tensor(first)[:, None], self.begin[None]] = float("-inf")
        ids = logits.argmax(-1)
        shared: dict[tuple, list[int]] = {}  # rows without a seed of their own sample together, by settings
        for i, r in enumerate(rows_of):
            s = r.settings
            if s.temperature <= 0:
                continue
            if r.generator is None:
                shared.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
            else:
                ids[i] = sample_next(logits[i:i + 1], temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                     generator=r.generator)[0]
        for (temperature, top_k, top_p), rows in shared.items():
            rows_t = torch.tensor(rows, device=ids.device)
            ids[rows_t] = sample_next(logits[rows_t], temperature=temperature, top_k=top_k, top_p=top_p)
        return ids

    def _forward(self, g: _Group, ids: torch.Tensor) -> None:
        n = len(g.rows)
        if g.shared:
            self._reserve(g, n, 0)
        cache = g.cache
        g.logits = self.model.decode_step(ids[:, None], g.next_pos[:n, None], cache.narrow(n))
        cache.slot += 1
        cache.length += 1
        g.next_pos[:n] += 1

    def _drop(self, g: _Group, gone: list[int]) -> None:
        """Remove rows ``gone`` (indices into ``g.rows``)."""
        if not gone:
            return
        if not g.shared:  # a small group of its own: keep the other rows
            keep = torch.tensor([i for i in range(len(g.rows)) if i not in set(gone)], dtype=torch.long)
            if len(keep):
                g.cache.reorder(keep)
                g.cache.cross_mask = g.cache.memory.mask(g.cache.length, 1, None)
                g.logits, g.next_pos = g.logits[keep], g.next_pos[keep]
            g.rows = [g.rows[i] for i in keep.tolist()]
            return
        c = g.cache
        for i in sorted(gone, reverse=True):  # the last live row takes the leaving row's place
            last = len(g.rows) - 1
            if i != last:
                for kv in (c.k, c.v):
                    for layer in kv:
                        layer[i] = layer[last]
                c.valid[i] = c.valid[last]
                g.next_pos[i] = g.next_pos[last]
                g.logits[i] = g.logits[last]
                g.rows[i] = g.rows[last]
            g.rows.pop()
        g.logits = g.logits[:len(g.rows)]

    def _join(self, src: KVCache, rows: list[_Row], logits: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Copy prefilled rows (their prompts in ``src``'s first ``src.length`` slots) into the
        shared group."""
        g = next((g for g in self.groups if g.shared), None)
        if g is None:
            g = self._new_shared(len(rows), src.length + 1, src.k[0].dtype)
            self.groups.insert(0, g)
        k, T, n = len(rows), src.length, len(g.rows)
        self._reserve(g, n + k, T)
        c, s = g.cache, g.slot
        if s < T:  # the prompt needs T slots before the write slot: move the slot on
            c.valid[:n, s:T] = False
            c.slot.fill_(T)
            c.length = s = T
        for dst_kv, src_kv in ((c.k, src.k), (c.v, src.v)):
            for dst, part in zip(dst_kv, src_kv):
                dst[n:n + k, :, s - T:s] = part[:, :, :T]
        c.valid[n:n + k] = True
        c.valid[n:n + k, :s - T] = False
        c.valid[n:n + k, s - T:s] = src.valid[:, :T]
        g.next_pos[n:n + k] = next_pos
        g.logits = torch.cat([g.logits[:n], logits])
        g.rows += rows

    def _new_shared(self, num_rows: int, num_slots: int, dtype) -> _Group:
        model = self.model
        rows, slots = self.initial_size
        cache = KVCache(model.config.backbone, max(rows, num_rows), max(slots, num_slots),
                        device=model.device, dtype=dtype)
        cache.make_static()
        return _Group(cache, [], torch.zeros(0, model.vocab.size, device=model.device),
                      torch.zeros(cache.valid.shape[0], dtype=torch.long, device=model.device), shared=True)

    def _reserve(self, g: _Group, num_rows: int, prompt_len: int) -> None:
        """Room for ``num_rows`` rows and a write slot after ``prompt_len`` slots (compacting, then
        growing the cache)."""
        c = g.cache
        R, S = c.valid.shape
        if max(prompt_len, g.slot) + 1 > S:
            self._compact(g)
        need = max(prompt_len, g.slot) + 1
        if num_rows <= R and need <= S:
            return
        while R < num_rows:
            R *= 2
        while S < need:
            S *= 2
        n, s = len(g.rows), g.slot
        big = KVCache(self.model.config.backbone, R, S, device=c.valid.device, dtype=c.k[0].dtype)
        for dst_kv, src_kv in ((big.k, c.k), (big.v, c.v)):
            for dst, part in zip(dst_kv, src_kv):
                dst[:n, :, :s] = part[:n, :, :s]
        big.valid[:n, :s] = c.valid[:n, :s]
        big.length = s
        big.make_static()
        pos = torch.zeros(R, dtype=torch.long, device=c.valid.device)
        pos[:n] = g.next_pos[:n]
        g.cache, g.next_pos = big, pos

    def _compact(self, g: _Group) -> None:
        """Move each row's slots to the left, in order; the write slot goes to the longest row's end."""
        c, n, s = g.cache, len(g.rows), g.slot
        if n == 0:
            c.valid.fill_(True)
            s = 0
        else:
            real = c.valid[:n, :s]
            counts = real.sum(1)
            order = (~real).to(torch.int8).argsort(dim=1, stable=True)  # (n, s): each row's slots first
            for kv in (c.k, c.v):
                for layer in kv:
                    idx = order[:, None, :, None].expand(n, layer.shape[1], s, layer.shape[3])
                    layer[:n, :, :s] = layer[:n, :, :s].gather(2, idx)
            new = int(counts.max())
            ar = torch.arange(c.max_len, device=c.valid.device)
            c.valid[:n] = (ar < counts[:, None]) | (ar >= new)
            s = new
        c.length = s
        c.slot.fill_(s)
