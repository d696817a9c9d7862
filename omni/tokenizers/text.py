"""SentencePiece text tokenizer that reserves the unified vocabulary's special tokens.

A trained tokenizer is a directory with ``text.model`` (SentencePiece) and ``vocab.json``
(the :class:`~omni.vocab.Vocab` layout). Special tokens are control symbols: user text can
never encode to them, and ``decode`` drops them. :func:`load_text_tokenizer` also finds the BPE
backend (``bpe``, :mod:`omni.tokenizers.bpe`) by the file its saved folders hold.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from omni.data.manifest import SUFFIXES, Manifest, has_glob
from omni.io import atomic_dir, atomic_write_bytes
from omni.progress import ticking
from omni.tokenizers.base import TEXT_TOKENIZERS, BaseTextTokenizer
from omni.tokenizers.bpe import BPETokenizer
from omni.tokenizers.whisper import WhisperTokenizer
from omni.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Vocab

MODEL_FILE = "text.model"
VOCAB_FILE = "vocab.json"
# SentencePiece reports nothing while it trains: its progress line runs against this estimate
# (unigram, 4,096 pieces, 2 threads: 13.4 s for the 4.7M characters of the Wikipedia corpus on 2
# shared CPU cores)
SPM_SECONDS_PER_CHAR = 3e-6

log = logging.getLogger(__name__)


class TextTokenizer(BaseTextTokenizer):
    """Encode/decode text with a SentencePiece model; ``vocab`` gives the special-token ids."""

    marker_file = MODEL_FILE

    def __init__(self, model_proto: bytes, source: str = "<memory>"):
        import sentencepiece as spm

        self.source = source
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
            raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from None
        specials = {tok: self.sp.piece_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in specials.items() if i == self.sp.unk_id()]
        if missing or (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
                PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{source}: this SentencePiece model was not trained by omni (it lacks the "
                             f"special tokens {missing or ''} or the pad/unk/bos/eos ids 0-3); "
                             "train one with `omni tokenizer train text_spm`")
        self._vocab = Vocab(self.sp.get_piece_size(), specials)

    @property
    def vocab(self) -> Vocab:
        return self._vocab

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what ``text.model`` holds)."""
        return self._proto

    # -- files ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise ValueError(f"{model}: tokenizer model not found; "
                             "train one with `omni tokenizer train text_spm`")
        return cls(model.read_bytes(), source=str(model))

    def save(self, path: str | Path) -> None:
        """Write the model and its vocabulary into the folder ``path``, replaced as a whole: a crash
        never leaves a model without its vocab.json, which the trainer would take for a tokenizer."""
        with atomic_dir(path) as tmp:
            atomic_write_bytes(tmp / MODEL_FILE, self._proto)
            atomic_write_bytes(tmp / VOCAB_FILE, json.dumps(self.vocab.to_dict(), indent=2).encode())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, model_type: str = "unigram",
              character_coverage: float = 0.9995, max_sentences: int = 300000,
              seed: int = 0) -> TextTokenizer:
        """Train on an iterable of strings; byte fallback means any UTF-8 text encodes without <unk>.

        ``model_type="word"`` makes every whitespace-separated word of the corpus one piece (a closed
        vocabulary, as small speech recognisers use); ``vocab_size`` is then an upper bound."""
        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        spm.set_random_generator_seed(seed)
        out = io.BytesIO()
        sample = f" (a sample of {max_sentences:,})" if len(texts) > max_sentences else ""
        log.info("training a %s SentencePiece tokenizer of %d pieces on %s sentences%s...", model_type,
                 vocab_size, f"{len(texts):,}", sample)
        start = time.perf_counter()
        chars = sum(map(len, texts)) * min(1.0, max_sentences / len(texts))
        try:
            with ticking(f"training the {model_type} tokenizer ({vocab_size} pieces)",
                         estimate_s=max(1.0, chars * SPM_SECONDS_PER_CHAR)):
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
                    model_type=model_type, character_coverage=character_coverage,
                    input_sentence_size=max_sentences, shuffle_input_sentence=True,
                    seed_sentencepiece_size=200000,
                    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                    control_symbols=list(SPECIAL_TOKENS), byte_fallback=True, split_digits=True,
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    max_sentence_length=16384, num_threads=2, minloglevel=2,
                    hard_vocab_limit=model_type != "word",
                )
        except RuntimeError as e:
            limit = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
            if limit:  # the corpus is too small for that many pieces: say so, not SentencePiece's internals
                raise ValueError(f"vocab_size={vocab_size} is too large for a corpus of {len(texts):,} "
                                 f"sentences ({sum(map(len, texts)):,} characters): SentencePiece can make "
                                 f"at most {limit[1]} pieces from it; train on more text or lower vocab_size "
                                 f"(<= {limit[1]})") from None
            raise ValueError(f"SentencePiece training failed: {e}") from None
        log.info("trained the tokenizer in %.1f s", time.perf_counter() - start)
        return cls(out.getvalue())

    # -- text -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"expected text as str, got {type(text).__name__}")
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode text ids; ids outside the text range (audio codes) and specials are dropped."""
        n = self.vocab.text_size
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])

    def decode_continuation(self, new_ids: Iterable[int], context_ids: Iterable[int] = ()) -> str:
        """Decode ids that continue ``context_ids``. SentencePiece drops the space that starts a
        decoded text ("▁the" -> "the"), which is right for a whole text but wrong for a
        continuation, so decode with the last context id in front and cut its text off."""
        ctx = [int(i) for i in context_ids][-1:]
        new = [int(i) for i in new_ids]
        base, full = self.decode(ctx), self.decode(ctx + new)
        return full[len(base):] if full.startswith(base) else self.decode(new)

    def __len__(self) -> int:
        return self.vocab.text_size


TEXT_TOKENIZERS.register("sentencepiece", TextTokenizer)
TEXT_TOKENIZERS.register("bpe", BPETokenizer)
TEXT_TOKENIZERS.register("whisper", WhisperTokenizer)


def saved_kind(path: str | Path) -> str | None:
    """The backend whose ``marker_file`` the folder ``path`` holds; None when it holds no tokenizer."""
    saved = [k for k in TEXT_TOKENIZERS if (Path(path) / TEXT_TOKENIZERS.get(k).marker_file).is_file()]
    return saved[0] if saved else None


def load_text_tokenizer(path: str | Path, kind: str | None = None) -> BaseTextTokenizer:
    """The text tokenizer of backend ``kind`` (a :data:`TEXT_TOKENIZERS` name) saved at ``path``;
    ``None``: the backend whose files the folder holds (SentencePiece when none does)."""
    kind = kind or saved_kind(path) or "sentencepiece"
    return TEXT_TOKENIZERS.get(kind, "text tokenizer kind").load(path)


def corpus_texts(path, field: str = "text") -> Iterator[str]:
    """Texts from a manifest (:class:`omni.data.manifest.Manifest`, or a JSONL, Parquet or Arrow
    file or a glob of them: rows with a string ``field``) or a plain UTF-8 text file."""
    if isinstance(path, Manifest) or has_glob(str(path)) or Path(path).suffix in SUFFIXES:
        for f, n, row in Manifest.of(path).rows():
            if field not in row or not isinstance(row[field], str):
                raise ValueError(f"{f}: row {n + 1} has no string field {field!r}")
            yield row[field]
        return
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: corpus not found; build one with `omni data build text --out DIR`")
    try:
        yield from path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
