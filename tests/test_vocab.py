import json

import pytest

from omni.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Vocab


def test_default_layout_puts_specials_after_meta_pieces():
    v = Vocab.default(512)
    assert (v.pad_id, v.unk_id, v.bos_id, v.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert [v.id(t) for t in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert v.id("<|eot|>") == 7
    assert v.size == 512


def test_unknown_special_token_is_named():
    with pytest.raises(ValueError, match=r"<\|nope\|>"):
        Vocab.default(512).id("<|nope|>")


def test_codebook_ranges_are_contiguous_and_disjoint():
    v = Vocab.default(512, num_codebooks=3, codebook_size=100)
    assert v.size == 512 + 300
    ranges = [v.codebook_range(k) for k in range(3)]
    assert ranges == [range(512, 612), range(612, 712), range(712, 812)]
    assert [i for r in ranges for i in r] == list(range(v.text_size, v.size))
    for k in (-1, 3):
        with pytest.raises(ValueError, match=f"codebook {k} out of range"):
            v.codebook_range(k)


def test_spans():
    v = Vocab.default(512, num_codebooks=2, codebook_size=64)
    assert v.span("text") == range(0, 512)
    assert v.span("audio") == range(512, 512 + 128)
    with pytest.raises(ValueError, match="cannot produce audio"):
        Vocab.default(512).span("audio")
    with pytest.raises(ValueError, match="'video'.*text.*audio"):
        v.span("video")


@pytest.mark.parametrize("kwargs", [dict(text_size=0), dict(text_size=10, num_codebooks=2),
                                    dict(text_size=10, codebook_size=5)])
def test_bad_layouts(kwargs):
    with pytest.raises(ValueError):
        Vocab(**kwargs)


def test_dict_round_trip_through_json():
    v = Vocab.default(300, num_codebooks=4, codebook_size=32)
    back = Vocab.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v
    assert back.codebook_range(3) == v.codebook_range(3)
    assert Vocab.from_dict({"text_size": 20}) == Vocab(20)


def test_special_ids_are_per_instance_and_travel_through_json():
    v = Vocab(100, {"<|user|>": 99}, pad_id=7, unk_id=0, bos_id=1, eos_id=2)
    assert (v.pad_id, v.unk_id, v.bos_id, v.eos_id) == (7, 0, 1, 2)
    assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert Vocab(100).bos_id == BOS_ID  # untouched callers keep SentencePiece's layout
    old = {"text_size": 100, "specials": {}}  # a config.json written before the ids were fields
    assert (Vocab.from_dict(old).pad_id, Vocab.from_dict(old).eos_id) == (PAD_ID, EOS_ID)


def test_special_ids_must_be_text_ids():
    with pytest.raises(ValueError, match=r"eos_id.*\[0, 10\)"):
        Vocab(10, eos_id=10)
