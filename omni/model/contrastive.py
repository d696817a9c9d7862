"""Contrastive alignment (CLIP / ALIGN, BLIP-2's image-text contrastive loss) on omni's own parts.

The text tower is the backbone itself, read at the last real token of ``<bos> text <eos>`` (CLIP's
text transformer is causal too); the media tower is the model's encoder for that modality, its
tokens averaged. Linear projections map both into a shared space where a learned temperature
scales cosine similarities, and the loss is the symmetric InfoNCE over the batch (each media item
against every text and each text against every media item). Under DDP the embeddings of every
process are gathered first (with gradients), so the negatives are the global batch.

Enabled by ``model.contrastive: {embed_dim, temperature}`` in a recipe with ``data.task:
contrastive``. Zero-shot retrieval and classification live in ``omni.eval``. BLIP-2's image-text
contrastive loss (``model.blip2``, omni/model/blip2.py) uses the same pieces with M query
embeddings per image, ``(B, M, E)``: an image-text similarity is the best of its queries'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni.model.outputs import default_positions
from omni.schema import from_dict


@dataclass
class ContrastiveConfig:
    """Recipe section ``model.contrastive``: the shared embedding width and the initial temperature."""

    embed_dim: int = 128
    temperature: float = 0.07

    @classmethod
    def parse(cls, raw, key: str = "model.contrastive") -> ContrastiveConfig:
        cfg = from_dict(cls, raw, f"{key}.")
        if cfg.embed_dim < 1 or not 0 < cfg.temperature < 1:
            raise ValueError(f"{key} needs embed_dim >= 1 and temperature in (0, 1); got "
                             f"{cfg.embed_dim}, {cfg.temperature}")
        return cfg


class ContrastiveHead(nn.Module):
    def __init__(self, dim: int, modalities: list[str], embed_dim: int = 128, temperature: float = 0.07):
        super().__init__()
        ContrastiveConfig.parse({"embed_dim": embed_dim, "temperature": temperature})
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.media_proj = nn.ModuleDict({m: nn.Linear(dim, embed_dim, bias=False) for m in modalities})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))


def _head(model):
    """The model's contrastive projections: its CLIP head, or its BLIP-2 head's ITC part."""
    if model.contrastive is not None:
        return model.contrastive
    blip2 = getattr(model, "blip2", None)
    if blip2 is not None and blip2.weights["itc"]:
        return blip2
    raise ValueError("this model has no contrastive embeddings "
                     "(model.contrastive, or model.blip2 with itc > 0)")


def text_features(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded ids and their mask -> (B, D): the backbone's output at each last real token."""
    h = model.backbone(model.embed(ids), default_positions(ids), key_padding=mask)
    return h[torch.arange(len(ids)), mask.long().sum(-1) - 1]


def embed_text(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded ids and their mask -> (B, E) unit-length text embeddings."""
    return F.normalize(_head(model).text_proj(text_features(model, ids, mask)), dim=-1)


def embed_media(model, modality: str, datas: list[torch.Tensor]) -> torch.Tensor:
    """Encoder inputs of one modality -> (B, E) unit-length embeddings (the encoder's tokens
    averaged), or (B, M, E) for a BLIP-2 model (one per query)."""
    feats = model.encoders[modality]([d.to(model.device) for d in datas])
    head = _head(model)
    if head is not model.contrastive:
        return F.normalize(head.query_proj(torch.stack(feats)), dim=-1)
    pooled = torch.stack([f.mean(0) for f in feats])
    return F.normalize(model.contrastive.media_proj[modality](pooled), dim=-1)


def similarity(media: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """media (N, E) or (N, M, E), text (K, E) -> (N, K) cosine similarities; with M query
    embeddings per item, the best query's (BLIP-2)."""
    if media.dim() == 2:
        return media @ text.T
    return torch.einsum("nme,ke->nkm", media, text).amax(-1)


def _gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows (gradients flow back to each process's own), and where ours start."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x)
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def info_nce(media: torch.Tensor, text: torch.Tensor,
             logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of local rows against the global batch; returns (loss, local logits).
    media: (B, E), or (B, M, E) with the similarity the best of the M (see :func:`similarity`)."""
    all_media, offset = _gather(media)
    all_text, _ = _gather(text)
    scale = logit_scale.clamp(max=math.log(100)).exp()
    labels = torch.arange(offset, offset + len(media), device=media.device)
    m2t = scale * similarity(media, all_text)
    t2m = scale * similarity(all_media, text).T
    return (F.cross_entropy(m2t.float(), labels) + F.cross_entropy(t2m.float(), labels)) / 2, m2t
