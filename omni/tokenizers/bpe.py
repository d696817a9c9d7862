"""Byte-level BPE text tokenizer on Hugging Face ``tokenizers``, for imported language models.

Built from a GGUF file's ``tokenizer.ggml.*`` metadata (:meth:`BPETokenizer.from_gguf_metadata`) or
from a transformers folder's ``tokenizer.json`` (:meth:`BPETokenizer.from_transformers`). The model's
ids stay as they are and its control tokens (``<|im_start|>``, ...) stay special; omni's markers
(:data:`omni.vocab.SPECIAL_TOKENS`) are appended after the last id. A saved tokenizer is a folder
with ``tokenizer.json`` and ``bpe.json`` (the :class:`~omni.vocab.Vocab`, chat template, add_bos).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from omni.io import atomic_dir, atomic_write_bytes, read_json
from omni.tokenizers.base import BaseTextTokenizer
from omni.vocab import SPECIAL_TOKENS, Vocab

TOKENIZER_FILE = "tokenizer.json"
BPE_FILE = "bpe.json"
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (llama-vocab.cpp); ByteLevel's own
# regex is GPT-2's. "smollm" isolates every digit first, as SmolLM's tokenizer.json does. Others
# (llama-bpe, ...) need more than a split regex (llama.cpp's ignore_merges): add them with a test.
PRE_TOKENIZERS = {
    "gpt2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True),
                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "qwen2": lambda: [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)],
}


class BPETokenizer(BaseTextTokenizer):
    """Text <-> ids with a ``tokenizers.Tokenizer`` that holds the model's vocabulary.

    ``vocab``: ``text_size`` = the model's ids + omni's appended markers, ``specials`` = omni's
    markers, and the model's bos/eos/pad/unk ids (pad and bos fall back to eos, unk to pad).
    ``chat_template`` is the model's Jinja chat template (or ``None``); ``add_bos`` whether the
    model expects its bos id in front of a text."""

    marker_file = BPE_FILE
    family = "BPE"  # in error messages

    def __init__(self, tokenizer: Tokenizer, *, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, chat_template: str | None = None,
                 add_bos: bool = False, text_size: int | None = None, source: str = "<memory>"):
        """``text_size``: the model's embedding rows when it has more than the tokenizer has ids (a
        checkpoint padded for speed); the ids in between are never encoded and decode drops them.
        ``model_ids``: how many ids the model's own tokenizer has (omni's markers follow)."""
        self.source, self.chat_template, self.add_bos = source, chat_template, bool(add_bos)
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's stays as it was
        known = tokenizer.get_vocab(with_added_tokens=True)
        # a saved tokenizer.json holds the markers already: the model's ids are those before them
        markers = [known[t] for t in SPECIAL_TOKENS if t in known]
        self.model_ids = min(markers) if markers else max(known.values()) + 1
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self._num_ids = max(ids) + 1
        if len(set(ids)) != self._num_ids:
            raise ValueError(f"{source}: the vocabulary's ids are not 0..{self._num_ids - 1} "
                             "(duplicate tokens?)")
        text_size = max(text_size or 0, self._num_ids)
        specials = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        pad_id = eos_id if pad_id is None else pad_id
        self._vocab = Vocab(text_size, specials, pad_id=pad_id, unk_id=pad_id if unk_id is None else unk_id,
                            bos_id=eos_id if bos_id is None else bos_id, eos_id=eos_id)
        self._with_specials = tokenizer  # for text the caller rendered (a chat template)
        self._text = Tokenizer.from_str(tokenizer.to_str())
        self._text.encode_special_tokens = True  # user text: a typed "<|im_end|>" stays plain text

    @property
    def vocab(self) -> Vocab:
        return self._vocab

    @property
    def num_ids(self) -> int:
        """The tokenizer's ids, omni's markers included (``vocab.text_size`` may be larger)."""
        return self._num_ids

    def tokenizer_json(self) -> str:
        """The ``tokenizer.json`` text of the vocabulary, omni's markers as special added tokens."""
        return self._with_specials.to_str()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "<gguf>") -> BPETokenizer:
        """From a GGUF's metadata (key -> value, arrays as lists): ``tokenizer.ggml.model`` must be
        ``gpt2`` (byte-level BPE) with tokens, merges and a ``tokenizer.ggml.pre`` llama.cpp names."""
        def get(key, default=None):
            return meta.get(f"tokenizer.ggml.{key}", default)

        if get("model") != "gpt2":
            raise ValueError(f"{source}: tokenizer.ggml.model {get('model')!r} is not supported; "
                             "only 'gpt2' (byte-level BPE) is")
        pre = get("pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
        tokens, merges = list(get("tokens", [])), list(get("merges", []))
        if not tokens or not merges:
            raise ValueError(f"{source}: the tokenizer has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
        if get("eos_token_id") is None:
            raise ValueError(f"{source}: tokenizer.ggml.eos_token_id is missing")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs))
        tok.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]())
        tok.decoder = decoders.ByteLevel()
        types = list(get("token_type", []))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
        if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens holds duplicate tokens")
        return cls(tok, eos_id=get("eos_token_id"), bos_id=get("bos_token_id"),
                   pad_id=get("padding_token_id"), unk_id=get("unknown_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"), add_bos=get("add_bos_token", False),
                   source=source)

    @classmethod
    def from_transformers(cls, path: str | Path, text_size: int | None = None) -> BPETokenizer | None:
        """From a transformers folder's ``tokenizer.json`` (special tokens and chat template from
        ``tokenizer_config.json`` / ``chat_template.jinja``); ``None`` when it has no tokenizer.json."""
        path = Path(path)
        file = path / TOKENIZER_FILE
        if not file.is_file():
            return None
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}

        def token_id(key: str) -> int | None:
            token = cfg.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is None:
                return None
            if tok.token_to_id(token) is None:
                raise ValueError(f"{path / 'tokenizer_config.json'}: {key} {token!r} is not in {file.name}")
            return tok.token_to_id(token)

        if token_id("eos_token") is None:
            raise ValueError(f"{path}: tokenizer_config.json names no eos_token")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, eos_id=token_id("eos_token"), bos_id=token_id("bos_token"),
                   pad_id=token_id("pad_token"), unk_id=token_id("unk_token"), chat_template=template,
                   add_bos=cfg.get("add_bos_token", False), text_size=text_size, source=str(file))

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and the backend's ``marker_file`` (its settings, ``_settings``)
        into the folder ``path``, replaced as a whole."""
        with atomic_dir(path) as tmp:
            atomic_write_bytes(tmp / TOKENIZER_FILE, self._with_specials.to_str().encode())
            atomic_write_bytes(tmp / self.marker_file, json.dumps(self._settings(), indent=2).encode())

    def _settings(self) -> dict:
        return {"vocab": self.vocab.to_dict(), "chat_template": self.chat_template, "add_bos": self.add_bos}

    @classmethod
    def _read_settings(cls, path: Path) -> dict:
        """The settings ``save`` wrote into ``path``; a folder without both files is a ValueError."""
        if not (path / cls.marker_file).is_file() or not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"{path}: not a saved {cls.family} tokenizer ({TOKENIZER_FILE} and "
                             f"{cls.marker_file} expected)")
        return read_json(path / cls.marker_file)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        fields = cls._read_settings(path)
        try:
            vocab = Vocab.from_dict(fields["vocab"])
            tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as e:
            raise ValueError(f"{path}: corrupt BPE tokenizer ({e})") from None
        loaded = cls(tok, eos_id=vocab.eos_id, bos_id=vocab.bos_id, pad_id=vocab.pad_id, unk_id=vocab.unk_id,
                     chat_template=fields.get("chat_template"), add_bos=fields.get("add_bos", False),
                     text_size=vocab.text_size, source=str(path))
        if loaded.vocab != vocab:
            raise ValueError(f"{path}: {TOKENIZER_FILE} does not match the vocabulary in {BPE_FILE}")
        return loaded

    # -- text --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids; control tokens and markers typed in it stay text."""
        return self._encode(self._text, text)

    def encode_special(self, text: str) -> list[int]:
        """Text a chat template wrote -> ids, the model's control tokens and omni's markers in it
        parsed: never user text."""
        return self._encode(self._with_specials, text)

    @staticmethod
    def _encode(tokenizer, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"expected text as str, got {type(text).__name__}")
        return tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode text ids; the model's control tokens, omni's markers and ids outside the text range
        are dropped."""
        n = self._num_ids
        return self._text.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)

    def decode_continuation(self, new_ids: Iterable[int], context_ids: Iterable[int] = ()) -> str:
        """The text ``new_ids`` add after ``context_ids``. A character is byte pieces that may span
        several ids: one still incomplete at the end is held back (it comes out whole with the id
        that completes it), so decode behind the last context ids (a character is <= 4 bytes)."""
        ctx = [int(i) for i in context_ids][-4:]
        new = [int(i) for i in new_ids]
        base, full = self.decode(ctx).rstrip("\ufffd"), self.decode(ctx + new).rstrip("\ufffd")
        return full[len(base):] if full.startswith(base) else self.decode(new)
