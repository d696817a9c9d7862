"""Whisper's text tokenizer: its byte-level BPE (``tokenizer.json``) with Whisper's special tokens.

``<|endoftext|>`` ends a transcript; ``<|startoftranscript|>``, a language token (``<|en|>``,
multilingual models only) and a task token (``<|transcribe|>`` / ``<|translate|>``) start it;
``<|notimestamps|>`` asks for text alone, else the timestamp tokens ``<|0.00|>`` .. ``<|30.00|>``
(0.02 s apart, right after ``<|notimestamps|>``) mark segments; ``<|startofprev|>`` opens previous
text. ``suppress_ids`` are never generated, ``begin_suppress_ids`` not as the first token (the
checkpoint's lists; omni's markers are suppressed too). A saved tokenizer is a folder with
``tokenizer.json`` and ``whisper.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from omni.tokenizers.bpe import TOKENIZER_FILE, BPETokenizer
from omni.vocab import Vocab

WHISPER_FILE = "whisper.json"
NUM_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
TASKS = ("transcribe", "translate")


class WhisperTokenizer(BPETokenizer):
    """Whisper's BPE with its special tokens; ``multilingual`` models take language and task tokens."""

    marker_file = WHISPER_FILE
    family = "Whisper"

    def __init__(self, tokenizer: Tokenizer, *, multilingual: bool, suppress: Sequence[int] = (),
                 begin_suppress: Sequence[int] | None = None, text_size: int | None = None,
                 source: str = "<memory>"):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        need = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>",
                "<|translate|>")
        missing = [t for t in need if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{source}: not a Whisper tokenizer (no {', '.join(missing)})")
        self.no_timestamps = tokenizer.token_to_id("<|notimestamps|>")
        if tokenizer.token_to_id("<|0.00|>") is None:  # English-only tokenizer.json files lack them
            tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", normalized=False)
                                  for i in range(NUM_TIMESTAMPS)])
        self.timestamp_begin = self.no_timestamps + 1
        if tokenizer.token_to_id("<|0.00|>") != self.timestamp_begin:
            raise ValueError(f"{source}: the timestamp tokens do not follow <|notimestamps|>")
        eot = tokenizer.token_to_id("<|endoftext|>")
        super().__init__(tokenizer, eos_id=eot, text_size=text_size, source=source)
        tid = tokenizer.token_to_id
        self.eot, self.sot, self.sot_prev = eot, tid("<|startoftranscript|>"), tid("<|startofprev|>")
        self.tasks = {t: tid(f"<|{t}|>") for t in TASKS}
        self.languages = {tokenizer.id_to_token(i)[2:-2]: i
                          for i in range(self.sot + 1, self.tasks["translate"])}
        self.multilingual = bool(multilingual)
        self.suppress = sorted({int(i) for i in suppress})
        self.begin_suppress = sorted({int(i) for i in (begin_suppress if begin_suppress is not None
                                                       else [*self.encode(" "), eot])})

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> WhisperTokenizer:
        """From a ``tokenizer.json`` (a transformers or CTranslate2 Whisper folder's)."""
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(tok, source=str(path), **kwargs)

    # -- Whisper's prompt and decoding rules ---------------------------------------------------

    def prompt(self, language: str | None = None, task: str = "transcribe",
               timestamps: bool = False) -> list[int]:
        """``<|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]`` (English-only models
        take no language or task token)."""
        ids = [self.sot]
        if self.multilingual:
            language = language or "en"
            if language not in self.languages:
                raise ValueError(f"unknown language {language!r}; this Whisper knows: "
                                 f"{', '.join(self.languages)}")
            if task not in self.tasks:
                raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
            ids += [self.languages[language], self.tasks[task]]
        elif language not in (None, "en") or task != "transcribe":
            raise ValueError("this Whisper is English-only: it transcribes English (language en, "
                             "task transcribe)")
        return ids if timestamps else ids + [self.no_timestamps]

    def suppress_ids(self) -> list[int]:
        """Ids never generated: the checkpoint's list and omni's markers."""
        return sorted({*self.suppress, *self.vocab.specials.values()})

    def begin_suppress_ids(self) -> list[int]:
        """Ids not generated as a transcript's first token (a blank, the end of text)."""
        return list(self.begin_suppress)

    # -- files -------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"vocab": self.vocab.to_dict(), "multilingual": self.multilingual, "suppress": self.suppress,
                "begin_suppress": self.begin_suppress}

    @classmethod
    def load(cls, path: str | Path) -> WhisperTokenizer:
        path = Path(path)
        fields = cls._read_settings(path)
        try:
            vocab = Vocab.from_dict(fields["vocab"])
            loaded = cls.from_file(path / TOKENIZER_FILE, multilingual=fields["multilingual"],
                                   suppress=fields["suppress"], begin_suppress=fields["begin_suppress"],
                                   text_size=vocab.text_size)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: corrupt Whisper tokenizer ({e!r})") from None
        if loaded.vocab != vocab:
            raise ValueError(f"{path}: {TOKENIZER_FILE} does not match the vocabulary in {WHISPER_FILE}")
        return loaded
