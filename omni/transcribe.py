"""Long-form transcription with an imported Whisper: openai-whisper's own algorithm.

Each file is read in 30-s windows streamed from disk (:func:`omni.media.audio.iter_audio_windows`;
at most two windows of samples and one window's log-mel per file are in memory). A window is
decoded with timestamp tokens under Whisper's timestamp rules (:func:`timestamp_rules`); its
consecutive timestamp pairs close segments, and the next window starts at the last complete
timestamp (or after the window when the text ran to its end). A decode whose text repeats itself
(gzip compression ratio > 2.4) or whose mean log-probability is < -1 is redone at the next
temperature (0.0, 0.2, ... 1.0; one sample each, not openai's best of 5; beam search at 0.0 with
``beam_size > 1``); a window whose
``<|nospeech|>`` probability is > 0.6 with a low log-probability is skipped as silence.
The current windows of several files are decoded together, one row each.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from omni.generation import left_pad, sample_next
from omni.media import BAD_FILE_ERRORS
from omni.media.audio import Audio, iter_audio_windows
from omni.media.vad import SileroVAD, merge_regions, speech_regions
from omni.model.backbone import KVCache, Memory
from omni.processor import Processor
from omni.progress import progress
from omni.tokenizers.whisper import NUM_TIMESTAMPS, WhisperTokenizer

SAMPLE_RATE = 16_000
WINDOW = 30 * SAMPLE_RATE  # samples one window holds
TIME_STEP = 0.02  # seconds between timestamp tokens
MIN_WINDOW = round(SAMPLE_RATE * TIME_STEP)  # fewer samples than this are not decoded
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_COMPRESSION_RATIO = 2.4
MIN_AVG_LOGPROB = -1.0
NO_SPEECH_PROB = 0.6
MAX_INITIAL_TIMESTAMP = 1.0  # seconds: the first timestamp of a window is at most this
FORMATS = ("txt", "json", "srt", "vtt", "tsv")
log = logging.getLogger("omni")


@dataclass
class Segment:
    start: float
    end: float
    text: str


class Transcript(list):
    """A file's :class:`Segment` list and the ``language`` it was decoded in (detected, given, or
    ``en`` for an English-only Whisper; None when nothing was decoded)."""

    def __init__(self, segments=(), language: str | None = None):
        super().__init__(segments)
        self.language = language


@dataclass
class Decoded:
    """One window's decode: its tokens (without the end of text) and how sure the model was."""
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float = 0.0
    compression_ratio: float = field(default=0.0)


def compression_ratio(text: str) -> float:
    """How much gzip shrinks ``text``: repeated text compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def no_speech_id(tok: WhisperTokenizer) -> int | None:
    """``<|nospeech|>`` (``<|nocaptions|>`` in older tokenizer files), or None."""
    for name in ("<|nospeech|>", "<|nocaptions|>"):
        i = tok._with_specials.token_to_id(name)
        if i is not None:
            return i
    return None


@torch.inference_mode()
def detect_language(model, tok: WhisperTokenizer, ids: torch.Tensor, inputs: dict) -> list[tuple[str, float]]:
    """Each row's most likely language and its probability, as openai-whisper detects it: the
    distribution over language tokens right after ``<|startoftranscript|>`` (the decoder is causal,
    so the tokens rendered after it do not matter)."""
    logits = model(ids.to(model.device), positions=inputs["positions"].to(model.device),
                   key_padding=inputs["attention_mask"].bool().to(model.device), media=inputs["media"]).logits
    sot = (ids == tok.sot).long().argmax(1).to(model.device)
    names, lang_ids = list(tok.languages), torch.tensor(list(tok.languages.values()), device=model.device)
    probs = logits[torch.arange(len(ids), device=model.device), sot].float()[:, lang_ids].softmax(-1)
    best = probs.argmax(-1).tolist()
    return [(names[b], probs[k, b].item()) for k, b in enumerate(best)]


# ---------------------------------------------------------------------------------------------
# Decoding one window per row


def timestamp_rules(logits: torch.Tensor, sampled: list[list[int]], tok: WhisperTokenizer) -> torch.Tensor:
    """openai-whisper's ``ApplyTimestampRules`` on logits (B, V) after each row's ``sampled`` ids:
    no ``<|notimestamps|>``; timestamps come in pairs (after one lone timestamp text may not follow,
    after a pair a timestamp may not) and never decrease; the first token is a timestamp of at most
    :data:`MAX_INITIAL_TIMESTAMP`; a timestamp is taken when their summed probability beats every
    text token's."""
    begin, end = tok.timestamp_begin, tok.timestamp_begin + NUM_TIMESTAMPS
    logits = logits.clone()
    logits[:, tok.no_timestamps] = float("-inf")
    for k, seq in enumerate(sampled):
        stamps = [t for t in seq if begin <= t < end]
        last = bool(seq) and begin <= seq[-1] < end
        penultimate = len(seq) < 2 or begin <= seq[-2] < end
        if last:
            if penultimate:
                logits[k, begin:end] = float("-inf")
            else:
                logits[k, :tok.eot] = float("-inf")
        if stamps:
            floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
            logits[k, begin:floor] = float("-inf")
        if not seq:
            logits[k, :begin] = float("-inf")
            logits[k, begin + round(MAX_INITIAL_TIMESTAMP / TIME_STEP) + 1:] = float("-inf")
    logprobs = logits.float().log_softmax(-1)
    stamp_wins = logprobs[:, begin:end].logsumexp(-1) > logprobs[:, :begin].max(-1).values
    logits[stamp_wins, :begin] = float("-inf")
    return logits


