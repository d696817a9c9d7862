import pytest
import torch

import omni
from omni import api
from omni.generation import generate
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model


@pytest.fixture(scope="module")
def model(sampling_model):
    return sampling_model


def _expected(model, text, n):
    tok = model.tokenizer
    ids = torch.tensor([[tok.vocab.bos_id] + tok.encode(text)])
    new = generate(model, ids, max_new_tokens=n, allowed=tok.vocab.span("text"))[0].tolist()
    stops = {tok.vocab.eos_id, tok.vocab.pad_id, tok.vocab.id("<|eot|>")}
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tok.decode(new[:cut])


def test_generate_text_returns_str(model):
    out = model.generate("Once upon a time", max_new_tokens=10)
    assert isinstance(out, str) and out
    assert out == _expected(model, "Once upon a time", 10)
    assert model.generate(["Once upon a time"], max_new_tokens=10) == out  # one prompt as a list of pieces


def test_generate_batch_returns_one_text_per_prompt(model):
    out = model.generate([["Zero is"], ["The integers"]], max_new_tokens=8)
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)
    assert out == [model.generate("Zero is", max_new_tokens=8), model.generate("The integers", max_new_tokens=8)]
    assert out[0] != out[1]


@pytest.mark.parametrize("prompts", ["Once upon a time", [["Zero is"], ["The integers are"]]])
def test_streaming_pieces_join_to_the_greedy_result(model, prompts):
    pieces = list(model.generate(prompts, max_new_tokens=12, stream=True))
    full = model.generate(prompts, max_new_tokens=12)
    if isinstance(prompts, str):
        assert all(isinstance(p, str) for p in pieces)
        assert "".join(pieces) == full
        assert len(pieces) > 1
    else:
        assert all(isinstance(p, list) and len(p) == 2 for p in pieces)
        assert ["".join(p[i] for p in pieces) for i in range(2)] == full


def test_streaming_does_not_break_multibyte_characters(model, monkeypatch):
    """Byte-fallback pieces of one character arrive in separate steps; the stream must not emit
    a replacement character for the half-decoded character."""
    tok = model.tokenizer
    text = "é日🎉 ok"
    new = tok.encode(text)
    assert sum(tok.sp.is_byte(i) for i in new) >= 6  # the three characters are spelled in bytes
    new.append(tok.vocab.eos_id)
    assert tok.decode(new) == text

    def scripted(model_, ids, **kwargs):
        for t in new:
            yield torch.tensor([t] * ids.shape[0])

    monkeypatch.setattr(api, "iter_generate", scripted)
    # encode() adds SentencePiece's "▁" prefix; as a continuation of the prompt it is a real space
    assert "".join(model.generate("Say it", stream=True)) == " " + text
    assert ["".join(col) for col in zip(*model.generate([["a"], ["b"]], stream=True))] == [" " + text] * 2
    # cut by max_new_tokens in the middle of a character: what was held back still comes out
    new[:] = tok.encode("ab日")[:-1]
    assert "".join(model.generate("Say it", stream=True)) == " " + tok.decode(new)
    assert tok.decode(new).startswith("ab\ufffd")


def test_output_audio_is_refused_naming_what_the_checkpoint_produces(model):
    with pytest.raises(ValueError, match="output='audio'.*can produce: text"):
        model.generate("Hello", output="audio")


def test_empty_and_unsupported_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("")
    with pytest.raises(ValueError, match="empty"):
        model.generate([])
    with pytest.raises(ValueError, match="must be text, omni.Audio, omni.Image or omni.Video; got Tensor"):
        model.generate(["Describe:", torch.zeros(3)])


def test_prompt_longer_than_the_context(model):
    with pytest.raises(ValueError, match=f"context is {model.max_seq_len}"):
        model.generate("word " * 2000, max_new_tokens=1)


def test_model_without_tokenizer_needs_ids(text_tokenizer):
    m = build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0)
    with pytest.raises(ValueError, match="no text tokenizer"):
        m.generate("Hello")


def test_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = omni.load(tmp_path / "ckpt")
    assert loaded.generate("Zero is", max_new_tokens=8) == model.generate("Zero is", max_new_tokens=8)


def test_load_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="not found") as e:
        omni.load(tmp_path / "missing")
    assert "missing" in str(e.value)


def test_is_batch():
    assert api.is_batch([["a"], ["b"]])
    assert not api.is_batch(["a", "b"]) and not api.is_batch("ab") and not api.is_batch([])
