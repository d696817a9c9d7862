"""BLIP-2's first stage (Li et al., 2023) on omni's parts: a Q-Former learns to read a frozen image
tower through three losses, each weighted in ``model.blip2`` (0 turns it off) and logged on its own
(``itc_loss``, ``itm_loss``, ``itg_loss`` in metrics.jsonl).

How BLIP-2 maps onto omni. BLIP-2's Q-Former is two transformers sharing their self-attention: a
query side (learned queries that cross-attend to the frozen image features) and a BERT text side.
Here the query side is the image connector (``connector.kind: qformer``,
:class:`~omni.model.connectors.QFormer`), whose M outputs at model width are "the query outputs";
the text side is the backbone, started from the language model (``train.init_from``). Queries meet
text by sitting in one sequence with it; as the backbone is causal, the order of that sequence
gives the attention pattern each loss needs, so no new attention masks or text decoder are needed:

``itc``  image-text contrastive: queries and text run apart (the text: the backbone at ``<eos>``
         of ``<bos> text <eos>``, as for CLIP in omni/model/contrastive.py); both are projected to
         ``embed_dim`` and normalised; an image-text similarity is the best of the M queries';
         symmetric InfoNCE with a learned temperature (:func:`~omni.model.contrastive.info_nce`,
         negatives gathered across processes).
``itm``  image-text matching: ``[<bos> text <eos>; queries]``, so every query sees the whole text
         (and the queries before it); a linear head on each query output gives matched / unmatched
         logits, averaged over the queries. A batch of B pairs gives B positives, B images with a
         hard negative text and B texts with a hard negative image, drawn with probability
         softmax(ITC similarity) over the process's batch, never the positive nor another row with
         the same caption (:func:`hard_negatives`); with ``itc: 0`` they are drawn uniformly.
``itg``  image-grounded generation: ``[queries; <bos> text <eos>]``, so each text token sees every
         query and the text before it (BLIP-2's multimodal causal mask, except that the queries see
         one another causally); next-token cross-entropy on the text. The queries are the only way
         the image reaches the text, so they must extract what the caption needs.

The training objective is the weighted sum. Stage 2 (``recipes/blip2/stage2_tiny.yaml``) keeps the
query side (tower and Q-Former) and drops this text side: the frozen language model is loaded over
it again and reads the M query outputs as tokens through the Q-Former's output projection
(``out_proj``, BLIP-2's fully-connected layer), which is omni's ordinary ``qformer`` caption path.
Differences from BLIP-2: the two sides share no weights, and the text side is a causal LM, not BERT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni.model.contrastive import info_nce, similarity, text_features
from omni.model.outputs import ModelOutput, default_positions
from omni.schema import from_dict
from omni.sequence import IGNORE

LOSSES = ("itc", "itm", "itg")


@dataclass
class Blip2Config:
    """Recipe section ``model.blip2``: each loss's weight (0 = off) and the ITC space."""

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    embed_dim: int = 128
    temperature: float = 0.07

    @classmethod
    def parse(cls, raw, key: str = "model.blip2") -> Blip2Config:
        cfg = from_dict(cls, raw, f"{key}.")
        for name in LOSSES:
            if getattr(cfg, name) < 0:
                raise ValueError(f"{key}.{name} must be >= 0 (0 turns the loss off), "
                                 f"got {getattr(cfg, name)}")
        if not any(getattr(cfg, name) for name in LOSSES):
            raise ValueError(f"{key}: itc, itm and itg are all 0, so nothing would train; "
                             "give at least one a weight > 0")
        if cfg.embed_dim < 1 or not 0 < cfg.temperature < 1:
            raise ValueError(f"{key} needs embed_dim >= 1 and temperature in (0, 1); got {cfg.embed_dim}, "
                             f"{cfg.temperature}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


class Blip2Head(nn.Module):
    """The stage-1 heads, only those whose loss is on: ITC projections and temperature, ITM classifier."""

    def __init__(self, dim: int, cfg: Blip2Config):
        super().__init__()
        self.weights = {name: getattr(cfg, name) for name in LOSSES}
        if cfg.itc:
            self.query_proj = nn.Linear(dim, cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(dim, cfg.embed_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
        if cfg.itm:
            self.itm_head = nn.Linear(dim, 2)


def hard_negatives(sims: torch.Tensor | None, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative text per image and one negative image per text, each drawn with probability
    softmax(sims) over the batch and never where ``same`` is True (the positive itself, or another
    row whose text is identical, which would be a positive too). A batch whose texts are all the
    same has no true negative; then any other row may be drawn.

    sims: (B, B) image i vs text j (ITC logits), or None for uniform draws; same: (B, B) bool,
    symmetric. Returns (text index for each image (B,), image index for each text (B,))."""
    B = same.shape[0]
    if B < 2:
        raise ValueError("the image-text matching loss (model.blip2.itm) needs at least 2 pairs "
                         "per batch and process; raise train.batch_size")
    eye = torch.eye(B, dtype=torch.bool, device=same.device)
    same = same | eye
    same = torch.where(same.all(1, keepdim=True), eye, same)
    logits = torch.zeros(B, B, device=same.device) if sims is None else sims.detach().float()
    neg_text = torch.multinomial(logits.masked_fill(same, -math.inf).softmax(1), 1).squeeze(1)
    neg_image = torch.multinomial(logits.T.masked_fill(same, -math.inf).softmax(1), 1).squeeze(1)
    return neg_text, neg_image


def blip2_loss(model, ids: torch.Tensor, mask: torch.Tensor, media: list):
    """The weighted stage-1 objective for B (image, text) pairs: ``ids``/``mask`` (B, T) right-padded
    ``<bos> text <eos>``, ``media`` one ``(row, slot)`` per row. Returns a ``ModelOutput`` whose
    ``parts`` holds each loss that is on."""
    head = model.blip2
    w = head.weights
    (modality,) = {slot.modality for _, slot in media}
    slots = [slot for _, slot in sorted(media, key=lambda m: m[0])]
    queries = torch.stack(model.encoders[modality]([s.data.to(model.device) for s in slots]))  # (B, M, D)
    B, M, _ = queries.shape
    parts, sims = {}, None
    if w["itc"]:
        q = F.normalize(head.query_proj(queries), dim=-1)  # (B, M, E)
        t = F.normalize(head.text_proj(text_features(model, ids, mask)), dim=-1)  # (B, E)
        parts["itc"], _ = info_nce(q, t, head.logit_scale)
        sims = head.logit_scale.exp() * similarity(q, t)  # (B, B) within this process's batch
    if w["itm"]:
        same = (ids[:, None] == ids[None]).all(-1)  # right-padded alike: the same text
        neg_text, neg_image = hard_negatives(sims, same)
        rows = torch.arange(B, device=ids.device)
        text_rows = torch.cat([rows, neg_text, rows])
        image = torch.cat([queries, queries, queries[neg_image]])  # (3B, M, D)
        keep = torch.cat([mask[text_rows], mask.new_ones(3 * B, M)], dim=1)
        x = torch.cat([model.embed(ids[text_rows]), image.to(model.embed.weight.dtype)], dim=1)
        h = model.backbone(x, default_positions(keep, keep), key_padding=keep)
        logits = head.itm_head(h[:, -M:]).float().mean(1)  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        parts["itm"] = F.cross_entropy(logits, labels)
    if w["itg"]:
        keep = torch.cat([mask.new_ones(B, M), mask], dim=1)
        x = torch.cat([queries.to(model.embed.weight.dtype), model.embed(ids)], dim=1)
        h = model.backbone(x, default_positions(keep, keep), key_padding=keep)
        logits = model.lm_head(h[:, M:-1]).float()  # text position t predicts token t + 1
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
        parts["itg"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=IGNORE)
    loss = sum(w[name] * value for name, value in parts.items())
    return ModelOutput(queries.new_zeros(0) if sims is None else sims, loss, B,
                       parts={name: value.detach() for name, value in parts.items()})