@torch.inference_mode()
def decode(model, tok: WhisperTokenizer, ids: torch.Tensor, inputs: dict, *, temperature: float = 0.0,
           beam_size: int = 1, memory=None, max_new_tokens: int = 224,
           generator: torch.Generator | None = None):
    """Decode a batch of rendered prompts (``Processor.batch``) with timestamps -> ``[Decoded]`` and
    the audio memory the prompt pass encoded (pass it back as ``memory`` to decode the same
    windows again without running the encoder: ``inputs`` then need no ``media``). At temperature
    0, ``beam_size > 1`` searches that many beams per row."""
    B, T = ids.shape
    steps = max(1, min(max_new_tokens, model.max_seq_len - T))
    cache = KVCache(model.config.backbone, B, T + steps, device=model.device,
                    dtype=next(model.parameters()).dtype)
    cache.memory = memory
    positions = inputs["positions"].to(model.device)
    logits = model(ids.to(model.device), positions=positions, cache=cache,
                   key_padding=inputs["attention_mask"].bool().to(model.device),
                   media=None if memory is not None else inputs["media"]).logits
    memory = cache.memory
    sot = (ids == tok.sot).long().argmax(1)
    nospeech = no_speech_id(tok)
    at_sot = logits[torch.arange(B), sot.to(model.device)].float().softmax(-1)
    no_speech = at_sot[:, nospeech].tolist() if nospeech is not None else [0.0] * B

    def step_logits(nxt: torch.Tensor, step: int) -> torch.Tensor:
        pos = (positions.amax(-1) + 1 + step).repeat_interleave(len(nxt) // B)
        return model(nxt[:, None], cache=cache, positions=pos[:, None]).logits[:, -1]

    rules = _Rules(tok, model.device)
    if beam_size > 1 and temperature == 0:
        seqs, sums = _beam_search(logits[:, -1], step_logits, rules, cache, beam_size, steps)
    else:
        seqs, sums = _sample(logits[:, -1], step_logits, rules, temperature, steps, generator)
    out = [Decoded(seq, lp / (len(seq) + 1), p, temperature,
                   compression_ratio(tok.decode([t for t in seq if t < tok.eot])))
           for seq, lp, p in zip(seqs, sums, no_speech)]
    return out, memory


class _Rules:
    """Suppressed ids (the checkpoint's, and its begin list at the first step) and the timestamp rules."""

    def __init__(self, tok: WhisperTokenizer, device):
        self.tok = tok
        self.suppress = torch.tensor(tok.suppress_ids(), dtype=torch.long, device=device)
        self.begin = torch.tensor(tok.begin_suppress_ids(), dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor, seqs: list[list[int]], step: int) -> torch.Tensor:
        for bad in (self.suppress, self.begin) if step == 0 else (self.suppress,):
            logits = logits.index_fill(-1, bad, float("-inf"))
        return timestamp_rules(logits, seqs, self.tok)


def _sample(logits, step_logits, rules: _Rules, temperature: float, steps: int, generator):
    """Greedy (temperature 0) or sampled decoding -> each row's ids and summed log-probability."""
    eot, B = rules.tok.eot, logits.shape[0]
    seqs: list[list[int]] = [[] for _ in range(B)]
    sums = [0.0] * B
    done = [False] * B
    for step in range(steps):
        logits = rules(logits, seqs, step)
        nxt = sample_next(logits, temperature=temperature, generator=generator)
        nxt = torch.where(torch.tensor(done, device=nxt.device), eot, nxt)
        logprob = logits.float().log_softmax(-1).gather(-1, nxt[:, None])[:, 0].tolist()
        for k, t in enumerate(nxt.tolist()):
            if not done[k]:
                sums[k] += logprob[k]
                seqs[k] += [t] if t != eot else []
                done[k] = t == eot
        if all(done):
            break
        logits = step_logits(nxt, step)
    return seqs, sums


def _beam_search(logits, step_logits, rules: _Rules, cache: KVCache, K: int, steps: int):
    """openai-whisper's beam search (patience 1): each row keeps ``K`` beams, a beam that ends goes
    to the row's finished list, a row is done with ``K`` finished; the best by summed
    log-probability over length -> each row's ids and summed log-probability."""
    eot, B = rules.tok.eot, logits.shape[0]
    cache.reorder(torch.arange(B).repeat_interleave(K))
    logits = logits.repeat_interleave(K, 0)
    seqs: list[list[int]] = [[] for _ in range(B * K)]
    scores = [0.0 if i % K == 0 else float("-inf") for i in range(B * K)]  # the beams start as one
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(B)]
    for step in range(steps):
        logprobs = rules(logits, seqs, step).float().log_softmax(-1)
        total = logprobs + torch.tensor(scores, device=logprobs.device)[:, None]
        rows, new_seqs, new_scores = [], [], []
        for b in range(B):
            top = total[b * K:(b + 1) * K].reshape(-1).topk(2 * K)
            kept = 0
            for score, idx in zip(top.values.tolist(), top.indices.tolist()):
                src, t = b * K + idx // total.shape[1], idx % total.shape[1]
                if t == eot:
                    if len(finished[b]) < K and score > float("-inf"):
                        finished[b].append((seqs[src], score))
                elif kept < K:
                    rows.append(src)
                    new_seqs.append(seqs[src] + [t])
                    new_scores.append(score)
                    kept += 1
        if all(len(f) >= K for f in finished) or step == steps - 1:
            break
        cache.reorder(torch.tensor(rows))
        seqs, scores = new_seqs, new_scores
        logits = step_logits(torch.tensor([s[-1] for s in seqs], device=logits.device), step)
    best = []
    for b in range(B):
        row = slice(b * K, (b + 1) * K)
        pool = finished[b] or list(zip(new_seqs[row], new_scores[row]))  # none ended: the live beams
        best.append(max(pool, key=lambda h: h[1] / max(1, len(h[0]))))
    return [s for s, _ in best], [sc for _, sc in best]


