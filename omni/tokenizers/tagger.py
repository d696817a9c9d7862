"""An image tagger: a pretrained classifier's top labels, written as text after each image.

The only image-to-word knowledge that exists offline is a supervised classifier's: EfficientNet-Lite0's
ImageNet head (``omni import efficientnet-lite0`` keeps it, and the 1,000 class names). A language
model reading an image through a connector trained on a few thousand captions cannot name an object
it never saw captioned; it can copy a name it is given. So, as tag-then-caption models do (Tag2Text,
RAM + an LLM), the tagger's ``top_k`` labels of at least ``min_prob`` follow the image in the prompt
(``model.media.image.tagger``)::

    <|image|> ...features... <|/image|>Tags: African elephant, tusker, Indian elephant.
    Describe the image in one sentence.

The text is part of the input, never a target. The tagger is frozen and saved with the model: a
checkpoint records its labels and shape (``standalone``), so it loads without the weights folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.io import load_tensors
from omni.media.image import Image, resize
from omni.tokenizers.efficientnet import HEAD, MODEL_TYPE, EfficientNetLite0
from omni.tokenizers.image import DEFAULT_IMAGE_SIZE, IMAGENET_NORM


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names in class order (torchvision's list: one name per class,
    duplicates told apart, e.g. "crane" and "crane bird")."""
    return (Path(__file__).with_name("imagenet_labels.txt")).read_text(encoding="utf-8").splitlines()


@dataclass
class TaggerConfig:
    """``model.media.image.tagger``: ``path`` an ``omni import efficientnet-lite0`` folder (with its
    classifier), or ``labels`` (what a checkpoint records; the weights are then in the checkpoint)."""

    path: str | None = None
    labels: list[str] | None = None
    top_k: int = 3
    min_prob: float = 0.05
    prefix: str = "Tags: "
    suffix: str = ".\n"

    def validate(self, key: str = "model.media.image.tagger") -> None:
        if (self.path is None) == (self.labels is None):
            raise ValueError(f"{key}: give path (an omni import efficientnet-lite0 folder) or labels, "
                             "not both or neither")
        if self.top_k < 1:
            raise ValueError(f"{key}.top_k must be at least 1, got {self.top_k}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"{key}.min_prob must be in [0, 1), got {self.min_prob}")


class ImageTagger(nn.Module):
    """EfficientNet-Lite0 with its classifier: an image -> its top labels as text (or None)."""

    def __init__(self, cfg: TaggerConfig, labels: list[str]):
        super().__init__()
        self.cfg, self.labels = cfg, list(labels)
        self.net = EfficientNetLite0()
        self.classifier = nn.Linear(HEAD, len(self.labels))
        mean, std = IMAGENET_NORM
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def build(cls, cfg: TaggerConfig) -> ImageTagger:
        """From ``cfg.path`` (weights loaded) or from ``cfg.labels`` (weights come with a checkpoint)."""
        cfg.validate()
        if cfg.labels is not None:
            return cls(cfg, cfg.labels)
        path = Path(cfg.path)
        config = path / "config.json"
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{config}: cannot read the tagger's config ({e})") from None
        labels = raw.get("labels")
        if raw.get("model_type") != MODEL_TYPE or not labels:
            raise ValueError(f"{path}: not an EfficientNet-Lite0 folder with its classifier (model_type "
                             f"{raw.get('model_type')!r}, labels: {bool(labels)}); re-run omni import "
                             "efficientnet-lite0 --out DIR")
        tagger = cls(cfg, labels)
        tensors = load_tensors(path / "model.safetensors")
        head = {k.removeprefix("_fc."): v for k, v in tensors.items() if k.startswith("_fc.")}
        try:
            tagger.net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("_fc.")})
            tagger.classifier.load_state_dict(head)
        except RuntimeError as e:
            raise ValueError(f"{path}: not EfficientNet-Lite0 weights with a {len(labels)}-class "
                             f"classifier ({str(e)[:300]})") from None
        return tagger

    def standalone(self) -> dict:
        """The section as a checkpoint records it: labels instead of the folder."""
        return {"labels": self.labels, "top_k": self.cfg.top_k, "min_prob": self.cfg.min_prob,
                "prefix": self.cfg.prefix, "suffix": self.cfg.suffix}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch norm keeps its running statistics

    @torch.no_grad()
    def probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> class probabilities ``(B, classes)``."""
        x = resize(pixels, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)).to(self.mean.device).float() / 255
        x = ((x - self.mean) / self.std).to(self.classifier.weight.dtype)  # a model cast to bf16 too
        return F.softmax(self.classifier(self.net(x).mean((2, 3))).float(), dim=-1)

    def tags(self, image) -> list[str]:
        """An :class:`~omni.media.image.Image` or uint8 pixels ``(3, H, W)`` -> up to ``top_k``
        labels of probability at least ``min_prob``, most likely first."""
        pixels = image.pixels if isinstance(image, Image) else image
        p = self.probs(pixels[None])[0]
        top = p.topk(min(self.cfg.top_k, len(self.labels)))
        return [self.labels[i] for v, i in zip(top.values.tolist(), top.indices.tolist())
                if v >= self.cfg.min_prob]

    def text(self, image) -> str | None:
        """The text that follows the image: the tags in ``prefix``/``suffix``, or None when no label
        is likely enough."""
        tags = self.tags(image)
        return f"{self.cfg.prefix}{', '.join(tags)}{self.cfg.suffix}" if tags else None
