import pytest
import torch
import torch.nn.functional as F

from omni.generation import (
    CTCPrefixScorer,
    beam_search,
    generate,
    iter_generate,
    left_pad,
    penalize_repeats,
    sample_next,
)
from omni.model.backbone import KVCache


def _prompt(tok, text):
    return [tok.vocab.bos_id] + tok.encode(text)


PROMPTS = ["Zero", "The number one is", "Mathematics is the study of numbers, shapes and patterns"]


@pytest.fixture(scope="module")
def model(sampling_model):
    return sampling_model


@torch.no_grad()
def _greedy_by_recomputation(model, ids: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        for t in set(seq):  # CTRL's penalty, written out
            logits[t] = logits[t] / repetition_penalty if logits[t] > 0 else logits[t] * repetition_penalty
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_cached_greedy_equals_full_recomputation(model, text_tokenizer):
    ids = _prompt(text_tokenizer, PROMPTS[1])
    out = generate(model, torch.tensor([ids]), max_new_tokens=12, stop_ids=[])
    expect = _greedy_by_recomputation(model, ids, 12)
    assert out.tolist() == [expect]
    assert len(set(expect)) > 3  # the model does not just repeat itself, so the check has teeth


@torch.no_grad()
def test_cached_logits_equal_uncached_logits(model, text_tokenizer):
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS], text_tokenizer.vocab.pad_id)
    B, T = ids.shape
    cache = KVCache(model.config.backbone, B, T + 6)
    logits = model(ids, key_padding=mask.bool(), cache=cache).logits[:, -1]
    seqs = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    for step in range(6):
        for b, seq in enumerate(seqs):
            full = model(torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[b], full, atol=1e-4, rtol=0, msg=f"row {b} step {step}")
        nxt = logits.argmax(-1)
        for b in range(B):
            seqs[b].append(int(nxt[b]))
        logits = model(nxt[:, None], cache=cache).logits[:, -1]


def test_left_padded_batch_equals_each_prompt_alone(model, text_tokenizer):
    prompts = [_prompt(text_tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    ids, mask = left_pad(prompts, text_tokenizer.vocab.pad_id)
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=10, stop_ids=[])
    for row, p in zip(batch.tolist(), prompts):
        assert row == generate(model, torch.tensor([p]), max_new_tokens=10, stop_ids=[]).tolist()[0]
    assert len({tuple(r) for r in batch.tolist()}) == 3


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_ids(model, text_tokenizer):
    """compile=True (a compiled static-shape step; one row takes the one-row matmul path) decodes
    the same greedy ids as the eager loop, a left-padded batch included."""
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS], text_tokenizer.vocab.pad_id)
    for rows in (slice(2, 3), slice(0, 3)):
        args = dict(attention_mask=mask[rows], max_new_tokens=12, stop_ids=[])
        eager = generate(model, ids[rows], **args)
        assert torch.equal(generate(model, ids[rows], compile=True, **args), eager)


def test_top_k_1_and_tiny_top_p_equal_greedy(model, text_tokenizer):
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS], text_tokenizer.vocab.pad_id)
    kw = dict(attention_mask=mask, max_new_tokens=10, stop_ids=[])
    greedy = generate(model, ids, **kw)
    assert torch.equal(generate(model, ids, temperature=1.0, top_k=1, seed=0, **kw), greedy)
    assert torch.equal(generate(model, ids, temperature=1.0, top_p=1e-6, seed=0, **kw), greedy)


def test_seeded_sampling_is_reproducible(model, text_tokenizer):
    ids = torch.tensor([_prompt(text_tokenizer, PROMPTS[0])] * 2)
    kw = dict(max_new_tokens=16, stop_ids=[], temperature=1.0)
    a = generate(model, ids, seed=123, **kw)
    assert torch.equal(a, generate(model, ids, seed=123, **kw))
    assert not torch.equal(a, generate(model, ids, seed=124, **kw))
    assert not torch.equal(a[0], a[1])  # rows draw their own samples
    assert not torch.equal(a, generate(model, ids, max_new_tokens=16, stop_ids=[]))


def test_sample_next_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top_k.tolist()) == {0, 1}
    # top_p=0.7: token 2 is dropped because the mass before it (0.8) already reaches 0.7
    top_p = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(top_p.tolist()) == {0, 1}
    full = sample_next(logits, temperature=1.0, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert torch.equal(sample_next(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_allowed_range_constrains_every_output(model, text_tokenizer, temperature):
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS], text_tokenizer.vocab.pad_id)
    allowed = range(300, 340)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_ids=[], allowed=allowed,
                   temperature=temperature, seed=0)
    assert out.shape == (3, 12)
    assert ((out >= allowed.start) & (out < allowed.stop)).all()