def needs_fallback(d: Decoded) -> bool:
    """Too repetitive or too unsure, unless the window is silence (then it is skipped anyway)."""
    if is_silence(d):
        return False
    return d.compression_ratio > MAX_COMPRESSION_RATIO or d.avg_logprob < MIN_AVG_LOGPROB


def is_silence(d: Decoded) -> bool:
    return d.no_speech_prob > NO_SPEECH_PROB and d.avg_logprob < MIN_AVG_LOGPROB


def decode_with_fallback(model, tok: WhisperTokenizer, ids, inputs, *, temperatures=TEMPERATURES,
                         beam_size: int = 1, seed: int = 0, max_new_tokens: int = 224) -> list[Decoded]:
    """:func:`decode` at each temperature in turn for the rows that still need it (the windows
    are encoded once); a row keeps its last decode when none passes."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    results: list[Decoded | None] = [None] * ids.shape[0]
    rows = list(range(ids.shape[0]))
    memory = None
    for temperature in temperatures:
        sel = torch.tensor(rows)
        part = {"attention_mask": inputs["attention_mask"][sel], "positions": inputs["positions"][sel],
                "media": inputs["media"]}
        mem = None if memory is None else _rows(memory, sel)
        decoded, new_memory = decode(model, tok, ids[sel], part, temperature=temperature, memory=mem,
                                     beam_size=beam_size, max_new_tokens=max_new_tokens, generator=generator)
        if memory is None:
            memory = new_memory
        for r, d in zip(rows, decoded):
            results[r] = d
        rows = [r for r, d in zip(rows, decoded) if needs_fallback(d)]
        if not rows:
            break
    return results


def _rows(memory, rows: torch.Tensor):
    """The cross-attention memory of some batch rows (as the KV cache keeps it)."""
    rows = rows.to(memory.features.device)
    return Memory(memory.features[rows], memory.start[rows], None if memory.doc is None else memory.doc[rows])


# ---------------------------------------------------------------------------------------------
# Segments and seeking


def segments_of(tokens: list[int], tok: WhisperTokenizer, offset: float, duration: float
                ) -> tuple[list[Segment], float]:
    """A window's tokens -> its segments (times from ``offset``, the window's start in seconds) and
    how far to seek (seconds): to the last complete timestamp pair, or the window's ``duration``
    (its audio, <= 30 s) when the text ends with a single timestamp or has no pair."""
    begin = tok.timestamp_begin
    is_stamp = [t >= begin for t in tokens]
    ends = [i + 1 for i in range(len(tokens) - 1) if is_stamp[i] and is_stamp[i + 1]]
    single_end = is_stamp[-2:] == [False, True]

    def text(ids) -> str:
        return tok.decode([t for t in ids if t < tok.eot]).strip()

    def time(t: int) -> float:
        return round(offset + (t - begin) * TIME_STEP, 3)

    if not ends:
        stamps = [t for t in tokens if t >= begin]
        last = (stamps[-1] - begin) * TIME_STEP if stamps and stamps[-1] != begin else duration
        return _kept([Segment(offset, round(offset + last, 3), text(tokens))]), duration
    if single_end:
        ends.append(len(tokens))
    segments, start = [], 0
    for stop in ends:
        piece = tokens[start:stop]
        segments.append(Segment(time(piece[0]), time(piece[-1]), text(piece)))
        start = stop
    seek = duration if single_end else (tokens[start - 1] - begin) * TIME_STEP
    return _kept(segments), seek


def snap_to_speech(segments: list[Segment], regions: list[tuple[float, float]]) -> list[Segment]:
    """Segments moved onto the voice-activity detector's speech ``regions`` (seconds): a segment
    belongs to the regions it overlaps (else the nearest one); the first segment in a region starts
    where the region starts, the last one ends where it ends, and times between segments of one
    region are Whisper's, clipped to the region."""
    if not regions:
        return segments
    owners = []
    for s in segments:
        hit = [k for k, (a, b) in enumerate(regions) if a < s.end and s.start < b]
        near = min(range(len(regions)), key=lambda k: max(regions[k][0] - s.end, s.start - regions[k][1]))
        owners.append((hit[0], hit[-1]) if hit else (near, near))
    out = []
    for n, (s, (first, last)) in enumerate(zip(segments, owners)):
        opens = n == 0 or owners[n - 1][1] < first
        closes = n == len(segments) - 1 or owners[n + 1][0] > last
        start = regions[first][0] if opens else min(max(s.start, regions[first][0]), regions[first][1])
        end = regions[last][1] if closes else max(min(s.end, regions[last][1]), regions[last][0])
        out.append(Segment(round(start, 3), round(max(start, end), 3), s.text))
    return out


