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