def test_stop_ids_end_a_row_and_the_rest_is_pad(model, text_tokenizer):
    pad = text_tokenizer.vocab.pad_id
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS], pad)
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_ids=[]).tolist()
    stop = ref[0][3]
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_ids=[stop]).tolist()
    for row, r in zip(out, ref):
        if stop in r:
            k = r.index(stop)
            assert row[:k + 1] == r[:k + 1] and set(row[k + 1:]) <= {pad}
        else:
            assert row == r
    assert out[0][3] == stop and len(out[0]) > 4 and set(out[0][4:]) == {pad}


@pytest.mark.parametrize("marker", ["eos", "<|eot|>"])
def test_default_stops_are_eos_and_eot(model, text_tokenizer, marker):
    v = text_tokenizer.vocab
    stop = v.eos_id if marker == "eos" else v.id(marker)
    ids = torch.tensor([_prompt(text_tokenizer, PROMPTS[0])] * 2)
    out = generate(model, ids, max_new_tokens=8, allowed=range(stop, stop + 1))
    assert out.tolist() == [[stop], [stop]]  # all rows stopped: decoding ends early


def test_generation_stops_at_the_context_length(model):
    T = model.max_seq_len - 3
    out = generate(model, torch.full((1, T), 300), max_new_tokens=10, stop_ids=[])
    assert out.shape == (1, 3)


@pytest.mark.parametrize("extra", [0, 1])
def test_prompt_as_long_as_the_context_is_an_error(model, extra):
    n = model.max_seq_len + extra
    with pytest.raises(ValueError, match=f"context.*{model.max_seq_len}|{model.max_seq_len}.*context"):
        generate(model, torch.full((1, n), 300), max_new_tokens=1)


def test_penalize_repeats_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert penalize_repeats(logits, seen, 0.5).tolist() == [[4.0, -1.0, 2.0, -2.0]]
    assert penalize_repeats(logits, seen, 1.0) is logits


@pytest.mark.parametrize("penalty", [1.3, 0.2])
def test_repetition_penalty_counts_prompt_and_generated_ids_not_padding(model, text_tokenizer, penalty):
    prompts = [_prompt(text_tokenizer, p) for p in PROMPTS]
    plain = [_greedy_by_recomputation(model, p, 10) for p in prompts]
    expect = [_greedy_by_recomputation(model, p, 10, penalty) for p in prompts]
    assert expect != plain  # the penalty changes what greedy picks, so the check has teeth
    ids, mask = left_pad(prompts, text_tokenizer.vocab.pad_id)
    kw = dict(attention_mask=mask, max_new_tokens=10, stop_ids=[], repetition_penalty=penalty)
    assert generate(model, ids, **kw).tolist() == expect
    assert generate(model, ids, temperature=1.0, top_k=1, seed=0, **kw).tolist() == expect  # sampling too


