"""The unified vocabulary: one id space for every modality.

Layout (ids grow left to right)::

    [ text: the tokenizer's ids, incl. pad/unk/bos/eos and the special tokens ]
    [ audio codebook 0 ] ... [ audio codebook K-1 ]

The special tokens (chat roles, end of turn, begin/end of each media span, frame separator,
feature placeholder) are the text tokenizer's *control tokens* (SentencePiece control symbols, or
ids a BPE tokenizer appends after the model's own): they have fixed ids inside the text range, are
never produced by encoding user text (so a prompt cannot inject a role marker), and are dropped
when decoding. Audio codebook ``k`` owns ``cardinality`` ids starting at
``text_size + k * cardinality``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Order matters: SentencePiece assigns control symbols consecutive ids after pad/unk/bos/eos.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|eot|>",  # end of turn
    "<|image|>",
    "<|/image|>",
    "<|audio|>",
    "<|/audio|>",
    "<|video|>",
    "<|/video|>",
    "<|frame|>",  # separates video frames
    "<|feat|>",  # placeholder filled by continuous encoder features
)

# Fixed ids of SentencePiece's own meta pieces (set when the model is trained, see tokenizers/text.py).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_META_IDS = ("pad_id", "unk_id", "bos_id", "eos_id")

MODALITIES = ("text", "audio")  # output modalities a head can produce


@dataclass(frozen=True)
class Vocab:
    """Id ranges of the unified vocabulary.

    ``specials`` maps each special token to its id. ``text_size`` is the text tokenizer's
    vocabulary size (specials included); audio codebooks follow it. ``pad_id``/``unk_id``/
    ``bos_id``/``eos_id`` default to SentencePiece's layout (0-3); an imported model's BPE
    vocabulary has its own.
    """

    text_size: int
    specials: dict[str, int] = field(default_factory=dict)
    num_codebooks: int = 0
    codebook_size: int = 0
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self):
        if self.text_size <= 0:
            raise ValueError(f"vocab text_size must be positive, got {self.text_size}")
        if (self.num_codebooks > 0) != (self.codebook_size > 0):
            raise ValueError(
                f"num_codebooks ({self.num_codebooks}) and codebook_size ({self.codebook_size}) "
                "must both be zero or both positive"
            )
        ids = {name: getattr(self, name) for name in _META_IDS}
        if not all(isinstance(i, int) and 0 <= i < self.text_size for i in ids.values()):
            raise ValueError(f"vocab {ids} must be text ids in [0, {self.text_size})")

    @classmethod
    def default(cls, text_size: int, num_codebooks: int = 0, codebook_size: int = 0) -> Vocab:
        """The layout that ``TextTokenizer.train`` produces: meta pieces 0-3, then the specials."""
        specials = {tok: 4 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        return cls(text_size, specials, num_codebooks, codebook_size)

    @property
    def size(self) -> int:
        return self.text_size + self.num_codebooks * self.codebook_size

    def id(self, token: str) -> int:
        try:
            return self.specials[token]
        except KeyError:
            raise ValueError(f"unknown special token {token!r}; known: {sorted(self.specials)}") from None

    def codebook_range(self, k: int) -> range:
        if not 0 <= k < self.num_codebooks:
            raise ValueError(f"codebook {k} out of range: this vocabulary has {self.num_codebooks}")
        start = self.text_size + k * self.codebook_size
        return range(start, start + self.codebook_size)

    def span(self, modality: str) -> range:
        """The ids a head may emit for ``modality`` (used to constrain decoding)."""
        if modality == "text":
            return range(0, self.text_size)
        if modality == "audio":
            if not self.num_codebooks:
                raise ValueError("this vocabulary has no audio codebooks, so it cannot produce audio")
            return range(self.text_size, self.size)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def to_dict(self) -> dict:
        return {
            "text_size": self.text_size,
            "specials": dict(self.specials),
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            **{name: getattr(self, name) for name in _META_IDS},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        meta = {name: int(d[name]) for name in _META_IDS if name in d}  # absent in old configs: 0-3
        return cls(int(d["text_size"]), dict(d.get("specials", {})), int(d.get("num_codebooks", 0)),
                   int(d.get("codebook_size", 0)), **meta)
