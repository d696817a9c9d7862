"""Codebook patterns, rendering audio codes into the sequence, the multi-stream loss, and a tiny
model that learns one clip's codes exactly and continues it through ``generate_audio_codes``."""

import pytest
import torch

from omni.generation import generate_audio_codes, left_pad
from omni.model.audio_codes import (
    EMPTY,
    delay_apply,
    delay_revert,
    flatten_apply,
    flatten_revert,
    from_vocab,
    to_vocab,
)
from omni.model.backbone import backbone_config
from omni.model.omni_model import OmniConfig, OmniModel
from omni.sequence import IGNORE, Message, Sample, Segment, pack, render
from omni.vocab import Vocab


@pytest.mark.parametrize("seed", range(6))
def test_patterns_round_trip_for_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    K, T = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(0, 50, (1,), generator=g))
    codes = torch.randint(0, 1024, (K, T), generator=g)
    pattern = delay_apply(codes)
    assert pattern.shape == (K, T + K - 1)
    assert torch.equal(delay_revert(pattern), codes)
    for k in range(K):  # stream k is shifted right by k, EMPTY elsewhere
        assert (pattern[k, :k] == EMPTY).all() and (pattern[k, k + T:] == EMPTY).all()
    flat = flatten_apply(codes)
    assert flat.shape == (K * T,)
    assert torch.equal(flatten_revert(flat, K), codes)
    if T:
        assert flat[:K].tolist() == codes[:, 0].tolist()  # frame-major


def test_vocab_offsets_round_trip():
    v = Vocab.default(100, num_codebooks=3, codebook_size=16)
    local = torch.tensor([[0, 15, EMPTY], [3, 4, 5], [7, EMPTY, 1]])
    ids = to_vocab(local, torch.arange(3)[:, None], v)
    assert ids[0, 0] == 100 and ids[1, 0] == 116 + 3 and ids[0, 2] == EMPTY
    book, loc = from_vocab(ids[ids != EMPTY], v)
    assert torch.equal(loc, local[local != EMPTY]) and torch.equal(book, torch.tensor([0, 0, 1, 1, 1, 2, 2]))


def _vocab(text_tokenizer, K=4, card=32):
    tv = text_tokenizer.vocab
    return Vocab(tv.text_size, tv.specials, K, card)


def test_render_delay_layout(text_tokenizer):
    v = _vocab(text_tokenizer)
    codes = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0))
    sample = Sample([Message(None, [Segment(text="hi"), Segment("audio", codes=codes)])])
    r = render(sample, text_tokenizer, vocab=v)
    a = r.ids.tolist().index(v.id("<|audio|>")) + 1
    steps = 6 + 4 - 1
    assert r.streams.shape == (3, len(r))
    full = torch.cat([r.ids[None, a:a + steps], r.streams[:, a:a + steps]])
    assert full[0, 6] == v.id("<|/audio|>")  # stream 0 ends right after the last frame's first code
    full[0, 6] = EMPTY
    local = torch.where(full == EMPTY, full, full - v.text_size - torch.arange(4)[:, None] * 32)
    assert torch.equal(delay_revert(local), codes)
    assert r.ids[a + steps] == v.eos_id
    # next-step targets on every stream, loss on the document's codes
    assert torch.equal(r.targets[a - 1:a + steps - 1],
                       r.ids[a:a + steps].masked_fill(r.ids[a:a + steps] == EMPTY, IGNORE))
    assert torch.equal(r.stream_targets[:, a - 1:a + steps - 1],
                       r.streams[:, a:a + steps].masked_fill(r.streams[:, a:a + steps] == EMPTY, IGNORE))
    # open end: cut at the last frame's first code, no end marker
    o = render(Sample([Message(None, [Segment("audio", codes=codes, open_end=True)])]), text_tokenizer,
               vocab=v, add_generation_prompt=True)
    assert o.ids[-1] == v.text_size + int(codes[0, -1]) and len(o) == 2 + 6
    # packing carries the streams
    (row,) = pack([r], len(r) + 5, v.pad_id)
    assert torch.equal(row.streams[:, :len(r)], r.streams) and (row.streams[:, len(r):] == EMPTY).all()


