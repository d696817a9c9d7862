"""LogMel against transformers' WhisperFeatureExtractor on real (espeak-ng) speech and on noise."""

import shutil
import subprocess

import numpy as np
import pytest
import torch

from omni.media.audio import load_audio
from omni.tokenizers.audio import LogMel, mel_filters


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two real spoken sentences at 16 kHz (espeak-ng, two voices), float32 (T,)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = []
    sentences = [("en-us", "Turn on the kitchen light at seven."),
                 ("en-gb-scotland+f2", "The quick brown fox jumps over the lazy dog.")]
    for i, (voice, text) in enumerate(sentences):
        path = tmp_path_factory.mktemp("speech") / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        out.append(load_audio(path, sample_rate=16000)[0])
    return out


def hf_extractor(n_mels=80):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels)


def test_mel_filters_equal_transformers():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
        assert torch.allclose(mel_filters(16000, 400, n_mels), torch.from_numpy(ref).float(), atol=1e-7)


def test_matches_whisper_feature_extractor_on_speech_padded_to_30s(speech):
    ref = hf_extractor()(speech[0].numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
    ours = LogMel(pad_to_s=30.0)(speech[0])
    assert ours.shape == ref.shape == (80, 3000)
    assert (ours - ref).abs().max() < 1e-3
    assert ours.std() > 0.1  # real speech, not a flat floor


def test_matches_without_padding_batched_and_128_mels(speech):
    fe = hf_extractor(128)
    waves = [speech[0], speech[1]]
    ref = fe([w.numpy() for w in waves], sampling_rate=16000, padding="longest",
             return_tensors="pt").input_features
    mel, frames = LogMel(n_mels=128).batch(waves)
    longest = max(w.shape[0] for w in waves)
    assert mel.shape == ref.shape == (2, 128, longest // 160)
    assert frames.tolist() == [w.shape[0] // 160 for w in waves]
    assert (mel - ref).abs().max() < 1e-3


def test_matches_on_random_noise():
    g = np.random.default_rng(0)
    noise = [g.standard_normal(n).astype(np.float32) * s for n, s in ((16000, 0.1), (24321, 0.5))]
    ref = hf_extractor()(noise, sampling_rate=16000, padding="longest", return_tensors="pt").input_features
    mel, _ = LogMel().batch([torch.from_numpy(x) for x in noise])
    assert (mel - ref).abs().max() < 1e-3
    single = LogMel()(torch.from_numpy(noise[1]))
    assert single.shape == (80, 24321 // 160) and torch.allclose(single, mel[1], atol=1e-6)


def test_silence_truncation_and_bad_input():
    lm = LogMel(pad_to_s=1.0)
    silent = lm(torch.zeros(8000))
    assert silent.shape == (80, 100) and torch.all(silent == -1.5)  # log10(1e-10) = -10 -> (-10 + 4) / 4
    assert lm(torch.randn(40000)).shape == (80, 100)  # longer input is truncated to pad_to_s
    assert lm.num_frames(123) == 100 and LogMel().num_frames(16000) == 100
    with pytest.raises(ValueError, match="at least 160 samples"):
        LogMel()(torch.zeros(100))
    with pytest.raises(ValueError, match="float waveform"):
        LogMel()(torch.zeros(1000, dtype=torch.int16))
