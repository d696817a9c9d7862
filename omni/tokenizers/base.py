"""One contract per tokenizer family, and one registry of backends per family.

audiocraft's ``CompressionModel`` is the pattern: one abstract interface, several backends. Each
family states its rates and sizes as properties, and the methods the rest of omni calls:

========================  ============================  ==================================================
family                    contract                      rates and sizes
========================  ============================  ==================================================
text                      :class:`BaseTextTokenizer`    ``vocab`` (:class:`~omni.vocab.Vocab`), ``len()``
image towers              :class:`BaseImageTower`       ``patch_size``, ``image_size``, ``out_dim``,
                                                        ``tokens_per_image``
video                     :class:`BaseVideoTokenizer`   ``fps``, ``num_frames``, ``out_dim``
audio in (log-mel + enc)  :class:`BaseAudioEncoder`     ``sample_rate``, ``n_mels``, ``frame_rate``,
                                                        ``out_dim``
audio out (codecs)        :class:`BaseCodec`            ``sample_rate``, ``frame_rate``, ``hop_length``,
                                                        ``num_codebooks``, ``cardinality``, ``channels``
========================  ============================  ==================================================

A new backend is one class implementing its family's contract plus one registry line in the
family's module (``omni/tokenizers/{text,image,audio}.py``), e.g.::

    IMAGE_TOWERS.register("efficientnet", EfficientNetImageTokenizer)

after which recipes name it (``image_tokenizer.kind: efficientnet``) and the family's builder
(``build_image_tokenizer``, ``audio_encoder``, ``load_codec``, ``load_text_tokenizer``) finds it.
The video family has one backend and no registry.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from omni.media.video import Video
    from omni.vocab import Vocab


class Registry:
    """Backend name -> class for one family; ``register(name, cls)`` is a new backend's one line.

    One class may stand under several names (the transformers towers ``siglip``, ``clip`` and
    ``vit`` are one class that reads its kind from the config)."""

    def __init__(self, family: str, contract: type):
        self.family, self.contract = family, contract
        self._classes: dict[str, type] = {}

    def register(self, name: str, cls: type) -> type:
        """Add ``cls`` under ``name``; returns ``cls``. Names are unique per family."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.family} backend needs a non-empty name, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, self.contract)):
            raise TypeError(f"{self.family} backend {name!r}: {cls!r} does not implement "
                            f"{self.contract.__name__}")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.family} {name!r} is already registered "
                             f"({self._classes[name].__qualname__})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> type:
        """Remove ``name`` (tests register toy backends for a while); returns its class."""
        cls = self.get(name)
        del self._classes[name]
        return cls

    def get(self, name: str, key: str | None = None) -> type:
        """The class registered as ``name``; an unknown name is a ``ValueError`` listing the
        registered ones, worded with ``key`` (the config key that named it) when given."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a bad config
            names = ", ".join(self._classes) or "(none registered)"
            raise ValueError(f"{key or self.family + ' kind'} must be one of {names}; got {name!r}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._classes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}: {', '.join(self._classes)})"


# ---------------------------------------------------------------------------------------------
# text


class BaseTextTokenizer(abc.ABC):
    """Text <-> ids in the unified vocabulary (SentencePiece, or a Hugging Face BPE for imported models).

    Special tokens (:data:`omni.vocab.SPECIAL_TOKENS`) are the vocabulary's: user text never
    encodes to them and ``decode`` drops them, as it drops ids outside the text range."""

    chat_template: str | None = None  # a Jinja chat template (an imported checkpoint's); None: omni's own
    add_bos: bool = True  # a plain document starts with vocab.bos_id
    marker_file: str = ""  # the file ``save`` writes that tells this backend's folders apart

    @property
    @abc.abstractmethod
    def vocab(self) -> Vocab:
        """The id layout: text size and the special tokens' ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """``text`` -> text ids (no BOS/EOS; the sequence renderer adds those)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; specials and ids outside the text range are dropped."""

    @abc.abstractmethod
    def decode_continuation(self, new_ids: Iterable[int], context_ids: Iterable[int] = ()) -> str:
        """The text ``new_ids`` add after ``context_ids`` (a leading space kept where it belongs)."""

    def encode_special(self, text: str) -> list[int]:
        """Text a chat template wrote -> ids, its special tokens parsed (never call it on user
        text). Here: the vocabulary's ``specials``; a backend with special tokens of its own
        (an imported checkpoint's ``<|im_start|>``) parses those too."""
        specials = self.vocab.specials
        if not specials:
            return self.encode(text)
        names = sorted(specials, key=len, reverse=True)
        ids: list[int] = []
        for i, part in enumerate(re.split("(" + "|".join(map(re.escape, names)) + ")", text)):
            if i % 2:
                ids.append(specials[part])
            elif part:
                ids += self.encode(part)
        return ids

    @abc.abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the tokenizer's files into the directory ``path``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | Path) -> BaseTextTokenizer:
        """The tokenizer :meth:`save` wrote to ``path``."""

    def __len__(self) -> int:
        return self.vocab.text_size


