"""Training objectives other than the language model's own loss (``OmniModel.forward``).

``PairObjective`` wraps a model for ``data.task: contrastive``: its forward takes right-padded
texts and one media slot per row and returns CLIP's symmetric InfoNCE (``model.contrastive``,
omni/model/contrastive.py) or BLIP-2's weighted stage-1 losses (``model.blip2``,
omni/model/blip2.py). It is a module around the model, not a flag of the model's forward, so the
trainer hands it to DDP/FSDP as it is: every parameter the objective uses is the wrapped model's.
"""

from __future__ import annotations

import torch
from torch import nn

from omni.model.blip2 import blip2_loss
from omni.model.contrastive import embed_media, embed_text, info_nce
from omni.model.outputs import ModelOutput


class PairObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        if model.blip2 is None and model.contrastive is None:
            raise ValueError("this model has no contrastive head "
                             "(model.contrastive or model.blip2 in the recipe)")
        self.model = model

    def forward(self, input_ids: torch.Tensor, key_padding: torch.Tensor, media: list) -> ModelOutput:
        """``input_ids`` (B, T) right-padded texts, ``key_padding`` their mask, ``media`` one
        ``(row, slot)`` per row: the loss over the B pairs and the similarity logits."""
        model = self.model
        if model.blip2 is not None:
            return blip2_loss(model, input_ids, key_padding, media)
        (modality,) = {slot.modality for _, slot in media}
        slots = [slot for _, slot in sorted(media, key=lambda m: m[0])]
        loss, sims = info_nce(embed_media(model, modality, [s.data for s in slots]),
                              embed_text(model, input_ids, key_padding), model.contrastive.logit_scale)
        return ModelOutput(sims, loss, len(slots))
