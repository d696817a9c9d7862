import pytest
import torch

import omni
from omni import api, pipeline, processor
from omni.generation import generate
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline


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
    assert out == [model.generate("Zero is", max_new_tokens=8),
                   model.generate("The integers", max_new_tokens=8)]
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

    monkeypatch.setattr(pipeline, "iter_generate", scripted)
    # encode() adds SentencePiece's "▁" prefix; as a continuation of the prompt it is a real space
    assert "".join(model.generate("Say it", stream=True)) == " " + text
    assert ["".join(col) for col in zip(*model.generate([["a"], ["b"]], stream=True))] == [" " + text] * 2
    # cut by max_new_tokens in the middle of a character: what was held back still comes out
    new[:] = tok.encode("ab日")[:-1]
    assert "".join(model.generate("Say it", stream=True)) == " " + tok.decode(new)
    assert tok.decode(new).startswith("ab\ufffd")


def _scripted(monkeypatch, rows: list[list[int]], pad: int):
    """iter_generate replaced by these rows' ids (padded; a batch of B takes the first B rows);
    returns the list of steps taken."""
    taken = []

    def scripted(model_, ids, **kwargs):
        for step in range(max(len(r) for r in rows)):
            taken.append(step)
            yield torch.tensor([r[step] if step < len(r) else pad for r in rows[: ids.shape[0]]])

    monkeypatch.setattr(pipeline, "iter_generate", scripted)
    return taken


def test_stop_string_ends_its_row_and_is_cut_while_the_others_go_on(model, monkeypatch):
    tok = model.tokenizer
    rows = [tok.encode("hello\n\nUser: more words"), tok.encode("one two three four five")]
    taken = _scripted(monkeypatch, rows, tok.vocab.pad_id)
    out = model.generate([["a"], ["b"]], stop=["\n\nUser:", "zzz"])
    assert out == [" hello", " one two three four five"]
    pieces = list(model.generate([["a"], ["b"]], stream=True, stop=["\n\nUser:"]))
    assert ["".join(col) for col in zip(*pieces)] == out
    assert not any("\n" in p[0] for p in pieces)  # the stop string's start was held back, never shown
    # one prompt: decoding ends at the stop string, not at max_new_tokens
    taken.clear()
    assert model.generate("a", stop="User") == " hello\n\n" and len(taken) == 9
    # a prefix of a stop string that turns out not to be one is held back, then shown
    _scripted(monkeypatch, [tok.encode("hello\n\nUs us")], tok.vocab.pad_id)
    pieces = list(model.generate("a", stream=True, stop=["\n\nUser:"]))
    assert "".join(pieces) == " hello\n\nUs us" and [p for p in pieces if "\n" in p] == ["\n\nUs "]


def test_stop_strings_on_the_model_s_own_text(model):
    full = model.generate([["Zero is"], ["The integers"]], max_new_tokens=12)
    stop = full[0][4:7]
    assert stop.strip() and stop not in full[1]
    out = model.generate([["Zero is"], ["The integers"]], max_new_tokens=12, stop=[stop])
    assert out == [full[0][: full[0].index(stop)], full[1]]
    assert model.generate("Zero is", max_new_tokens=12, stop=stop) == out[0]
    beam = model.generate("Zero is", max_new_tokens=12, num_beams=2)  # cut after the search
    stop = beam[3:6]
    assert model.generate("Zero is", max_new_tokens=12, num_beams=2, stop=stop) == beam[: beam.index(stop)]
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        model.generate("Zero is", stop=[""])


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
    m = pipeline.Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0))
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
    return Pipeline(build_model(backbone_config("debug", max_seq_len=256), vocab, seed=0),
                    tokenizer=text_tokenizer, codec=codec).eval()


def test_output_audio_continues_a_clip(speaking_model, tmp_path):
    codec = speaking_model.codec
    assert api.outputs(speaking_model) == ["text", "audio"]
    clip = omni.Audio(0.1 * torch.randn(1600, generator=torch.Generator().manual_seed(0)), sample_rate=16000)
    kw = dict(output="audio", max_seconds=0.02, temperature=0.9, seed=3)
    out = speaking_model.generate(["Continue:", clip], **kw)
    assert isinstance(out, omni.Audio) and out.sample_rate == codec.sample_rate
    assert 0 < out.waveform.numel() <= round(0.02 * codec.frame_rate) * codec.hop_length
    assert torch.equal(speaking_model.generate(["Continue:", clip], **kw).waveform, out.waveform)  # seeded
    both = speaking_model.generate([["Continue:", clip], ["Say something:"]], output="audio",
                                   max_new_tokens=8, temperature=0.9, seed=0)
    assert len(both) == 2 and all(isinstance(a, omni.Audio) for a in both)
    assert out.save(tmp_path / "c.wav").stat().st_size > 44
    for bad in (dict(stream=True), dict(stop="x")):
        with pytest.raises(ValueError, match="stream=True and stop strings are for text output"):
            speaking_model.generate(["Continue:", clip], output="audio", **bad)