def first_merge(segments: list[Segment], regions: list[tuple[int, int]], start: int, length: int):
    """The first segment of a window (``length`` samples from sample ``start``) that covers most
    of two or more of its speech ``regions`` (samples), as ``(index, [those regions])``, or None:
    Whisper wrote one segment over a pause the voice-activity detector heard."""
    inside = [(max(a, start), min(b, start + length)) for a, b in regions if b > start and a < start + length]
    for k, s in enumerate(segments):
        lo, hi = s.start * SAMPLE_RATE, s.end * SAMPLE_RATE
        covered = [(a, b) for a, b in inside if min(hi, b) - max(lo, a) > (b - a) / 2]
        if len(covered) > 1:
            return k, covered
    return None


def _kept(segments: list[Segment]) -> list[Segment]:
    """Segments with text and a length (openai clears the others)."""
    return [s for s in segments if s.text and s.end > s.start]


class AudioStream:
    """A file's 16-kHz samples from ``seek`` on, read 30 s at a time (never the whole file). With
    ``chunks`` (sample ranges: the speech a voice-activity detector found, merged to <= 30 s) a
    window never crosses a chunk's end and the samples between chunks are skipped."""

    def __init__(self, path: str | Path, chunks: list[tuple[int, int]] | None = None):
        self.chunks = iter_audio_windows(path, WINDOW / SAMPLE_RATE, SAMPLE_RATE)
        self.speech = None if chunks is None else list(chunks)
        self.buffer = torch.zeros(0)
        self.offset = 0  # the file sample buffer[0] is
        self.ended = False

    def window(self, seek: int) -> tuple[int, torch.Tensor]:
        """Where the next window starts (``seek``, or the next chunk's start) and up to 30 s of
        samples from there (empty at the end of the file or of the last chunk)."""
        stop = None
        if self.speech is not None:
            while self.speech and self.speech[0][1] - max(seek, self.speech[0][0]) < MIN_WINDOW:
                self.speech.pop(0)  # done, or too little of it left to decode
            if not self.speech:
                return seek, torch.zeros(0)
            seek, stop = max(seek, self.speech[0][0]), self.speech[0][1]
        self._drop_before(seek)
        while len(self.buffer) < seek - self.offset + WINDOW and not self.ended:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.ended = True
            else:
                self.buffer = torch.cat([self.buffer, chunk])
                self._drop_before(seek)  # a seek past what was read skips whole windows
        return seek, self.buffer[:WINDOW if stop is None else min(WINDOW, stop - seek)]

    def split(self, regions: list[tuple[int, int]]):
        """The current chunk becomes ``regions`` (speech regions in it), each a chunk of its own,
        and the rest of it after them."""
        end = self.speech[0][1]
        rest = [(regions[-1][1], end)] if end - regions[-1][1] >= MIN_WINDOW else []
        self.speech[:1] = list(regions) + rest

    def _drop_before(self, seek: int):
        cut = min(len(self.buffer), seek - self.offset)
        self.buffer, self.offset = self.buffer[cut:], self.offset + cut


