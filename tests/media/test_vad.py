"""Voice-activity detection (omni/media/vad.py): chunk merging always; with the silero-vad package,
the batched torch forward against the package's own TorchScript model, frame by frame."""

import numpy as np
import pytest
import soundfile as sf
import torch

from omni.media.vad import merge_regions


def test_regions_merge_into_chunks_of_at_most_the_window():
    regions = [(0, 10), (20, 30), (35, 50), (100, 170), (180, 190)]
    assert merge_regions(regions, 50) == [(0, 50), (100, 170), (180, 190)]  # 70 > 50 stays alone
    assert merge_regions([], 50) == []


def _speechy(seconds, seed=0):
    """Noise bursts and a voiced-like harmonic signal between silences."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), 1))
    gate = (np.sin(2 * np.pi * 0.4 * t) > 0).astype(float)
    return (0.3 * voice * gate + 0.01 * rng.standard_normal(len(t))).astype("float32")


def test_batched_forward_equals_the_package_model_frame_by_frame_and_keeps_threads():
    silero_vad = pytest.importorskip("silero_vad", reason="silero-vad not installed (omni's speech extra)")
    from omni.media.vad import SileroVAD

    torch.set_num_threads(2)
    vad = SileroVAD()
    assert torch.get_num_threads() == 2  # importing silero_vad sets 1; SileroVAD puts it back
    wave = torch.from_numpy(_speechy(5.0))[:5 * 16000 - 100]  # a partial last frame
    ref = silero_vad.load_silero_vad()
    torch.set_num_threads(2)
    padded = torch.nn.functional.pad(wave, (0, -len(wave) % 512))
    expected = [ref(padded[i:i + 512], 16000).item() for i in range(0, len(padded), 512)]
    got = vad.probs(wave.split(7000))  # windows that do not end on frames: the tail carries over
    assert len(got) == len(expected) == 157
    assert np.abs(np.array(got) - np.array(expected)).max() < 1e-4
    assert max(expected) > 0.5 > min(expected)  # the signal has speech-like and silent parts


def test_silence_has_no_speech(tmp_path):
    pytest.importorskip("silero_vad", reason="silero-vad not installed (omni's speech extra)")
    from omni.media.vad import SileroVAD, speech_regions

    hiss = 1e-3 * np.random.default_rng(0).standard_normal(8000 * 70)  # 70 s at 8 kHz, -60 dBFS
    sf.write(tmp_path / "quiet.wav", hiss.astype("float32"), 8000)
    assert speech_regions(tmp_path / "quiet.wav", SileroVAD()) == []
