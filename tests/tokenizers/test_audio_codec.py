"""AudioCodec: the tokenizer contract, persistence, and parity with the encodec package and transformers."""

import dataclasses
import math

import pytest
import torch

from omni.media.audio import Audio
from omni.tokenizers.audio import CODEC_PRESETS, AudioCodec, CodecConfig, build_encodec, codec_config


def speechlike(seconds=0.5, sr=16000, seed=0):
    """A deterministic waveform with structure (chirps + noise bursts), in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 80 * torch.sin(2 * math.pi * 3 * t)
    voiced = sum(torch.sin(2 * math.pi * k * torch.cumsum(f0, 0) / sr) / k for k in range(1, 6))
    env = (torch.sin(2 * math.pi * 4 * t) > 0).float()
    return (0.3 * voiced * env + 0.05 * torch.randn(t.shape, generator=g) * (1 - env)).float()


def randomize_codebooks(codebooks, encoder, wave: torch.Tensor, seed=0):
    """Untrained RVQ codebooks are zeros (k-means init happens on the first training batch). Fill each
    with real encoder frames, shrinking per stage, so codes differ from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = encoder(wave[None, None]).transpose(1, 2).reshape(-1, codebooks[0].shape[1])  # (T', D)
        for k, cb in enumerate(codebooks):
            idx = torch.randint(0, emb.shape[0], (cb.shape[0],), generator=g)
            cb.copy_((emb[idx] + 0.1 * emb.std() * torch.randn(cb.shape, generator=g)) * 0.5 ** k)


@pytest.fixture(scope="module")
def debug_codec():
    torch.manual_seed(0)
    codec = AudioCodec("debug")
    codebooks = [layer._codebook.embed for layer in codec.model.quantizer.vq.layers]
    randomize_codebooks(codebooks, codec.model.encoder, speechlike())
    return codec


def test_presets_validate_and_bad_configs_are_named():
    for name in CODEC_PRESETS:
        codec_config(name).validate()
    with pytest.raises(ValueError, match="num_codebooks"):
        codec_config("debug", num_codebooks=3)
    with pytest.raises(ValueError, match="power of 2"):
        codec_config("debug", codebook_size=100)
    with pytest.raises(ValueError, match="unknown codec preset 'huge'"):
        codec_config("huge")
    with pytest.raises(ValueError, match="causal"):
        codec_config("debug", norm="time_group_norm")


def test_encodec_24khz_preset_is_the_encodec_package_model():
    from encodec import EncodecModel

    ours = build_encodec(codec_config("encodec_24khz"))
    theirs = EncodecModel.encodec_model_24khz(pretrained=False)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    codec = AudioCodec("encodec_24khz")
    rates = (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.cardinality)
    assert rates == (24000, 75.0, 8, 1024)


def test_encode_decode_shapes_and_ranges(debug_codec):
    c = debug_codec
    rates = (c.sample_rate, c.hop_length, c.frame_rate, c.num_codebooks, c.cardinality)
    assert rates == (16000, 16, 1000.0, 2, 32)
    wave = speechlike(0.25)
    codes = c.encode(wave)
    assert codes.shape == (2, c.num_frames(wave.shape[0])) == (2, 250) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 32
    assert codes[0].unique().numel() > 8, "randomized codebooks must give varied codes"
    batch = c.encode(torch.stack([wave, wave.flip(0)]))
    assert batch.shape == (2, 2, 250) and torch.equal(batch[0], codes)
    odd = c.encode(wave[:1001])
    assert odd.shape == (2, 63)  # ceil(1001 / 16)
    out = c.decode(codes)
    assert out.shape == (4000,) and out.dtype == torch.float32
    assert c.decode(batch, length=3999).shape == (2, 3999)
    assert c.decode(codes[:1]).shape == (4000,)  # fewer codebooks: coarser reconstruction, same length


def test_encode_accepts_audio_objects_and_resamples(debug_codec):
    wave8k = speechlike(0.5, sr=8000)
    codes = debug_codec.encode(Audio(wave8k, 8000))
    assert codes.shape == (2, 500)