# ---------------------------------------------------------------------------------------------
# Files


@dataclass
class _File:
    """One file being transcribed: where it is read, the prompt it carries, its speech regions
    (with ``vad``) and its language (None until detected)."""
    stream: AudioStream
    regions: list[tuple[int, int]] | None
    language: str | None
    seek: int = 0
    prompt: list[int] = field(default_factory=list)


def transcribe_files(model, processor: Processor, paths, *, language: str | None = None,
                     task: str = "transcribe", condition_on_previous_text: bool = False,
                     batch_size: int = 8, beam_size: int = 1, temperatures=TEMPERATURES,
                     vad: bool = False, progress_bar: bool | None = None
                     ) -> list[Transcript | Exception]:
    """Each file's :class:`Transcript`, or the exception that stopped reading it (a file that cannot
    be read: :data:`omni.media.BAD_FILE_ERRORS`). The current windows of up to ``batch_size`` files
    are decoded together; ``beam_size`` beams each at temperature 0. ``language=None`` with a
    multilingual Whisper: each file's language is detected on its first window
    (:func:`detect_language`) and logged. ``vad``: Silero VAD finds each file's speech first (a
    streamed pass, :mod:`omni.media.vad`); only the speech is decoded, in chunks of <= 30 s, and
    segments take the speech's boundaries (:func:`snap_to_speech`)."""
    tok = processor.tokenizer
    if not isinstance(tok, WhisperTokenizer):
        raise ValueError("transcribe needs a Whisper checkpoint (omni import whisper); this one's "
                         f"tokenizer is {type(tok).__name__}")
    tok.prompt(language, task)  # a bad language or task fails here, before any file is read
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    paths = [str(p) for p in paths]
    detector = SileroVAD() if vad else None
    results: list = [Transcript() for _ in paths]
    files = iter(range(len(paths)))
    active: dict[int, _File] = {}
    max_prompt = model.max_seq_len // 2 - 1
    total = round(sum(_seconds(p) for p in paths), 2)
    with progress(total=total or None, desc="transcribe", unit="s", enabled=progress_bar) as bar:
        while True:
            while len(active) < batch_size and (i := next(files, None)) is not None:
                try:
                    regions = speech_regions(paths[i], detector) if vad else None
                    chunks = None if regions is None else merge_regions(regions, WINDOW)
                    active[i] = _File(AudioStream(paths[i], chunks), regions,
                                      language or (None if tok.multilingual else "en"))
                except BAD_FILE_ERRORS as e:
                    results[i] = e
            if not active:
                break
            batch = []  # (file, window samples)
            for i, f in list(active.items()):
                try:
                    at, wave = f.stream.window(f.seek)
                except BAD_FILE_ERRORS as e:
                    results[i] = e
                    del active[i]
                    continue
                bar.update(round((at - f.seek) / SAMPLE_RATE, 2))  # silence a VAD skipped
                f.seek = at
                if len(wave) < MIN_WINDOW:  # nothing left (openai stops at one frame too)
                    if f.regions is not None:
                        results[i][:] = snap_to_speech(results[i], [(a / SAMPLE_RATE, b / SAMPLE_RATE)
                                                                    for a, b in f.regions])
                    bar.update(max(0.0, round(_seconds(paths[i]) - at / SAMPLE_RATE, 2)))
                    del active[i]
                else:
                    batch.append((i, wave))
            if not batch:
                continue
            prompts = [[Audio(w, sample_rate=SAMPLE_RATE)]
                       + ([tok.decode(active[i].prompt[-max_prompt:])] if active[i].prompt else [])
                       for i, w in batch]
            rendered, inputs = processor.batch(prompts, language=language, task=task, timestamps=True)
            ids = left_pad([r.ids for r in rendered], processor.vocab.pad_id)[0]
            if tok.multilingual:
                _set_languages(model, tok, ids, inputs, [(paths[i], active[i]) for i, _ in batch])
            decoded = decode_with_fallback(model, tok, ids, inputs, temperatures=temperatures,
                                           beam_size=beam_size)
            for (i, wave), d in zip(batch, decoded):
                f = active[i]
                offset, duration = f.seek / SAMPLE_RATE, len(wave) / SAMPLE_RATE
                if is_silence(d):
                    segments, seek = [], duration
                else:
                    segments, seek = segments_of(d.tokens, tok, offset, duration)
                seek = seek if seek > 0 else duration  # a pair at <|0.00|> would seek nowhere
                if f.regions is not None and (merged := first_merge(segments, f.regions, f.seek, len(wave))):
                    k, regions = merged  # Whisper ran pauses together: decode those regions alone
                    segments, seek = segments[:k], (regions[0][0] - f.seek) / SAMPLE_RATE
                    f.stream.split(regions)
                results[i].extend(segments)
                results[i].language = f.language
                f.seek += round(seek * SAMPLE_RATE)
                if condition_on_previous_text and d.temperature <= 0.5:
                    f.prompt += [t for t in d.tokens if t < tok.eot]
                else:
                    f.prompt = []
                bar.update(round(seek, 2))
    return results