def test_bad_inputs(model):
    ok = torch.tensor([[2, 300]])
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no prompts"):
        left_pad([], 0)
    with pytest.raises(ValueError, match="LongTensor"):
        generate(model, ok.float())
    with pytest.raises(ValueError, match=r"input ids must be in \[0, 512\)"):
        generate(model, torch.tensor([[2, 512]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ok, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ok, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ok, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, ok, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ok, attention_mask=torch.ones(1, 3))


def test_iter_generate_yields_one_step_at_a_time(model, text_tokenizer):
    ids = torch.tensor([_prompt(text_tokenizer, PROMPTS[2])])
    steps = list(iter_generate(model, ids, max_new_tokens=5, stop_ids=[]))
    assert len(steps) == 5 and all(s.shape == (1,) for s in steps)
    assert torch.stack(steps, 1).tolist() == generate(model, ids, max_new_tokens=5, stop_ids=[]).tolist()
    assert model.generate(ids, max_new_tokens=5, stop_ids=[]).tolist() == torch.stack(steps, 1).tolist()


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@torch.no_grad()
def test_kv_cache_reorder_repeats_and_permutes_rows(model, text_tokenizer):
    ids, mask = left_pad([_prompt(text_tokenizer, p) for p in PROMPTS[:2]], text_tokenizer.vocab.pad_id)
    cache = KVCache(model.config.backbone, 2, ids.shape[1] + 2)
    logits = model(ids, key_padding=mask.bool(), cache=cache).logits[:, -1]
    cache.reorder(torch.tensor([1, 0, 1]))
    nxt = logits.argmax(-1)[[1, 0, 1]]
    after = model(nxt[:, None], cache=cache).logits[:, -1]
    for row, b in enumerate([1, 0, 1]):
        seq = ids[b][mask[b].bool()].tolist() + [int(nxt[row])]
        torch.testing.assert_close(after[row], model(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=0)


def test_beam_of_one_is_greedy_and_wider_beams_score_at_least_as_well(model, text_tokenizer):
    ids = torch.tensor([_prompt(text_tokenizer, PROMPTS[1])])
    greedy = generate(model, ids, max_new_tokens=8, stop_ids=[]).tolist()[0]
    assert beam_search(model, ids, num_beams=1, max_new_tokens=8, stop_ids=[]) == greedy

    def logp(seq):
        full = torch.cat([ids[0], torch.tensor(seq)])[None]
        lp = model(full).logits[0, ids.shape[1] - 1:-1].log_softmax(-1)
        return float(lp.gather(1, torch.tensor(seq)[:, None]).sum().detach())

    wide = beam_search(model, ids, num_beams=4, max_new_tokens=8, stop_ids=[])
    assert len(wide) == 8 and logp(wide) >= logp(greedy) - 1e-4
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        beam_search(model, ids, num_beams=0)
    with pytest.raises(ValueError, match="one prompt at a time"):
        beam_search(model, ids.repeat(2, 1))
    with pytest.raises(ValueError, match="CTC head"):
        beam_search(model, ids, ctc_weight=0.5)


def test_ctc_prefix_scores_are_consistent_probabilities():
    """The prefix scores are exact: the full score of y is CTC's likelihood, and a prefix's
    probability splits into "the transcript is exactly h" plus every one-token extension."""
    torch.manual_seed(0)
    T, V = 9, 5
    x = torch.randn(T, V).log_softmax(-1)
    scorer = CTCPrefixScorer(x)
    every = torch.arange(1, V)[None]  # all non-blank tokens
    state, last, y = scorer.initial_state(), None, [2, 2, 4]
    psi, states = scorer.score(state, 0, last, every)
    total = torch.logsumexp(torch.cat([psi[0], scorer.final(state)]), 0)
    assert abs(float(total)) < 1e-4  # P(empty) + sum_c P(starts with c) = 1
    for i, tok in enumerate(y):
        psi, states = scorer.score(state, i, last, every)
        state, last = states[:, tok - 1], torch.tensor([tok])
        prefix = psi[0, tok - 1]
        following, _ = scorer.score(state, i + 1, last, every)
        split = torch.logsumexp(torch.cat([following[0], scorer.final(state)]), 0)
        torch.testing.assert_close(split, prefix, atol=1e-4, rtol=0)
    nll = F.ctc_loss(x[:, None], torch.tensor([y]), torch.tensor([T]), torch.tensor([len(y)]), blank=0,
                     reduction="sum")
    torch.testing.assert_close(scorer.final(state)[0], -nll, atol=1e-4, rtol=0)


@pytest.mark.parametrize("allowed", [None, "text"])
def test_suppressed_ids_never_come_out_and_begin_suppressed_not_first(model, text_tokenizer, allowed):
    """The span, the suppress list (folded into one bias) and the first step's begin list."""
    ids = torch.tensor([_prompt(text_tokenizer, PROMPTS[1])])
    span = text_tokenizer.vocab.span("text") if allowed else None
    free = generate(model, ids, max_new_tokens=6, stop_ids=[], allowed=span)[0].tolist()
    suppress, begin = free[1:3], free[:1]
    out = generate(model, ids, max_new_tokens=6, stop_ids=[], allowed=span, suppress_ids=suppress,
                   begin_suppress_ids=begin)[0].tolist()
    assert not set(out) & set(suppress) and out[0] not in begin
    if span is not None:
        assert all(i in span for i in out)
    logits = model(ids).logits[0, -1]
    if span is not None:
        logits[:span.start], logits[span.stop:] = -float("inf"), -float("inf")
    logits[suppress + begin] = -float("inf")
    assert out[0] == int(logits.argmax())


def test_continuous_batch_matches_each_prompt_alone(model, text_tokenizer):
    """Prompts joining a running decode at different steps (the cache compacting and growing on
    the way), rows leaving at their own lengths, and a cancelled row: each row's greedy ids are
    those of its prompt decoded alone."""
    from omni.generation import ContinuousBatch, RowSettings

    prompts = [_prompt(text_tokenizer, p) for p in PROMPTS * 3]
    lengths = [5, 40, 12, 30, 3, 25, 8, 17, 35]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_ids=[])[0].tolist()
             for p, n in zip(prompts, lengths)]
    batch = ContinuousBatch(model, stop_ids=[])
    batch.initial_size = (2, 16)  # small, so the cache compacts and grows
    got: dict[int, list[int]] = {}
    keys: list[int] = []
    joins = {0: [0], 2: [1, 2], 9: [3], 10: [4, 5], 30: [6, 7, 8]}  # step -> prompts joining then
    step = 0
    while step < 200 and (step <= max(joins) or len(batch)):
        for i in joins.get(step, []):
            ids, mask = left_pad([prompts[j] for j in [i]], 0)
            keys += batch.add(ids, [RowSettings(max_new_tokens=lengths[i])], attention_mask=mask)
        if step == 34:  # two prompts prefilled together (left padded) join late
            ids, mask = left_pad([prompts[0], prompts[2]], 0)
            extra = batch.add(ids, [RowSettings(max_new_tokens=20), RowSettings(max_new_tokens=20)],
                              attention_mask=mask)
        if step == 36:
            batch.cancel(extra[0])
        for key, t, _ in batch.step():
            got.setdefault(key, []).append(t)
        step += 1
    assert [got[k] for k in keys] == alone
    alone = generate(model, torch.tensor([prompts[2]]), max_new_tokens=20, stop_ids=[])[0].tolist()
    assert got[extra[1]] == alone
    assert len(got[extra[0]]) == 2  # cancelled after two ids
    assert len(batch) == 0


def test_prompts_added_between_sample_and_advance_decode_as_alone(model, text_tokenizer):
    """A server's order: ``sample`` (the ids go out), then the prompts that arrived meanwhile are
    added and ``sample`` gives only their first ids, then one ``advance`` for every row. Each row's
    greedy ids are still its prompt's alone; the rows already decoding get no id twice."""
    from omni.generation import ContinuousBatch, RowSettings

    prompts = [_prompt(text_tokenizer, p) for p in PROMPTS]
    lengths = [12, 9, 7]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_ids=[])[0].tolist()
             for p, n in zip(prompts, lengths)]
    batch = ContinuousBatch(model, stop_ids=[])
    got: dict[int, list[int]] = {}

    def take(events):
        for key, t, _ in events:
            got.setdefault(key, []).append(t)
        return [key for key, _, _ in events]

    keys = batch.add(torch.tensor([prompts[0]]), [RowSettings(max_new_tokens=lengths[0])])
    for i in (1, 2):
        take(batch.step())
        take(batch.sample())
        keys += batch.add(torch.tensor([prompts[i]]), [RowSettings(max_new_tokens=lengths[i])])
        assert take(batch.sample()) == [keys[i]]  # only the new row: the others' ids wait for the forward
        batch.advance()
    while len(batch):
        take(batch.step())
    assert [got[k] for k in keys] == alone