def test_bad_inputs(debug_codec):
    c = debug_codec
    with pytest.raises(ValueError, match="float waveform"):
        c.encode(torch.zeros(100, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        c.encode(torch.zeros(1, 1, 1, 100))
    with pytest.raises(ValueError, match="empty"):
        c.encode(torch.zeros(0))
    with pytest.raises(ValueError, match=r"must be in \[0, 32\)"):
        c.decode(torch.full((2, 5), 32))
    with pytest.raises(ValueError, match="codebooks"):
        c.decode(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        c.decode(torch.zeros(2, 5))


def test_save_load_round_trip(debug_codec, tmp_path):
    wave = speechlike(0.3, seed=1)
    out = debug_codec.save(tmp_path / "codec")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = AudioCodec.load(out)
    assert loaded.config == debug_codec.config
    assert torch.equal(loaded.encode(wave), debug_codec.encode(wave))
    assert torch.equal(loaded.decode(debug_codec.encode(wave)), debug_codec.decode(debug_codec.encode(wave)))
    assert AudioCodec.load(out, num_codebooks=1).encode(wave).shape[0] == 1
    debug_codec.save(out)  # overwrite in place
    with pytest.raises(ValueError, match="no config.json"):
        AudioCodec.load(tmp_path / "nothing")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AudioCodec.load(out)


def test_encodec_package_checkpoint_loads_with_identical_codes(tmp_path):
    from encodec import EncodecModel

    torch.manual_seed(0)
    bare = EncodecModel.encodec_model_24khz(pretrained=False)
    wave = speechlike(0.4, sr=24000)
    randomize_codebooks([layer._codebook.embed for layer in bare.quantizer.vq.layers], bare.encoder, wave)
    torch.save(bare.state_dict(), tmp_path / "encodec_24khz-local.th")
    codec = AudioCodec.from_encodec_checkpoint(tmp_path / "encodec_24khz-local.th", "encodec_24khz")
    bare.set_target_bandwidth(6.0)  # 8 codebooks, the preset's num_codebooks
    with torch.no_grad():
        ((ref_codes, scale),) = bare.encode(wave[None, None])
        ref_wave = bare.decode([(ref_codes, scale)])[0, 0]
    codes = codec.encode(wave)
    assert scale is None and codes.shape == (8, 30) and codes[0].unique().numel() > 5
    assert torch.equal(codes, ref_codes[0])
    assert torch.allclose(codec.decode(codes), ref_wave, atol=1e-6)
    # safetensors works too; a wrong architecture is named
    from omni.io import save_tensors

    save_tensors(tmp_path / "w.safetensors", bare.state_dict())
    assert torch.equal(AudioCodec.from_encodec_checkpoint(tmp_path / "w.safetensors").encode(wave), codes)
    with pytest.raises(ValueError, match="shape mismatch|missing"):
        AudioCodec.from_encodec_checkpoint(tmp_path / "w.safetensors", "tiny")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, capsys):
    torch.save({"weight": _Payload()}, tmp_path / "evil.th")
    with pytest.raises(ValueError, match="not a loadable tensor checkpoint"):
        AudioCodec.from_encodec_checkpoint(tmp_path / "evil.th")
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("causal,norm", [(True, "weight_norm"), (False, "time_group_norm")])
def test_transformers_encodec_checkpoint_gives_the_same_codes(tmp_path, causal, norm):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    cfg = EncodecConfig(sampling_rate=16000, audio_channels=1, hidden_size=32, num_filters=8,
                        upsampling_ratios=[4, 4, 2], num_lstm_layers=1, codebook_size=64,
                        target_bandwidths=[6.0, 12.0], use_causal_conv=causal, norm_type=norm)
    hf = EncodecModel(cfg).eval()
    wave = speechlike(0.3, seed=2)
    randomize_codebooks([layer.codebook.embed for layer in hf.quantizer.layers], hf.encoder, wave)
    hf.save_pretrained(tmp_path / "hf_encodec")

    codec = AudioCodec.from_hf(tmp_path / "hf_encodec", num_codebooks=4)
    assert codec.config.num_quantizers == 4 and codec.frame_rate == 500.0
    assert AudioCodec.from_hf(tmp_path / "hf_encodec").num_codebooks == 2  # transformers' default: 6 kbps
    with torch.no_grad():
        ref = hf.encode(wave[None, None], bandwidth=12.0)
        ref_wave = hf.decode(ref.audio_codes, ref.audio_scales).audio_values[0, 0]
    codes = codec.encode(wave)
    assert codes.shape == (4, 150) and codes[0].unique().numel() > 8
    assert torch.equal(codes, ref.audio_codes[0, 0])
    assert torch.allclose(codec.decode(codes), ref_wave, atol=1e-5)


def test_transformers_pickle_only_checkpoint_is_refused(tmp_path):
    from transformers import EncodecConfig

    EncodecConfig(sampling_rate=16000, hidden_size=32, num_filters=8, upsampling_ratios=[4, 4, 2],
                  num_lstm_layers=1, codebook_size=64).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="never unpickles"):
        AudioCodec.from_hf(tmp_path)


def test_config_dataclass_round_trips_through_from_dict():
    from omni.config import from_dict

    cfg = codec_config("tiny")
    assert from_dict(CodecConfig, dataclasses.asdict(cfg)) == cfg
