"""Samples as interleaved segments, the chat template, rendering to ids, and packing.

A :class:`Sample` is a list of :class:`Message` (a role, or ``None`` for a plain document) each
holding :class:`Segment` pieces: text; a media span whose tensor the model's encoder for that
modality reads (placed into ``<|feat|>`` slots); or audio codec codes, which become tokens.
Rendering gives ids, next-token targets with the loss mask applied, 3-D positions (time, height,
width; text uses the same value on all three axes, as in Qwen2-VL M-RoPE) and where the media
slots are. Packing puts several rendered samples into one row with document ids so attention
stays inside each document.

Template::

    <bos> <|user|> ... <|eot|> <|assistant|> ... <|eot|> ... <eos>      (chat)
    <bos> text <eos>                                                     (document)
    <|image|> <|feat|> x N <|/image|>                                    (a media span)
    <|image|> <|/image|>                    (a media span read by cross-attention, media_tokens=False)
    <|audio|> codes in the delay or flatten layout <|/audio|>            (audio as tokens)

With the ``delay`` layout a rendered sample carries ``streams (K-1, T)``: the ids of codebooks
1..K-1 that share a step with stream 0 (``input_ids``); ``EMPTY`` where a step has none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import jinja2
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from omni.model.audio_codes import EMPTY, PATTERNS, delay_apply, flatten_apply, to_vocab
from omni.vocab import Vocab

IGNORE = -100
ROLES = ("system", "user", "assistant")
MEDIA_MARKERS = {"image": ("<|image|>", "<|/image|>"), "audio": ("<|audio|>", "<|/audio|>"),
                 "video": ("<|video|>", "<|/video|>")}


@dataclass
class Segment:
    """One piece of a message.

    text: a string (``modality="text"``); on a media segment, text rendered right after its span,
    never a target (an image tagger's labels, :mod:`omni.tokenizers.tagger`).
    data: the tensor the model's encoder for ``modality`` reads (a log-mel, pixels, frames, or
    cached features); ``grid`` ``(t, h, w)`` lays out the tokens the encoder produces for it
    (default ``(N, 1, 1)`` for ``data`` of shape ``(N, D)``: one time step per feature).
    time_offsets: ``(t,)`` long, non-decreasing from 0: the M-RoPE time position of each of the
    grid's time steps, counted from the span's first (a video's frames by their timestamps, see
    :meth:`omni.tokenizers.video.VideoTokenizer.time_offsets`); default ``0 .. t-1``.
    codes: ``(K, T)`` audio codec codes, rendered as tokens; ``open_end`` leaves the span open
    (no end marker, delay pattern cut at the last frame) so generation can continue it.
    """

    modality: str = "text"
    text: str | None = None
    data: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    codes: torch.Tensor | None = None
    open_end: bool = False
    time_offsets: torch.Tensor | None = None

    def __post_init__(self):
        if self.modality == "text":
            if not isinstance(self.text, str):
                raise ValueError(f"a text segment needs a str, got {type(self.text).__name__}")
        elif self.modality not in MEDIA_MARKERS:
            raise ValueError(f"unknown modality {self.modality!r}; expected text, {', '.join(MEDIA_MARKERS)}")
        elif self.codes is not None:
            if self.modality != "audio" or self.codes.dim() != 2:
                raise ValueError(f"codes must be an audio segment's (K, T) tensor, got {self.modality} "
                                 f"{tuple(self.codes.shape)}")
        else:
            if self.data is None:
                raise ValueError(f"a {self.modality} segment needs data (an encoder input) or codes")
            if self.grid is None:
                if self.data.dim() != 2:
                    raise ValueError(f"a {self.modality} segment with data of shape {tuple(self.data.shape)} "
                                     "needs an explicit grid (t, h, w)")
                self.grid = (self.data.shape[0], 1, 1)
            self.grid = tuple(int(g) for g in self.grid)
            if len(self.grid) != 3 or min(self.grid) < 1:
                raise ValueError(f"{self.modality} grid must be three positive sizes (t, h, w), "
                                 f"got {self.grid}")
            offsets = self.time_offsets
            if offsets is not None and (offsets.shape != (self.grid[0],) or int(offsets[0]) != 0
                                        or bool((offsets.diff() < 0).any())):
                raise ValueError(f"{self.modality} time_offsets must be ({self.grid[0]},) non-decreasing "
                                 f"from 0, got {offsets.tolist()}")

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class Message:
    role: str | None  # None: a plain document (pre-training text); loss on all of it
    segments: list[Segment]

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES} or None for a document")


@dataclass
class Sample:
    messages: list[Message]

    @classmethod
    def document(cls, text: str) -> Sample:
        return cls([Message(None, [Segment(text=text)])])


@dataclass
class MediaSlot:
    """A media span's encoder input and where its ``length`` features go: sequence positions
    ``start .. start+length-1`` (over ``<|feat|>`` tokens), or, for a model that reads media by
    cross-attention, its memory, visible to the tokens from index ``start`` on."""

    start: int
    length: int
    modality: str
    data: torch.Tensor
    # text ids the media says (speech), for an encoder's auxiliary loss (CTC)
    labels: torch.Tensor | None = None


@dataclass
class Rendered:
    """ids, targets: (T,); positions: (3, T); streams, stream_targets: (K-1, T) or None (delay layout);
    loss_weight: how much each of its targets counts in a training loss (a mixture task's)."""

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    media: list[MediaSlot] = field(default_factory=list)
    streams: torch.Tensor | None = None
    stream_targets: torch.Tensor | None = None
    loss_weight: float = 1.0

    def __len__(self) -> int:
        return self.ids.shape[0]


def render(sample: Sample, tokenizer, *, vocab: Vocab | None = None, audio_pattern: str = "delay",
           mrope: bool = False, media_tokens: bool | set[str] = True, add_generation_prompt: bool = False,
           loss_on: str = "assistant", add_eos: bool | None = None) -> Rendered:
    """Render a sample to ids/targets/positions (and streams for delay-layout audio codes).

    vocab: the model's vocabulary (the tokenizer's, plus audio codebooks); default the tokenizer's.
    audio_pattern: how audio codes are laid out, ``delay`` or ``flatten``.
    mrope: lay media spans out on (t, h, w) axes (M-RoPE); otherwise every token, media included,
    takes the next 1-D position. media_tokens=False: media spans hold no ``<|feat|>`` tokens
    (cross-attention reads them); a set: only those modalities' spans hold them
    (``model.render_options()`` says which a model needs).
    loss_on: ``"assistant"`` (chat default: assistant content and its end-of-turn) or ``"all"``.
    Plain documents always carry loss. add_generation_prompt: end with ``<|assistant|>`` (chat)
    or leave the document open (no eos) so generation continues it.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    if audio_pattern not in PATTERNS:
        raise ValueError(f"audio_pattern must be one of {PATTERNS}, got {audio_pattern!r}")
    vocab = vocab or tokenizer.vocab
    K = vocab.num_codebooks
    delay = audio_pattern == "delay" and K > 1
    template = getattr(tokenizer, "chat_template", None)
    roles = [m.role for m in sample.messages]
    frames = None
    if template and any(roles):  # a chat in the tokenizer's own template (an imported model's)
        if not all(roles):
            raise ValueError("a sample mixing plain documents with chat turns cannot be rendered in a "
                             "chat template; make every message a turn")
        frames = [tokenizer.encode_special(f) for f in chat_frames(template, roles, add_generation_prompt,
                                                                   tokenizer)]
    ids: list[int] = []
    extra: list[list[int]] = []  # per step: ids of streams 1..K-1 (delay layout)
    train: list[bool] = []
    pos: list[tuple[int, int, int]] = []
    media: list[MediaSlot] = []
    nxt = 0  # next free position on every axis

    def put(token_ids, trainable, streams=None):
        nonlocal nxt
        for i, t in enumerate(token_ids):
            ids.append(int(t))
            if delay:
                extra.append([int(x) for x in streams[:, i]] if streams is not None else [EMPTY] * (K - 1))
            train.append(trainable)
            pos.append((nxt, nxt, nxt))
            nxt += 1

    if frames is not None:
        put(frames[0], False)
    elif getattr(tokenizer, "add_bos", True):
        put([vocab.bos_id], False)
    for n, msg in enumerate(sample.messages):
        trainable = msg.role is None or loss_on == "all" or msg.role == "assistant"
        if msg.role is not None and frames is None:
            put([vocab.id(f"<|{msg.role}|>")], False)
        for seg in msg.segments:
            if seg.modality == "text":
                put(tokenizer.encode(seg.text), trainable)
                continue
            begin, end = MEDIA_MARKERS[seg.modality]
            put([vocab.id(begin)], False)
            if seg.codes is not None:
                _put_codes(seg, vocab, delay, put, trainable, vocab.id(end))
                continue
            media.append(MediaSlot(len(ids), seg.num_tokens, seg.modality, seg.data))
            if media_tokens if isinstance(media_tokens, bool) else seg.modality in media_tokens:
                t, h, w = seg.grid if mrope else (seg.num_tokens, 1, 1)
                times = seg.time_offsets.tolist() if mrope and seg.time_offsets is not None else range(t)
                for ti in times:
                    for hi in range(h):
                        for wi in range(w):
                            ids.append(vocab.id("<|feat|>"))
                            if delay:
                                extra.append([EMPTY] * (K - 1))
                            train.append(False)
                            pos.append((nxt + ti, nxt + hi, nxt + wi) if mrope else (nxt + ti,) * 3)
                nxt += max(times[-1] + 1, h, w)
            put([vocab.id(end)], False)  # without tokens, cross-attention reads the span from here on
            if seg.text:
                put(tokenizer.encode(seg.text), False)
        if frames is not None:
            # the template's text up to its end of turn is learned with an assistant turn
            after = frames[n + 1]
            ends = [i for i, t in enumerate(after) if t in (vocab.eos_id, vocab.specials.get("<|eot|>"))]
            learned = ends[0] + 1 if ends else 0
            put(after[:learned], trainable)
            put(after[learned:], False)
        elif msg.role is not None:
            put([vocab.id("<|eot|>")], trainable)
    last_is_doc = bool(sample.messages) and sample.messages[-1].role is None
    if frames is not None:
        pass  # the template wrote the generation prompt and any end of sequence
    elif add_generation_prompt:
        if not last_is_doc:
            put([vocab.id("<|assistant|>")], False)
    elif add_eos if add_eos is not None else True:
        # A document learns to end; in a chat <|eot|> already ends the turn, so eos is a given marker.
        put([vocab.eos_id], last_is_doc and train[-1])

    ids_t = torch.tensor(ids, dtype=torch.long)
    train_t = torch.tensor(train)
    targets = _shift_targets(ids_t, train_t)
    streams = stream_targets = None
    if delay:
        streams = torch.tensor(extra, dtype=torch.long).T.contiguous()
        stream_targets = torch.stack([_shift_targets(row, train_t) for row in streams])
    return Rendered(ids_t, targets, torch.tensor(pos, dtype=torch.long).T.contiguous(), media, streams,
                    stream_targets)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    # transformers' settings, so a checkpoint's template renders as it does there
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise ValueError(f"the chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def chat_frames(template: str, roles: list[str], add_generation_prompt: bool, tokenizer=None) -> list[str]:
    """The text a Jinja chat template (a Hugging Face checkpoint's ``chat_template``) writes around
    each message: ``frames[i]`` before message ``i``, ``frames[-1]`` after the last. Each message's
    content is rendered as a placeholder and cut out, so user text is never parsed for special
    tokens and media pieces keep their place."""
    marks = [f"\x00{i}\x00" for i in range(len(roles))]
    special = {k: getattr(tokenizer, k, None) or "" for k in ("bos_token", "eos_token")}
    try:
        text = _compiled(template).render(messages=[{"role": r, "content": m} for r, m in zip(roles, marks)],
                                          add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed to render: {e}") from None
    frames = []
    for i, mark in enumerate(marks):
        before, found, text = text.partition(mark)
        if not found:
            raise ValueError(f"the chat template dropped message {i} ({roles[i]}) or changed its order")
        frames.append(before)
    return frames + [text]


def _shift_targets(ids: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """targets[t] = ids[t+1] where step t+1 carries loss and holds an id; IGNORE elsewhere."""
    targets = torch.full_like(ids, IGNORE)
    keep = train[1:] & (ids[1:] != EMPTY)
    targets[:-1] = torch.where(keep, ids[1:], IGNORE)
    return targets


def _put_codes(seg: Segment, vocab: Vocab, delay: bool, put, trainable: bool, end_id: int) -> None:
    """Audio codes as tokens, closed by ``end_id`` unless ``seg.open_end``. In the delay layout the
    end marker takes stream 0's first empty step (right after the last frame's first code), while
    the higher codebooks finish their last frames: generation stops stream 0 there too."""
    codes = seg.codes.long()
    K = codes.shape[0]
    if K != vocab.num_codebooks:
        raise ValueError(f"audio codes have {K} codebooks but the vocabulary has {vocab.num_codebooks}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab.codebook_size):
        raise ValueError(f"audio codes must be in [0, {vocab.codebook_size}), "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    book = torch.arange(K)[:, None]
    if delay:
        T = codes.shape[1]
        pattern = to_vocab(delay_apply(codes), book, vocab)  # (K, T + K - 1)
        if seg.open_end:
            pattern = pattern[:, :T]  # the prompt stops at its last frame's first code
        else:
            pattern[0, T] = end_id
        put(pattern[0].tolist(), trainable, streams=pattern[1:])
    else:
        flat = flatten_apply(codes)
        put(to_vocab(flat, book.expand_as(codes).T.reshape(-1), vocab).tolist(), trainable)
        if not seg.open_end:
            put([end_id], trainable)


@dataclass
class PackedRow:
    """One training row: ids, targets, doc_ids: (T,); positions: (3, T); streams, stream_targets:
    (K-1, T) or None; media slots with row offsets; loss_weights (T,) when a piece's
    ``loss_weight`` is not 1, else None. Padding has doc id -1."""

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    streams: torch.Tensor | None = None
    stream_targets: torch.Tensor | None = None
    media: list[MediaSlot] = field(default_factory=list)
    loss_weights: torch.Tensor | None = None


def pack(samples: list[Rendered], seq_len: int, pad_id: int, *,
         split_across_rows: bool = True) -> list[PackedRow]:
    """Pack rendered samples into rows of ``seq_len`` tokens, in order.

    split_across_rows=True (pre-training): a sample that does not fit continues in the next row,
    so nothing is padded but the last row. False (chat/SFT): a sample that does not fit starts a
    new row; one longer than ``seq_len`` is cut. Positions restart at each piece. A sample with
    media is never split or cut (its encoder output must land whole): one longer than
    ``seq_len`` is an error.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    num_streams = max((s.streams.shape[0] for s in samples if s.streams is not None), default=0)
    rows: list[PackedRow] = []
    cur: list[tuple[Rendered, int, int]] = []  # (sample, start, end) pieces of the current row
    used = 0

    def flush():
        nonlocal cur, used
        if cur:
            rows.append(_make_row(cur, seq_len, pad_id, num_streams))
        cur, used = [], 0

    for s in samples:
        start, n = 0, len(s)
        whole = not split_across_rows or bool(s.media)
        if s.media and n > seq_len:
            raise ValueError(f"a sample with media is {n} tokens, longer than seq_len={seq_len}")
        if whole and n > seq_len - used:
            flush()
        while start < n:
            take = min(n - start, seq_len - used)
            cur.append((s, start, start + take))
            used += take
            start += take
            if used == seq_len:
                flush()
            if start < n and whole:
                break  # too long for one row: cut
    flush()
    return rows


def _make_row(pieces, seq_len, pad_id, num_streams) -> PackedRow:
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    targets = torch.full((seq_len,), IGNORE, dtype=torch.long)
    positions = torch.zeros(3, seq_len, dtype=torch.long)
    doc_ids = torch.full((seq_len,), -1, dtype=torch.long)
    streams = torch.full((num_streams, seq_len), EMPTY, dtype=torch.long) if num_streams else None
    stream_targets = torch.full((num_streams, seq_len), IGNORE, dtype=torch.long) if num_streams else None
    media = []
    weighted = any(s.loss_weight != 1.0 for s, _, _ in pieces)
    loss_weights = torch.ones(seq_len) if weighted else None
    at = 0
    for doc, (s, a, b) in enumerate(pieces):
        n = b - a
        ids[at:at + n] = s.ids[a:b]
        targets[at:at + n] = s.targets[a:b]  # a cut piece keeps its last target: the id is known
        positions[:, at:at + n] = s.positions[:, a:b] - s.positions[:, a:a + 1].min()
        doc_ids[at:at + n] = doc
        if s.streams is not None:
            streams[:, at:at + n] = s.streams[:, a:b]
            stream_targets[:, at:at + n] = s.stream_targets[:, a:b]
        media += [replace(m, start=m.start - a + at) for m in s.media]
        if weighted:
            loss_weights[at:at + n] = s.loss_weight
        at += n
    return PackedRow(ids, targets, positions, doc_ids, streams, stream_targets, media, loss_weights)