def test_prompts_with_a_common_prefix_prefill_it_once_with_the_same_ids(model, text_tokenizer):
    """Prompts added together that share a prefix (a chat template's system prompt) prefill it once;
    each row's greedy ids are still its prompt's alone."""
    from omni.generation import ContinuousBatch, RowSettings, _common_prefix, _unpadded

    head = "Mathematics is the study of numbers, shapes and patterns."
    prompts = [_prompt(text_tokenizer, f"{head} {tail}") for tail in ("Zero", "The number one is", "A cat")]
    ids, mask = left_pad(prompts, 0)
    rows = _unpadded(ids, mask)
    assert _common_prefix(rows, rows[0]) >= ContinuousBatch.min_shared_prefix
    batch = ContinuousBatch(model, stop_ids=[])
    keys = batch.add(ids, [RowSettings(max_new_tokens=10) for _ in prompts], attention_mask=mask)
    got: dict[int, list[int]] = {}
    while len(batch):
        for key, t, _ in batch.step():
            got.setdefault(key, []).append(t)
    alone = [generate(model, torch.tensor([p]), max_new_tokens=10, stop_ids=[])[0].tolist() for p in prompts]
    assert [got[k] for k in keys] == alone


def test_a_later_prompt_reuses_the_kept_prompts_prefix(model, text_tokenizer):
    """A prompt added after another that began the same way copies the kept keys and values of
    their common prefix, and decodes the same ids as alone."""
    from omni.generation import ContinuousBatch, RowSettings

    head = "Mathematics is the study of numbers, shapes and patterns."
    first, second = (_prompt(text_tokenizer, f"{head} {tail}") for tail in ("Zero", "The number one is"))
    batch = ContinuousBatch(model, stop_ids=[])
    got: dict[int, list[int]] = {}
    keys = batch.add(torch.tensor([first]), [RowSettings(max_new_tokens=6)])
    for _ in range(3):
        for key, t, _ in batch.step():
            got.setdefault(key, []).append(t)
    assert batch.num_reused == 0
    keys += batch.add(torch.tensor([second]), [RowSettings(max_new_tokens=8)])
    assert batch.num_reused >= ContinuousBatch.min_shared_prefix  # the head's ids were not computed again
    while len(batch):
        for key, t, _ in batch.step():
            got.setdefault(key, []).append(t)
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, stop_ids=[])[0].tolist()
             for p, n in ((first, 6), (second, 8))]
    assert [got[k] for k in keys] == alone
