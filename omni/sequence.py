"""Samples as interleaved segments, the chat template, rendering to ids, and packing.

A :class:`Sample` is a list of :class:`Message` (a role, or ``None`` for a plain document) each
holding :class:`Segment` pieces: text, or a media span (continuous features placed into
``<|feat|>`` slots). Rendering gives ids, next-token targets with the loss mask applied,
3-D positions (time, height, width; text uses the same value on all three axes, as in Qwen2-VL
M-RoPE) and where the feature slots are. Packing puts several rendered samples into one row
with document ids so attention stays inside each document.

Template::

    <bos> <|user|> ... <|eot|> <|assistant|> ... <|eot|> ... <eos>      (chat)
    <bos> text <eos>                                                     (document)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omni.vocab import Vocab

IGNORE = -100
ROLES = ("system", "user", "assistant")
MEDIA_MARKERS = {"image": ("<|image|>", "<|/image|>"), "audio": ("<|audio|>", "<|/audio|>"),
                 "video": ("<|video|>", "<|/video|>")}


@dataclass
class Segment:
    """One piece of a message.

    text: a string (``modality="text"``).
    features: ``(N, D)`` encoder features for a media span; ``grid`` ``(t, h, w)`` lays the N
    features out for M-RoPE (default ``(N, 1, 1)``: one time step per feature).
    """

    modality: str = "text"
    text: str | None = None
    features: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.modality == "text":
            if not isinstance(self.text, str):
                raise ValueError(f"a text segment needs a str, got {type(self.text).__name__}")
        elif self.modality in MEDIA_MARKERS:
            if self.features is None or self.features.dim() != 2:
                raise ValueError(f"a {self.modality} segment needs features of shape (N, D)")
            n = self.features.shape[0]
            self.grid = tuple(self.grid) if self.grid is not None else (n, 1, 1)
            t, h, w = self.grid
            if t * h * w != n:
                raise ValueError(f"{self.modality} grid {self.grid} does not hold {n} features")
        else:
            raise ValueError(f"unknown modality {self.modality!r}; expected text, {', '.join(MEDIA_MARKERS)}")


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
class Rendered:
    """ids, targets: (T,); positions: (3, T); feature_slots: [(start, features)] into ids."""

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    feature_slots: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]


def render(sample: Sample, tokenizer, *, add_generation_prompt: bool = False, loss_on: str = "assistant",
           add_eos: bool | None = None) -> Rendered:
    """Render a sample to ids/targets/positions.

    loss_on: ``"assistant"`` (chat default: assistant content and its end-of-turn) or ``"all"``.
    Plain documents always carry loss. add_generation_prompt: end with ``<|assistant|>`` (chat)
    or leave the document open (no eos) so generation continues it.
    """
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    vocab: Vocab = tokenizer.vocab
    ids: list[int] = [vocab.bos_id]
    train: list[bool] = [False]
    pos: list[tuple[int, int, int]] = [(0, 0, 0)]
    slots: list[tuple[int, torch.Tensor]] = []
    nxt = 1  # next free position on every axis

    def put(token_ids, trainable):
        nonlocal nxt
        for t in token_ids:
            ids.append(t)
            train.append(trainable)
            pos.append((nxt, nxt, nxt))
            nxt += 1

    for msg in sample.messages:
        trainable = msg.role is None or loss_on == "all" or msg.role == "assistant"
        if msg.role is not None:
            put([vocab.id(f"<|{msg.role}|>")], False)
        for seg in msg.segments:
            if seg.modality == "text":
                put(tokenizer.encode(seg.text), trainable)
                continue
            begin, end = MEDIA_MARKERS[seg.modality]
            put([vocab.id(begin)], False)
            t, h, w = seg.grid
            slots.append((len(ids), seg.features))
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        ids.append(vocab.id("<|feat|>"))
                        train.append(False)
                        pos.append((nxt + ti, nxt + hi, nxt + wi))
            nxt += max(t, h, w)
            put([vocab.id(end)], False)
        if msg.role is not None:
            put([vocab.id("<|eot|>")], trainable)
    last_is_doc = bool(sample.messages) and sample.messages[-1].role is None
    if add_generation_prompt:
        if not last_is_doc:
            put([vocab.id("<|assistant|>")], False)
    elif add_eos if add_eos is not None else True:
        # A document learns to end; in a chat <|eot|> already ends the turn, so eos is a given marker.
        put([vocab.eos_id], last_is_doc and train[-1])

    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = torch.full_like(ids_t, IGNORE)
    train_t = torch.tensor(train)
    targets[:-1] = torch.where(train_t[1:], ids_t[1:], IGNORE)
    return Rendered(ids_t, targets, torch.tensor(pos, dtype=torch.long).T.contiguous(), slots)


@dataclass
class PackedRow:
    """One training row: ids, targets, doc_ids: (T,); positions: (3, T). Padding has doc id -1."""

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor


def pack(samples: list[Rendered], seq_len: int, pad_id: int, *, split_across_rows: bool = True) -> list[PackedRow]:
    """Pack rendered samples into rows of ``seq_len`` tokens, in order.

    split_across_rows=True (pre-training): a sample that does not fit continues in the next row,
    so nothing is padded but the last row. False (chat/SFT): a sample that does not fit starts a
    new row; one longer than ``seq_len`` is cut. Positions restart at each piece.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    rows: list[PackedRow] = []
    cur: list[tuple[Rendered, int, int]] = []  # (sample, start, end) pieces of the current row
    used = 0

    def flush():
        nonlocal cur, used
        if cur:
            rows.append(_make_row(cur, seq_len, pad_id))
        cur, used = [], 0

    for s in samples:
        if s.feature_slots:
            raise ValueError("packing samples with media features is not supported yet")
        start, n = 0, len(s)
        if not split_across_rows and n - start > seq_len - used:
            flush()
        while start < n:
            take = min(n - start, seq_len - used)
            cur.append((s, start, start + take))
            used += take
            start += take
            if used == seq_len:
                flush()
            if start < n and not split_across_rows:
                break  # too long for one row: cut
    flush()
    return rows


def _make_row(pieces, seq_len, pad_id) -> PackedRow:
    ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    targets = torch.full((seq_len,), IGNORE, dtype=torch.long)
    positions = torch.zeros(3, seq_len, dtype=torch.long)
    doc_ids = torch.full((seq_len,), -1, dtype=torch.long)
    at = 0
    for doc, (s, a, b) in enumerate(pieces):
        n = b - a
        ids[at:at + n] = s.ids[a:b]
        targets[at:at + n] = s.targets[a:b]  # a cut piece keeps its last target: the id is known
        positions[:, at:at + n] = s.positions[:, a:b] - s.positions[:, a:a + 1].min()
        doc_ids[at:at + n] = doc
        at += n
    return PackedRow(ids, targets, positions, doc_ids)