def test_render_flatten_layout_and_bad_codes(text_tokenizer):
    v = _vocab(text_tokenizer)
    codes = torch.randint(0, 32, (4, 3), generator=torch.Generator().manual_seed(1))
    r = render(Sample([Message(None, [Segment("audio", codes=codes)])]), text_tokenizer, vocab=v,
               audio_pattern="flatten")
    assert r.streams is None
    span = r.ids[2:2 + 12]
    book, local = from_vocab(span, v)
    assert book.tolist() == [0, 1, 2, 3] * 3 and torch.equal(flatten_revert(local, 4), codes)
    with pytest.raises(ValueError, match="3 codebooks but the vocabulary has 4"):
        render(Sample([Message(None, [Segment("audio", codes=codes[:3])])]), text_tokenizer, vocab=v)
    with pytest.raises(ValueError, match=r"in \[0, 32\)"):
        render(Sample([Message(None, [Segment("audio", codes=codes + 40)])]), text_tokenizer, vocab=v)


def _overfit(text_tokenizer, pattern, codes, steps):
    v = _vocab(text_tokenizer)
    torch.manual_seed(0)
    cfg = OmniConfig(backbone_config("debug", max_seq_len=256), v, tie_embeddings=False,
                     audio_pattern=pattern)
    model = OmniModel(cfg)
    model.reset_parameters()
    sample = Sample([Message(None, [Segment(text="beep"), Segment("audio", codes=codes)])])
    r = render(sample, text_tokenizer, vocab=v, audio_pattern=pattern)
    batch = dict(input_ids=r.ids[None], targets=r.targets[None])
    if r.streams is not None:
        batch.update(streams=r.streams[None], stream_targets=r.stream_targets[None])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(steps):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), v, first, loss.item()


@pytest.mark.parametrize("pattern, steps", [("delay", 150), ("flatten", 150)])
def test_tiny_model_learns_one_clip_exactly_and_continues_it(text_tokenizer, pattern, steps):
    codes = torch.randint(0, 32, (4, 24), generator=torch.Generator().manual_seed(2))
    model, v, first, last = _overfit(text_tokenizer, pattern, codes, steps)
    assert last < 0.05 * first, (first, last)
    P = 8  # prompt: the text and the clip's first P frames, left open
    prompt = Sample([Message(None, [Segment(text="beep"),
                                    Segment("audio", codes=codes[:, :P], open_end=True)])])
    r = render(prompt, text_tokenizer, vocab=v, audio_pattern=pattern, add_generation_prompt=True)
    (new,) = generate_audio_codes(model, r.ids[None], streams=None if r.streams is None else r.streams[None],
                                  prompt_codes=[codes[:, :P]], max_frames=40, temperature=0.0)
    if pattern == "delay":  # the model also learned where the clip ends
        assert torch.equal(new, codes[:, P:])
    else:
        assert torch.equal(new[:, :24 - P], codes[:, P:])


def test_batched_delay_generation_matches_single(text_tokenizer):
    codes = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(3))
    model, v, _, _ = _overfit(text_tokenizer, "delay", codes, 120)
    prompts = []
    for P in (3, 7):
        s = Sample([Message(None, [Segment(text="beep"),
                                   Segment("audio", codes=codes[:, :P], open_end=True)])])
        prompts.append((render(s, text_tokenizer, vocab=v, add_generation_prompt=True), codes[:, :P]))
    singles = [generate_audio_codes(model, r.ids[None], streams=r.streams[None], prompt_codes=[c],
                                    max_frames=20, temperature=0.0)[0] for r, c in prompts]
    ids, mask = left_pad([r.ids.tolist() for r, _ in prompts], v.pad_id)
    T = ids.shape[1]
    streams = torch.full((2, 3, T), EMPTY, dtype=torch.long)
    for i, (r, _) in enumerate(prompts):
        streams[i, :, T - len(r):] = r.streams
    batched = generate_audio_codes(model, ids, streams=streams, attention_mask=mask,
                                   prompt_codes=[c for _, c in prompts], max_frames=20, temperature=0.0)
    for a, b in zip(singles, batched):
        assert torch.equal(a, b)