def test_audio_the_model_ends_at_once_is_an_empty_audio(speaking_model, tmp_path, monkeypatch, caplog):
    K = speaking_model.codec.num_codebooks
    monkeypatch.setattr(pipeline, "generate_audio_codes",  # the model writes <|/audio|> first
                        lambda model, ids, **kw: [torch.zeros(K, 0, dtype=torch.long)] * len(ids))
    clip = omni.Audio(0.1 * torch.randn(1600, generator=torch.Generator().manual_seed(0)), sample_rate=16000)
    out = speaking_model.generate(["Continue:", clip], output="audio", seed=0)
    assert (isinstance(out, omni.Audio) and out.duration == 0
            and out.sample_rate == speaking_model.codec.sample_rate)
    assert "ended the audio at once" in caplog.text
    out.save(tmp_path / "empty.wav")  # a valid (empty) wav


@pytest.fixture(scope="module")
def listening_model(text_tokenizer):
    """A debug model with a (debug) audio encoder: it reads audio files. Do not modify it."""
    return Pipeline(build_model(
        backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, seed=0,
        media={"audio": {"encoder": {"kind": "whisper_style", "size": "debug"}, "connector": {"kind": "mlp"},
                         "stack": 4}}), tokenizer=text_tokenizer).eval()


def _noise_wav(path, seconds: float, rate: int = 8000):
    import numpy as np
    import soundfile as sf

    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(int(rate * seconds))).astype("float32"),
             rate)
    return path


def test_describe_reads_long_audio_in_windows(listening_model, tmp_path, monkeypatch):
    model = listening_model
    for name, secs in (("long.wav", 1.0), ("short.flac", 0.3)):
        _noise_wav(tmp_path / name, secs)
    seen = []
    real = model.processor.prepare

    def spy(modality, audio):
        seen.append(audio.duration)
        return real(modality, audio)

    monkeypatch.setattr(model.processor, "prepare", spy)
    texts = api.describe(model, [tmp_path / "long.wav", tmp_path / "short.flac"], window_s=0.4, batch_size=2,
                         max_new_tokens=3, progress=False)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert [round(d, 2) for d in seen] == [0.4, 0.4, 0.2, 0.3]  # 1.0 s -> three windows, resampled to 16 kHz
    with pytest.raises(omni.MediaError, match="not a media file"):
        api.describe(model, [tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="cannot read image"):
        api.describe(model, [tmp_path / "x.png"])


def test_describe_reads_windows_lazily_one_batch_at_a_time(listening_model, tmp_path, monkeypatch):
    """The windows of long files are not all in memory at once: describe asks for the next
    ``batch_size`` windows only when it is ready to generate for them."""
    model = listening_model
    # 5 + 3 windows of 0.4 s
    files = [_noise_wav(tmp_path / "a.wav", 2.0), _noise_wav(tmp_path / "b.wav", 1.2)]
    produced, at_generate = [0], []
    real_windows, real_generate = processor.iter_audio_windows, model.generate

    def counting_windows(*args, **kw):
        for w in real_windows(*args, **kw):
            produced[0] += 1
            yield w

    def spy(prompts, **kw):
        at_generate.append(produced[0])
        return real_generate(prompts, **kw)

    monkeypatch.setattr(processor, "iter_audio_windows", counting_windows)
    monkeypatch.setattr(model, "generate", spy)
    texts = api.describe(model, files, window_s=0.4, batch_size=3, max_new_tokens=2, progress=False)
    assert len(texts) == 2 and produced[0] == 8
    assert at_generate == [3, 6, 8]  # each batch read just before its generate call, never ahead


def test_describe_gives_each_bad_file_its_error_and_describes_the_rest(listening_model, tmp_path):
    import struct

    model = listening_model
    good, also_good = _noise_wav(tmp_path / "good.wav", 0.5), _noise_wav(tmp_path / "good2.flac", 0.3)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wave file" * 10)
    one_hz = _noise_wav(tmp_path / "one_hz.wav", 0.1)
    data = bytearray(one_hz.read_bytes())
    data[24:32] = struct.pack("<II", 1, 4)  # a header claiming 1 sample per second
    one_hz.write_bytes(bytes(data))
    files = [good, tmp_path / "missing.wav", corrupt, one_hz, tmp_path / "notes.txt", also_good]
    for window_s in (0.4, None):
        out = api.describe(model, files, window_s=window_s, batch_size=2, max_new_tokens=2, progress=False,
                           return_exceptions=True)
        assert [type(r).__name__ for r in out] == ["str", "MediaError", "MediaError", "MediaError",
                                                   "MediaError", "str"]
        for path, error, problem in zip(files[1:5], out[1:5], ["not found", "not a readable audio file",
                                                               "sample rate 1 Hz", "not a media file"]):
            assert str(path) in str(error) and problem in str(error)
    # by default the first bad file raises
    with pytest.raises(omni.MediaError, match="missing.wav: file not found"):
        api.describe(model, files, max_new_tokens=2, progress=False)


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
    assert ("".join(pieces) == expected
            and chat.messages[-1] == {"role": "assistant", "content": expected.strip()})
    assert len(chat.messages) == 5
    with pytest.raises(ValueError, match="empty"):
        chat("  ")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Answer briefly."}]
