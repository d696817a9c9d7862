"""Metrics on held-out data: WER/CER for speech, BLEU-4 and CIDEr-D for captions.

All take plain strings. Text is normalised the same way for every metric: lower case,
punctuation removed (apostrophes inside words kept), whitespace collapsed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


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