def _set_languages(model, tok: WhisperTokenizer, ids: torch.Tensor, inputs: dict, files: list):
    """Detect the language of the files (``(path, _File)``, one per row) that have none yet, and
    put each row's language token after its ``<|startoftranscript|>`` (the batch was rendered with
    one language for all rows)."""
    todo = [k for k, (_, f) in enumerate(files) if f.language is None]
    if todo:
        sel = torch.tensor(todo)
        part = {"attention_mask": inputs["attention_mask"][sel], "positions": inputs["positions"][sel],
                "media": [(todo.index(r), slot) for r, slot in inputs["media"] if r in todo]}
        for k, (lang, p) in zip(todo, detect_language(model, tok, ids[sel], part)):
            files[k][1].language = lang
            log.info("%s: detected language %s (probability %.2f)", files[k][0], lang, p)
    sot = (ids == tok.sot).long().argmax(1)
    ids[torch.arange(len(ids)), sot + 1] = torch.tensor([tok.languages[f.language] for _, f in files])


def _seconds(path: str) -> float:
    """A file's duration from its header (0 when it cannot say): the progress bar's total."""
    try:
        import soundfile as sf

        return sf.info(path).duration
    except Exception:  # unreadable: its error is reported when it is read
        return 0.0


# ---------------------------------------------------------------------------------------------
# Output formats


def format_segments(segments: list[Segment], fmt: str = "txt") -> str:
    """``txt`` (the text), ``json`` (``{"text", "language", "segments": [{start, end, text}]}``;
    ``language`` is a :class:`Transcript`'s, else null), ``srt``,
    ``vtt`` or ``tsv`` (start and end in milliseconds, as openai-whisper writes them)."""
    if fmt == "txt":
        return " ".join(s.text for s in segments) + "\n"
    if fmt == "json":
        return json.dumps({"text": " ".join(s.text for s in segments),
                           "language": getattr(segments, "language", None),
                           "segments": [asdict(s) for s in segments]}, ensure_ascii=False) + "\n"
    if fmt == "srt":
        return "".join(f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
                       for n, s in enumerate(segments, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n"
                                      for s in segments)
    if fmt == "tsv":
        return "start\tend\ttext\n" + "".join(f"{round(s.start * 1000)}\t{round(s.end * 1000)}\t{s.text}\n"
                                              for s in segments)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")


def _clock(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (srt) or ``HH:MM:SS.mmm`` (vtt)."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"