# ---------------------------------------------------------------------------------------------
# image towers


class BaseImageTower(nn.Module, abc.ABC):
    """Pixels -> one feature per (merged) patch (patchify, the transformers towers with DINOv2's,
    EfficientNet-Lite0's feature-map cells)::

        pixels, grid = tower.preprocess(image)   # Image | uint8 (3, H, W) | (N, 3, H, W) -> float, (t, h, w)
        pixels, grid = tower.resize(image)       # what a cache holds: uint8 pixels (normalised in forward)
        features = tower(pixels_batch)           # (B, 3, H', W') -> (B, h * w, out_dim)

    ``build(cfg)`` makes one from an :class:`~omni.tokenizers.image.ImageTokenizerConfig`."""

    kind: str = ""
    has_positions: bool = False  # whether the features already encode where each patch is

    @property
    @abc.abstractmethod
    def patch_size(self) -> int:
        """Pixels per patch side (before any patch merge)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> int | None:
        """The side every image is resized to; ``None`` when the resolution follows the image."""

    @property
    @abc.abstractmethod
    def out_dim(self) -> int:
        """Width of one output feature."""

    @property
    @abc.abstractmethod
    def tokens_per_image(self) -> int | None:
        """Features per image at ``image_size``; ``None`` when the resolution follows the image."""

    @abc.abstractmethod
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(H', W')`` an image of ``height x width`` is resized to."""

    @abc.abstractmethod
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` features for pixels of ``height x width`` (already at the target size)."""

    @abc.abstractmethod
    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Image | uint8 ``(3, H, W)`` | uint8 ``(N, 3, H, W)`` -> float pixels at the target size,
        and the grid ``(1 or N, h, w)``."""

    def resize(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """What a prepared-sample cache holds for ``image``: pixels that :meth:`forward` takes and
        the grid. Default :meth:`preprocess`'s (float); a tower that normalises in ``forward``
        gives uint8 pixels at the target size (4x fewer bytes to cache, copy and transfer)."""
        return self.preprocess(image)

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`resize`'s pixels (on any device) -> :meth:`preprocess`'s, cast to ``dtype`` if
        given. Default: they already are."""
        return pixels if dtype is None else pixels.to(dtype)

    @abc.abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H', W')`` -> ``(B, h * w, out_dim)``, row-major over the grid: the pixels of
        :meth:`preprocess` or of :meth:`resize`."""

    @classmethod
    @abc.abstractmethod
    def build(cls, cfg) -> BaseImageTower:
        """The tower an ``ImageTokenizerConfig`` (validated) describes."""


# ---------------------------------------------------------------------------------------------
# video


class BaseVideoTokenizer(nn.Module, abc.ABC):
    """Sampled frames -> features through an image tower, plus temporal handling."""

    @property
    @abc.abstractmethod
    def num_frames(self) -> int:
        """Frames sampled per video (when ``fps`` is ``None``)."""

    @property
    @abc.abstractmethod
    def fps(self) -> float | None:
        """Frames sampled per second of video, or ``None`` to sample ``num_frames`` evenly."""

    @property
    @abc.abstractmethod
    def out_dim(self) -> int:
        """Width of one output feature."""

    @abc.abstractmethod
    def load(self, path, start: float | None = None, end: float | None = None,
             backend: str = "auto") -> Video:
        """The video at ``path`` with this tokenizer's frame sampling."""

    @abc.abstractmethod
    def preprocess(self, frames: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames ``(N, 3, H, W)`` -> the tower's input and the token grid ``(t, h, w)``."""

    @abc.abstractmethod
    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Tokens a video of ``num_frames`` frames of ``height x width`` adds to the sequence."""

    @abc.abstractmethod
    def encode_pixels(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed videos -> features ``(T_i, out_dim)`` per video."""


# ---------------------------------------------------------------------------------------------
# audio in


MEL_SAMPLE_RATE = 16000  # the waveform rate the log-mel front end (and so every audio encoder) takes
MEL_HOP_LENGTH = 160  # samples per mel frame: 100 mel frames per second


class BaseAudioEncoder(nn.Module, abc.ABC):
    """Audio in: log-mel features ``(B, n_mels, F)`` -> encoder features ``(B, N, out_dim)``.

    The log-mel front end (:class:`~omni.tokenizers.audio.LogMel`) runs at ``sample_rate``;
    ``frame_rate`` is the encoder's output features per second. ``build(**options)`` makes one
    from a recipe's ``encoder:`` section (less ``kind``); a backend ignores the options that are
    not its own."""

    frozen: bool = False  # a frozen tower's features can be computed once per clip (``precompute``)

    @property
    def sample_rate(self) -> int:
        """Waveform samples per second the log-mel front end takes (the same for every encoder)."""
        return MEL_SAMPLE_RATE

    @property
    @abc.abstractmethod
    def n_mels(self) -> int:
        """Mel bins of the input."""

    @property
    @abc.abstractmethod
    def frame_rate(self) -> float:
        """Output features per second of audio."""

    @property
    @abc.abstractmethod
    def out_dim(self) -> int:
        """Width of one output feature."""

    @abc.abstractmethod
    def num_tokens(self, num_frames: int) -> int:
        """Output features for ``num_frames`` mel frames (what ``forward`` returns for them)."""

    @abc.abstractmethod
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel: (B, n_mels, F)`` -> ``(B, num_tokens(F), out_dim)``."""

    @classmethod
    @abc.abstractmethod
    def build(cls, **options) -> BaseAudioEncoder:
        """The encoder a recipe's ``encoder:`` options describe."""


# ---------------------------------------------------------------------------------------------
# audio out


class BaseCodec(nn.Module, abc.ABC):
    """Audio out: waveform <-> ``num_codebooks`` streams of ids in ``[0, cardinality)`` at
    ``frame_rate`` code columns per second (the encodec package's model, own-trained or
    pretrained, today). ``save`` writes a directory whose ``config.json`` names the backend
    (``kind``), so :func:`omni.tokenizers.audio.load_codec` finds it in :data:`CODECS`."""

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int:
        """Waveform samples per second."""

    @property
    def channels(self) -> int:
        """Audio channels of the waveform (1: mono)."""
        return 1

    @property
    @abc.abstractmethod
    def hop_length(self) -> int:
        """Samples per code column."""

    @property
    def frame_rate(self) -> float:
        """Code columns per second."""
        return self.sample_rate / self.hop_length

    @property
    @abc.abstractmethod
    def num_codebooks(self) -> int:
        """Codebooks ``K`` that ``encode`` emits."""

    @property
    @abc.abstractmethod
    def cardinality(self) -> int:
        """Ids per codebook."""

    def num_frames(self, num_samples: int) -> int:
        """Code columns ``T'`` for ``num_samples`` samples."""
        return math.ceil(num_samples / self.hop_length)

    @abc.abstractmethod
    def encode(self, wave) -> torch.Tensor:
        """Waveform ``(T,)`` / ``(B, T)`` (or an ``omni.Audio``) -> codes ``(K, T')`` / ``(B, K, T')``."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Codes ``(K, T')`` / ``(B, K, T')`` -> waveform ``(T,)`` / ``(B, T)``, cut to ``length``."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the codec into ``directory``, with a ``config.json`` that holds its ``kind``."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path, num_codebooks: int | None = None) -> BaseCodec:
        """The codec :meth:`save` wrote; ``num_codebooks`` overrides how many ``encode`` emits."""


TEXT_TOKENIZERS = Registry("text tokenizer", BaseTextTokenizer)
IMAGE_TOWERS = Registry("image tower", BaseImageTower)
AUDIO_ENCODERS = Registry("audio encoder", BaseAudioEncoder)
CODECS = Registry("codec", BaseCodec)
