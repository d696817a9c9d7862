import math

import pytest

from omni.metrics import bleu, cer, cider_d, edit_distance, lower_is_better, normalize, wer


def test_normalize_drops_punctuation_keeps_apostrophes():
    assert normalize("  Hello, World!  It's 'quoted'. ") == "hello world it's quoted"


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a"]) == 1


def test_wer_and_cer_known_values():
    assert wer(["the cat sat on the mat"], ["the cat sat on mat"]) == pytest.approx(1 / 6)
    assert wer(["a b", "c d e"], ["a x", "c d e f"]) == pytest.approx(2 / 5)  # corpus-level
    assert wer(["Turn ON the light."], ["turn on the light"]) == 0.0
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])


def test_bleu_known_value_and_bounds():
    hyp, ref = "the cat is on the mat", "the cat sat on the mat"
    assert bleu([ref], [hyp], max_n=2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert bleu([ref], [hyp]) == 0.0  # no 4-gram matches
    assert bleu([[ref, "x"]], [ref]) == pytest.approx(1.0)
    # brevity penalty: a short exact prefix is punished
    assert bleu([ref], ["the cat sat on"], max_n=2) == pytest.approx(math.exp(1 - 6 / 4))


def test_cider_d_ranks_captions():
    refs = [["a blue truck moves left"], ["a red apple"], ["a dog barks loudly"], ["a green tree"]]
    perfect = [r[0] for r in refs]
    wrong = ["a green tree", "a dog barks loudly", "a red apple", "a blue truck moves left"]
    good = cider_d(refs, perfect)
    assert good > 5.0
    assert cider_d(refs, wrong) < 0.5 < good
    assert cider_d(refs, ["a blue truck moves", "a red apple", "a dog barks", "a green tree"]) < good


def test_lower_is_better_for_error_rates_losses_and_perplexity():
    assert all(map(lower_is_better, ["val_loss", "asr.wer", "speech:audio.cer", "text.ppl", "x.aux_loss"]))
    assert not any(map(lower_is_better, ["stamps.cider_d", "asr.bleu4", "text.next_token_accuracy"]))
