"""Voice-activity detection with Silero VAD (the ``silero-vad`` package from PyPI, MIT; its bundled
weights, nothing downloaded): where a file has speech, for :mod:`omni.transcribe`.

The network is the package's TorchScript model run as plain torch ops on its own weights, so a
whole 30-s window is one batched pass through the convolutions and one ``nn.LSTM`` call instead
of ~940 per-frame calls (16x faster on 2 CPU threads, ``benchmarks/vad_speed.py``; probabilities
equal the package's to 1e-4, ``tests/media/test_vad.py``). Frames are 512 samples (32 ms) at
16 kHz, each seeing the 64 samples before it; the LSTM state runs on across windows, so a file is
streamed window by window (:func:`omni.media.audio.iter_audio_windows`) and only one float per
frame is kept (~112,500 an hour). The package's own ``get_speech_timestamps_from_probs`` turns
the probabilities into regions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from omni.media.audio import iter_audio_windows

SAMPLE_RATE = 16_000
FRAME, CONTEXT = 512, 64  # samples per probability, samples of the previous frame each one sees
# Defaults, chosen before any measurement (docs/benchmarks.md, "Long-form transcription"): the
# package's 0.5 threshold; a pause must last 0.5 s to end a region (shorter ones are within a
# sentence); 0.2 s of padding each side keeps quiet word edges in the audio Whisper hears and
# stays well inside the 0.5-s tolerance a subtitle boundary is judged by.
THRESHOLD, MIN_SILENCE_MS, SPEECH_PAD_MS, MIN_SPEECH_MS = 0.5, 500, 200, 250


class SileroVAD:
    """Speech probabilities of 16-kHz audio, one per 32-ms frame, streamed."""

    def __init__(self):
        try:
            import silero_vad
        except ImportError as e:
            raise ImportError("voice-activity detection needs the silero-vad package: "
                              "pip install silero-vad (or omni's speech extra)") from e
        threads = torch.get_num_threads()  # importing silero_vad.model sets torch to 1 thread
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            jit = silero_vad.load_silero_vad(onnx=False)._model
        torch.set_num_threads(threads)
        self.regions_of_probs = silero_vad.get_speech_timestamps_from_probs
        w = {k: v.detach().clone() for k, v in jit.state_dict().items()}
        self.basis = w["stft.forward_basis_buffer"]  # (258, 1, 256): an STFT as a convolution
        self.convs = [(w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"], s)
                      for i, s in enumerate((1, 2, 2, 1))]
        self.lstm = torch.nn.LSTM(128, 128, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.lstm, f"{name}_l0").copy_(w[f"decoder.rnn.{name}"])
        self.out_w, self.out_b = w["decoder.decoder.2.weight"][0, :, 0], w["decoder.decoder.2.bias"][0]

    @torch.inference_mode()
    def probs(self, windows) -> list[float]:
        """One speech probability per 512-sample frame of the concatenated 16-kHz ``windows``
        (an iterable of 1-D tensors; a last partial frame is zero-padded, as the package does)."""
        out: list[float] = []
        context, state, tail = torch.zeros(CONTEXT), None, torch.zeros(0)
        for window in windows:
            tail = torch.cat([tail, window.float()])
            n = len(tail) // FRAME * FRAME
            if n:
                p, context, state = self._frames(tail[:n], context, state)
                out += p
                tail = tail[n:]
        if len(tail):
            out += self._frames(F.pad(tail, (0, FRAME - len(tail))), context, state)[0]
        return out

    def _frames(self, wave, context, state):
        x = torch.cat([context, wave])
        x = F.pad(x.unfold(0, FRAME + CONTEXT, FRAME)[:, None], (0, CONTEXT), mode="reflect")
        x = F.conv1d(x, self.basis, stride=128)
        x = (x[:, :129] ** 2 + x[:, 129:] ** 2).sqrt()
        for weight, bias, stride in self.convs:
            x = F.conv1d(x, weight, bias, stride=stride, padding=1).relu()
        h, state = self.lstm(x[:, :, 0][None], state)
        p = torch.sigmoid(h[0].relu() @ self.out_w + self.out_b)
        return p.tolist(), wave[-CONTEXT:], state


def speech_regions(path: str | Path, vad: SileroVAD, *, threshold: float = THRESHOLD,
                   min_silence_ms: int = MIN_SILENCE_MS, speech_pad_ms: int = SPEECH_PAD_MS,
                   min_speech_ms: int = MIN_SPEECH_MS, max_speech_s: float = 30.0) -> list[tuple[int, int]]:
    """A file's speech as ``(start, end)`` 16-kHz sample ranges, each at most ``max_speech_s``
    long (a longer one is cut at its longest pause, as the package does); the file is read
    30 s at a time."""
    probs = vad.probs(iter_audio_windows(path, 30.0, SAMPLE_RATE))
    regions = vad.regions_of_probs(
        probs, sampling_rate=SAMPLE_RATE, threshold=threshold, min_silence_duration_ms=min_silence_ms,
        speech_pad_ms=speech_pad_ms, min_speech_duration_ms=min_speech_ms, max_speech_duration_s=max_speech_s)
    return [(r["start"], r["end"]) for r in regions]


def merge_regions(regions: list[tuple[int, int]], max_samples: int) -> list[tuple[int, int]]:
    """Consecutive regions joined into chunks that span at most ``max_samples`` (the pauses
    between them included); a region longer than that stays a chunk of its own."""
    chunks: list[tuple[int, int]] = []
    for start, end in regions:
        if chunks and end - chunks[-1][0] <= max_samples:
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
    return chunks
