"""An image tagger: a pretrained classifier's top labels, written as text after each image.

The only image-to-word knowledge that exists offline is a supervised classifier's: EfficientNet-Lite0's
ImageNet head (``omni import efficientnet-lite0`` keeps it, and the 1,000 class names). A language
model reading an image through a connector trained on a few thousand captions cannot name an object
it never saw captioned; it can copy a name it is given. So, as tag-then-caption models do (Tag2Text,
RAM + an LLM), the tagger's ``top_k`` labels of at least ``min_prob`` follow the image in the prompt
(``model.media.image.tagger``)::

    <|image|> ...features... <|/image|>Tags: African elephant, tusker, Indian elephant.
    Describe the image in one sentence.

With a ``memory`` (manifests of captioned images, e.g. the training split), it also retrieves: the
captions of the ``neighbours`` memory images nearest to this one (cosine of the classifier's pooled
features, centred on the memory's mean) follow as ``Similar: A pelican. A seagull. A toucan.``, as
retrieval-augmented captioners do (SmallCap). A memory image identical to the one tagged (cosine
above ``SAME``) is skipped, so a training image is never its own neighbour. A look-alike with the same
caption still may be, unless ``skip_own_caption``: then no memory image sharing the tagged image's
caption is a neighbour either, so a training image never finds its own caption among its hints, as an
unseen image never does (SmallCap's datastore likewise leaves out the image's own captions in
training). The memory's features are computed once, when the tagger is built from ``path``.
``retrieve_by`` picks them: ``classifier`` (EfficientNet's pooled features) or ``tower`` (the image
tower's whole-image feature, DINOv2's CLS token: copying the nearest stamp's caption scores test CIDEr-D
0.71 by DINOv2's against 0.58 by EfficientNet's, docs/benchmarks.md, ninth pass).

The text is part of the input, never a target. The tagger is frozen and saved with the model: a
checkpoint records its labels, the memory's captions and their shapes (``standalone``), so it loads
without the weights folder or the memory's images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.data.manifest import Manifest
from omni.io import load_tensors
from omni.media.image import Image, resize
from omni.progress import progress
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
    memory: list[str] | None = None  # manifests (files or globs) of captioned images, with ``path``
    memory_field: str = "caption"
    captions: list[str] | None = None  # the memory's captions and digest, as a checkpoint records them
    memory_digest: str | None = None
    neighbours: int = 3
    memory_prefix: str = "Similar: "
    skip_own_caption: bool = False  # a memory image's neighbours leave out every image of its caption
    retrieve_by: str = "classifier"  # or "tower": the image tower's CLS (or mean) feature finds neighbours

    def validate(self, key: str = "model.media.image.tagger") -> None:
        if (self.path is None) == (self.labels is None):
            raise ValueError(f"{key}: give path (an omni import efficientnet-lite0 folder) or labels, "
                             "not both or neither")
        if self.memory is not None and self.path is None:
            raise ValueError(f"{key}.memory needs path (the network whose features it retrieves by)")
        if self.top_k < 0 or self.neighbours < 0:
            raise ValueError(f"{key}.top_k and {key}.neighbours must be at least 0, got {self.top_k} "
                             f"and {self.neighbours}")
        if not self.top_k and not (self.neighbours and (self.memory or self.captions)):
            raise ValueError(f"{key}: top_k is 0 and there is no memory to retrieve from (or neighbours "
                             "is 0): the tagger would write nothing")
        if self.retrieve_by not in RETRIEVE_BY:
            raise ValueError(f"{key}.retrieve_by must be one of {', '.join(RETRIEVE_BY)}, got "
                             f"{self.retrieve_by!r}")
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"{key}.min_prob must be in [0, 1), got {self.min_prob}")


SAME = 0.9999  # a memory image at least this similar is the tagged image itself
RETRIEVE_BY = ("classifier", "tower")  # the features the memory is searched by


class ImageTagger(nn.Module):
    """EfficientNet-Lite0 with its classifier: an image -> its top labels, and the captions of its
    nearest memory images, as text (or None). ``retriever`` (an image -> a ``key_dim`` feature, e.g.
    :meth:`~omni.tokenizers.image.ImageTokenizer.image_feature`) is what the memory is searched by
    instead of the classifier's pooled features; the caller owns it (it is not saved here)."""

    def __init__(self, cfg: TaggerConfig, labels: list[str],
                 retriever: Callable[[object], torch.Tensor] | None = None, key_dim: int = HEAD):
        super().__init__()
        self.cfg, self.labels = cfg, list(labels)
        self.captions, self.memory_digest = list(cfg.captions or []), cfg.memory_digest
        self.retriever = retriever
        self.net = EfficientNetLite0()
        self.classifier = nn.Linear(HEAD, len(self.labels))
        mean, std = IMAGENET_NORM
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        if self.captions:  # unit rows of centred features, and their centre: saved with the model
            self.register_buffer("memory", torch.zeros(len(self.captions), key_dim))
            self.register_buffer("center", torch.zeros(key_dim))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def build(cls, cfg: TaggerConfig, retriever: Callable[[object], torch.Tensor] | None = None,
              key_dim: int = HEAD) -> ImageTagger:
        """From ``cfg.path`` (weights loaded) or from ``cfg.labels`` (weights come with a checkpoint).
        ``retrieve_by: tower`` takes the tower's ``retriever`` and its feature width ``key_dim``."""
        cfg.validate()
        if cfg.retrieve_by == "tower" and retriever is None:
            raise ValueError("model.media.image.tagger.retrieve_by: tower needs an image tower to retrieve "
                             "by; use retrieve_by: classifier here")
        if cfg.retrieve_by == "classifier":
            retriever, key_dim = None, HEAD
        if cfg.labels is not None:
            return cls(cfg, cfg.labels, retriever, key_dim)
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
        tagger = cls(cfg, labels, retriever, key_dim)
        tensors = load_tensors(path / "model.safetensors")
        head = {k.removeprefix("_fc."): v for k, v in tensors.items() if k.startswith("_fc.")}
        try:
            tagger.net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("_fc.")})
            tagger.classifier.load_state_dict(head)
        except RuntimeError as e:
            raise ValueError(f"{path}: not EfficientNet-Lite0 weights with a {len(labels)}-class "
                             f"classifier ({str(e)[:300]})") from None
        if cfg.memory:
            tagger.remember(*read_memory(cfg.memory, cfg.memory_field))
        return tagger

    @torch.no_grad()
    def remember(self, images: list[Path], captions: list[str]) -> None:
        """Make ``images`` (files) with their ``captions`` the memory that neighbours come from.
        ``memory_digest`` hashes the files' bytes and the captions: a prepared-sample cache is keyed
        by it, not by the features (whose last bits vary with the thread count)."""
        feats, h = [], hashlib.sha256()
        for f, caption in progress(list(zip(images, captions)), desc="tagger memory", unit="image"):
            try:
                h.update(Path(f).read_bytes() + caption.encode() + b"\0")
                feats.append(self.key(Image(f)).float())
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: a tagger memory image that cannot be read ({e})") from None
        feats = torch.stack(feats)
        self.captions, self.memory_digest = list(captions), h.hexdigest()
        self.register_buffer("center", feats.mean(0))
        self.register_buffer("memory", F.normalize(feats - self.center, dim=-1))

    def standalone(self) -> dict:
        """The section as a checkpoint records it: labels and captions instead of the folders."""
        out = {"labels": self.labels, "top_k": self.cfg.top_k, "min_prob": self.cfg.min_prob,
               "prefix": self.cfg.prefix, "suffix": self.cfg.suffix}
        if self.captions:
            out.update(captions=self.captions, memory_digest=self.memory_digest,
                       neighbours=self.cfg.neighbours, memory_prefix=self.cfg.memory_prefix,
                       skip_own_caption=self.cfg.skip_own_caption, retrieve_by=self.cfg.retrieve_by)
        return out

    def keyed_state(self) -> dict[str, torch.Tensor]:
        """The weights a prepared-sample cache is keyed by: all but the memory's features, which
        ``memory_digest`` (in :meth:`standalone`) stands for."""
        return {k: v for k, v in self.state_dict().items() if k not in ("memory", "center")}

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch norm keeps its running statistics

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, 3, H, W)`` -> the pooled features the classifier reads ``(B, 1280)``."""
        x = resize(pixels, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)).to(self.mean.device).float() / 255
        x = ((x - self.mean) / self.std).to(self.classifier.weight.dtype)  # a model cast to bf16 too
        return self.net(x).mean((2, 3))

    def feature(self, image) -> torch.Tensor:
        """An :class:`~omni.media.image.Image` or uint8 pixels ``(3, H, W)`` -> its pooled features."""
        return self.features((image.pixels if isinstance(image, Image) else image)[None])[0]

    def key(self, image) -> torch.Tensor:
        """An image -> the feature the memory is searched by (``retrieve_by``)."""
        return self.feature(image) if self.retriever is None else self.retriever(image)

    def tags(self, image, feature: torch.Tensor | None = None) -> list[str]:
        """An image -> up to ``top_k`` labels of probability at least ``min_prob``, most likely
        first (``feature``: the image's, when already computed)."""
        if not self.cfg.top_k:
            return []
        feature = self.feature(image) if feature is None else feature
        p = F.softmax(self.classifier(feature).float(), dim=-1)
        top = p.topk(min(self.cfg.top_k, len(self.labels)))
        return [self.labels[i] for v, i in zip(top.values.tolist(), top.indices.tolist())
                if v >= self.cfg.min_prob]

    def similar(self, image, key: torch.Tensor | None = None) -> list[str]:
        """The distinct captions of the ``neighbours`` memory images nearest to an image, nearest
        first (none without a memory); the image itself, when the memory holds it, is skipped (with
        ``skip_own_caption``, so is every memory image of its caption). ``key``: the image's
        :meth:`key`, when already computed."""
        if not self.captions or not self.cfg.neighbours:
            return []
        key = self.key(image) if key is None else key
        sims = self.memory.float() @ F.normalize(key.float() - self.center.float(), dim=-1)
        out: list[str] = []
        own = (sims >= SAME).nonzero().flatten().tolist() if self.cfg.skip_own_caption else []
        skip = {self.captions[i] for i in own}
        for i in sims.argsort(descending=True).tolist():
            if sims[i] < SAME and self.captions[i] not in out and self.captions[i] not in skip:
                out.append(self.captions[i])
                if len(out) == self.cfg.neighbours:
                    break
        return out

    def text(self, image) -> str | None:
        """The text that follows the image: the tags in ``prefix``/``suffix`` and the neighbours'
        captions after ``memory_prefix``, or None when there is neither."""
        feature = self.feature(image) if self.cfg.top_k or self.retriever is None else None
        tags = self.tags(image, feature)
        similar = self.similar(image, feature if self.retriever is None else None)
        text = f"{self.cfg.prefix}{', '.join(tags)}{self.cfg.suffix}" if tags else ""
        if similar:
            text += f"{self.cfg.memory_prefix}{' '.join(similar)}\n"
        return text or None


def read_memory(manifests: list[str], field: str = "caption") -> tuple[list[Path], list[str]]:
    """The image files and captions of ``manifests`` (rows with ``image``, relative to the manifest's
    folder, and ``field``), in order."""
    images, captions = [], []
    for m in manifests:
        for f, k, row in Manifest.of(m).rows():
            image, caption = row.get("image"), row.get(field)
            if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{f}: row {k + 1} has no 'image' path and {field!r} text for the "
                                 "tagger's memory")
            path = Path(image)
            images.append(path if path.is_absolute() else f.parent / path)
            captions.append(caption.strip())
    if not images:
        raise ValueError(f"{', '.join(manifests)}: the tagger's memory has no rows")
    return images, captions
