"""Metrics on held-out data: WER/CER for speech, BLEU-4 and CIDEr-D for captions, and the
codec's reconstruction distances (multi-scale mel distance, SI-SDR).

The text metrics take plain strings. Text is normalised the same way for every metric: lower case,
punctuation removed (apostrophes inside words kept), whitespace collapsed. The audio ones take
waveform tensors ``(T,)`` or ``(B, T)``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (``val_loss``, ``stamps.cider_d``, ``asr.wer``) is the
    better one: error rates, losses and perplexities; any other score is better higher."""
    name = metric.rpartition(".")[2]
    return name in ("wer", "cer", "loss", "ppl") or name.endswith(("_wer", "_cer", "_loss", "_ppl"))


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _error_rate(refs: Sequence[str], hyps: Sequence[str], split) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = total = 0
    for r, h in zip(refs, hyps):
        r, h = split(normalize(r)), split(normalize(h))
        errors += edit_distance(r, h)
        total += len(r)
    if total == 0:
        raise ValueError("the references are empty")
    return errors / total


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate: total word edits / total reference words."""
    return _error_rate(refs, hyps, str.split)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate (spaces count as characters)."""
    return _error_rate(refs, hyps, list)


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _as_refs(references) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(references, hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precision, geometric mean, brevity penalty.

    references: one string or a list of strings per hypothesis. Returns a value in [0, 1].
    """
    refs = _as_refs(references)
    if len(refs) != len(hypotheses):
        raise ValueError(f"{len(refs)} reference sets but {len(hypotheses)} hypotheses")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for rs, h in zip(refs, hypotheses):
        hw = normalize(h).split()
        rws = [normalize(r).split() for r in rs]
        hyp_len += len(hw)
        ref_len += min((abs(len(r) - len(hw)), len(r)) for r in rws)[1]  # closest reference length
        for n in range(1, max_n + 1):
            hc = _ngrams(hw, n)
            best = Counter()
            for r in rws:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            totals[n - 1] += max(len(hw) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return bp * math.exp(log_p)


def cider_d(references, hypotheses: Sequence[str], max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al., as in the coco-caption toolkit): TF-IDF n-gram cosine with clipping
    and a Gaussian length penalty, averaged over n = 1..4, times 10. Document frequencies come from
    the references of this corpus."""
    refs = _as_refs(references)
    if len(refs) != len(hypotheses):
        raise ValueError(f"{len(refs)} reference sets but {len(hypotheses)} hypotheses")
    ref_words = [[normalize(r).split() for r in rs] for rs in refs]
    hyp_words = [normalize(h).split() for h in hypotheses]
    df = Counter()
    for rws in ref_words:
        df.update({g for r in rws for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(refs)))

    def vec(words):
        out = []
        for n in range(1, max_n + 1):
            tf = _ngrams(words, n)
            out.append({g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in tf.items()})
        return out

    def sim(vh, vr, lh, lr):
        delta = lh - lr
        vals = []
        for h, r in zip(vh, vr):
            dot = sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)  # clipped
            nh = math.sqrt(sum(w * w for w in h.values()))
            nr = math.sqrt(sum(w * w for w in r.values()))
            vals.append(dot / (nh * nr) * math.exp(-(delta ** 2) / (2 * sigma ** 2)) if nh and nr else 0.0)
        return vals

    scores = []
    for rws, hw in zip(ref_words, hyp_words):
        vh = vec(hw)
        acc = [0.0] * max_n
        for r in rws:
            for i, s in enumerate(sim(vh, vec(r), len(hw), len(r))):
                acc[i] += s
        scores.append(sum(a / len(rws) for a in acc) / max_n * 10.0)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Audio: the mel filter bank (shared with the log-mel front end) and reconstruction distances


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                f_max: float | None = None) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised triangular mel filters ``(n_fft // 2 + 1, n_mels)``, float32.

    The same bank as librosa / Whisper / transformers' ``mel_filter_bank(norm="slaney",
    mel_scale="slaney")``; computed in float64 so the float32 result matches theirs bit for bit or nearly.
    """
    f_max = sample_rate / 2 if f_max is None else f_max

    def hz_to_mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        log_part = 15 + 27 * torch.log(f.clamp(min=1e-10) / 1000) / math.log(6.4)
        return torch.where(f < 1000, 3 * f / 200, log_part)

    def mel_to_hz(m):
        return torch.where(m < 15, 200 * m / 3, 1000 * torch.exp(math.log(6.4) / 27 * (m - 15)))

    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))
    widths = edges.diff()  # (n_mels + 1,)
    slopes = edges[None, :] - fft_hz[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = torch.clamp(torch.minimum(down, up), min=0)
    bank = bank * (2.0 / (edges[2:] - edges[:-2]))  # Slaney: constant energy per filter
    return bank.float()


class MultiScaleMel(nn.Module):
    """Log-mel spectrograms at several STFT sizes (window ``n``, hop ``n // 4``), as in EnCodec's
    reconstruction loss: small windows see transients, large ones pitch and formants."""

    def __init__(self, sample_rate: int, n_ffts: tuple[int, ...] = (256, 512, 1024, 2048), n_mels: int = 64,
                 floor: float = 1e-5):
        super().__init__()
        self.n_ffts, self.floor = tuple(n_ffts), floor
        for n in self.n_ffts:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)
            filters = mel_filters(sample_rate, n, min(n_mels, n // 4)).T.contiguous()  # (n_mels, n // 2 + 1)
            self.register_buffer(f"filters_{n}", filters, persistent=False)

    def forward(self, wave: torch.Tensor) -> list[torch.Tensor]:
        """``wave: (B, T)`` -> one ``log10`` mel ``(B, n_mels, frames)`` per scale."""
        out = []
        for n in self.n_ffts:
            spec = torch.stft(wave, n, n // 4, window=getattr(self, f"window_{n}"), center=True,
                              pad_mode="reflect", return_complex=True)
            power = spec.real.square() + spec.imag.square()
            out.append(torch.clamp(getattr(self, f"filters_{n}") @ power, min=self.floor).log10())
        return out

    def distance(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Mean over scales of the mean absolute log-mel difference; 0 for identical audio."""
        pairs = zip(self(estimate), self(reference), strict=True)
        return torch.stack([(a - b).abs().mean() for a, b in pairs]).mean()


def multiscale_mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int,
                            n_ffts: tuple[int, ...] = (256, 512, 1024, 2048), n_mels: int = 64) -> float:
    """Multi-scale log10-mel L1 distance between two waveforms ``(T,)`` or ``(B, T)`` (lower is better)."""
    _same_shape(estimate, reference)
    mel = MultiScaleMel(sample_rate, n_ffts, n_mels).to(reference.device)
    est, ref = (w.reshape(-1, w.shape[-1]).float() for w in (estimate, reference))
    return float(mel.distance(est, ref))


def _same_shape(estimate: torch.Tensor, reference: torch.Tensor):
    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: estimate {tuple(estimate.shape)}, "
                         f"reference {tuple(reference.shape)}")


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019), per item of ``(..., T)``.

    Both signals are made zero-mean; the reference is scaled to best fit the estimate, so the score
    ignores gain. Identical signals score very high (~ +100 dB); noise scores far below 0.
    """
    _same_shape(estimate, reference)
    est = estimate.double() - estimate.double().mean(-1, keepdim=True)
    ref = reference.double() - reference.double().mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + eps)
    target = alpha * ref
    noise = est - target
    return (10 * torch.log10((target.square().sum(-1) + eps) / (noise.square().sum(-1) + eps))).float()
