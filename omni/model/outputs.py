"""What the model's forward returns, and the default positions of a batch of ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni.model.backbone import KVCache


@dataclass
class ModelOutput:
    # (B, T, V); (N, V) at the N positions ``kept`` marks when targets were given; None in training
    # (and with loss_chunk set), where the head is fused with its loss (LMHead.loss)
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # next-token cross-entropy per loss-carrying token
    num_tokens: int = 0  # tokens that carried loss
    aux_loss: torch.Tensor | None = None  # media encoders' weighted auxiliary losses (CTC), when training
    parts: dict | None = (
        None  # name -> unweighted loss (detached) of a multi-loss objective (BLIP-2), for the log
    )
    kept: torch.Tensor | None = None  # (B, T) bool: the positions with a target, whose logits these are
    # the loss's denominator: its targets' count, or their summed weights (``loss_weights``); a
    # trainer on several processes scales each one's loss by it to get the global batch's mean
    loss_mass: torch.Tensor | None = None
    aux_mass: torch.Tensor | None = None  # the same for ``aux_loss``: the labelled clips it is a mean over

    @property
    def objective(self) -> torch.Tensor:
        """What training minimises: the token loss plus any auxiliary loss."""
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


def default_positions(
    input_ids: torch.Tensor, key_padding: torch.Tensor | None = None, cache: KVCache | None = None
) -> torch.Tensor:
    """(B, T) positions: 0.. for each row, counting only real tokens when left-padded, offset by the cache."""
    B, T = input_ids.shape
    if key_padding is not None:
        pos = (key_padding.long().cumsum(-1) - 1).clamp(min=0)
    else:
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
    if cache is not None and cache.length:
        pos = pos + cache.num_valid
    return pos
