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


@pytest.fixture(scope="module")
def speaking_model(text_tokenizer):
    """A debug model whose vocabulary holds a (random, debug-preset) codec's codes."""
    from omni.tokenizers.audio import AudioCodec
    from omni.vocab import Vocab

    torch.manual_seed(0)
    codec = AudioCodec("debug")
    v = text_tokenizer.vocab
    vocab = Vocab(v.text_size, v.specials, codec.num_codebooks, codec.cardinality)
    return build_model(backbone_config("debug", max_seq_len=256), vocab, text_tokenizer, seed=0, codec=codec).eval()


def test_output_audio_continues_a_clip(speaking_model, tmp_path):
    codec = speaking_model.codec
    assert api.outputs(speaking_model) == ["text", "audio"]
    clip = omni.Audio(0.1 * torch.randn(1600, generator=torch.Generator().manual_seed(0)), sample_rate=16000)
    kw = dict(output="audio", max_seconds=0.02, temperature=0.9, seed=3)
    out = speaking_model.generate(["Continue:", clip], **kw)
    assert isinstance(out, omni.Audio) and out.sample_rate == codec.sample_rate
    assert 0 < out.waveform.numel() <= round(0.02 * codec.frame_rate) * codec.hop_length
    assert torch.equal(speaking_model.generate(["Continue:", clip], **kw).waveform, out.waveform)  # seeded
    both = speaking_model.generate([["Continue:", clip], ["Say something:"]], output="audio", max_new_tokens=8,
                                   temperature=0.9, seed=0)
    assert len(both) == 2 and all(isinstance(a, omni.Audio) for a in both)
    assert out.save(tmp_path / "c.wav").stat().st_size > 44
    with pytest.raises(ValueError, match="stream=True is for text output"):
        speaking_model.generate(["Continue:", clip], output="audio", stream=True)


def test_describe_reads_long_audio_in_windows(text_tokenizer, tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    model = build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, text_tokenizer, seed=0,
                        media={"audio": {"encoder": {"kind": "whisper_style", "size": "debug"},
                                         "connector": {"kind": "mlp"}, "stack": 4}}).eval()
    for name, secs in (("long.wav", 1.0), ("short.flac", 0.3)):
        sf.write(tmp_path / name, (0.1 * np.random.default_rng(0).standard_normal(int(8000 * secs))).astype("float32"),
                 8000)
    seen = []
    real = model.generate

    def spy(prompts, **kw):
        seen.extend(p[0].duration for p in prompts)
        return real(prompts, **kw)

    monkeypatch.setattr(model, "generate", spy)
    texts = api.describe(model, [tmp_path / "long.wav", tmp_path / "short.flac"], window_s=0.4, batch_size=2,
                         max_new_tokens=3, progress=False)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert [round(d, 2) for d in seen] == [0.4, 0.4, 0.2, 0.3]  # 1.0 s -> three windows, resampled to 16 kHz
    with pytest.raises(omni.MediaError, match="not a media file"):
        api.describe(model, [tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="cannot read image"):
        api.describe(model, [tmp_path / "x.png"])


def test_chat_keeps_the_history_across_calls(model):
    chat = omni.Chat(model, system="Answer briefly.")
    first = chat("Zero is", max_new_tokens=5)
    assert isinstance(first, str)
    assert chat.messages == [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "Zero is"},
                             {"role": "assistant", "content": first.strip()}]
    # the second answer is the model's reply to the whole conversation, not to the last turn alone
    expected = model.generate(chat.messages + [{"role": "user", "content": "And one?"}], max_new_tokens=5)
    pieces = list(chat("And one?", max_new_tokens=5, stream=True))
    assert "".join(pieces) == expected and chat.messages[-1] == {"role": "assistant", "content": expected.strip()}
    assert len(chat.messages) == 5
    with pytest.raises(ValueError, match="empty"):
        chat("  ")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Answer briefly."}]
