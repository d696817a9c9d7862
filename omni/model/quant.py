"""Int8 weight-only quantisation of the language model's linear layers, for inference.

``quantize_int8(model)`` swaps every ``nn.Linear`` of the backbone, and the output head, for an
:class:`Int8Linear`: int8 weights with one scale per output channel (absmax / 127), a quarter of
fp32's bytes, which is what decoding reads per token. A tied head gets its own int8 copy; the
embedding stays as it is. A quantised model is for generation and scoring, not for training or
``save_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scale).T + bias`` with ``qweight (N, K)`` int8 and ``scale (N,)``.

    On CPU the product is ``aten._weight_int8pack_mm`` on bf16 activations (its fast path; the
    output is cast back to the input's dtype; it needs ``in_features`` a multiple of 16);
    otherwise the weights are dequantised per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                   self.qweight, self.scale)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise ``model``'s backbone linear layers and ``lm_head`` in place (an ``OmniModel`` or a
    pipeline around one); returns it."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (name == "lm_head" or name.startswith("backbone."))]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int8Linear(linear))
    return model
