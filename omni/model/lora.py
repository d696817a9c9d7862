"""LoRA adapters (peft) on the model's linear layers, and folding them back into plain weights.

``train.lora`` (:class:`LoraSpec`) names the layers by glob; ``add_lora`` wraps them and freezes
everything else; ``merged_state_dict`` is what a checkpoint saves: the adapters folded into their
base weights, under the names the model has without adapters.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

# the backbone's attention and feed-forward projections: w13 of a gated (SwiGLU) MLP, w1 of a plain
# GELU one (an imported Whisper's decoder); the default takes whichever the model has
DEFAULT_TARGETS = ("backbone.layers.*.attn.wqkv", "backbone.layers.*.attn.wo",
                   "backbone.layers.*.ffn.w13", "backbone.layers.*.ffn.w1", "backbone.layers.*.ffn.w2")


@dataclass
class LoraSpec:
    """``train.lora``: rank ``r``, scale ``alpha / r``, dropout, and globs over the linear layers
    that get adapters (default: the backbone's attention and feed-forward projections)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def validate(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"train.lora needs r >= 1, alpha > 0 and dropout in [0, 1); got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )
        if not self.targets:
            raise ValueError("train.lora.targets is empty")


def add_lora(model: nn.Module, spec: LoraSpec) -> int:
    """Wrap the selected linear layers with LoRA adapters (peft) and train only the adapters.
    Returns the number of adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    spec.validate()
    modules = {n: m for n, m in model.named_modules() if n}
    linear = set()
    for pattern in spec.targets:  # a pattern names modules (at any depth), not what is inside them
        named = [
            n for n in modules if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"*.{pattern}")
        ]
        if not named and pattern in DEFAULT_TARGETS and list(spec.targets) == list(DEFAULT_TARGETS):
            continue  # the default names both MLP layouts
        if not named:
            linears = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))
            raise ValueError(
                f"train.lora.targets pattern {pattern!r} names no module; linear layers are named "
                f"like: {', '.join(linears[:6])}{' ...' if len(linears) > 6 else ''}"
            )
        for n in named:
            if not isinstance(modules[n], nn.Linear):
                raise ValueError(
                    f"train.lora.targets: {pattern!r} names {n}, a {type(modules[n]).__name__}; "
                    "LoRA wraps nn.Linear layers only"
                )
        linear.update(named)
    linear = sorted(linear)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=linear, bias="none"
    )
    inject_adapter_in_model(config, model)
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for up in layer.lora_B.values():
                up.__class__ = _LoraUp  # the same module and weight, a faster weight gradient
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            n += p.numel()
    return n


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA adapter folded into its base weight, under the names
    the model has without adapters; a model without adapters gives its plain state dict."""
    sd = model.state_dict()
    if not any(".lora_" in k for k in sd):
        return sd
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, value in sd.items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base_layer."):
            param = rest[len("base_layer.") :]
            if param == "weight":
                layer = layers[owner]
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
                value = value + delta.to(value.dtype)
            out[f"{owner}.{param}"] = value
    return out


class _LoraUp(nn.Linear):
    """LoRA's up projection B (``out x r``, no bias) with its gradients taken as products whose
    output has the rank as rows: the weight's as ``(x^T g)^T``, ``(r x N)(N x out)``, where
    autograd's linear takes ``g^T x``, ``(out x N)(N x r)``, and the input's as ``(B^T g^T)^T``.
    The tall-skinny forms are 2-5x slower on a CPU (1024 tokens at SmolLM2's gate/up width: 5.5
    against 1.0 ms and 1.27 against 0.59 ms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_autocast_enabled(x.device.type):  # autocast's cast, outside the function
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
        return _UpProjection.apply(x, w)


class _UpProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        # both products with the rank as the output's rows: 2-5x faster than the tall-skinny forms
        gx = (weight.t() @ g2.t()).t().reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = (x2.t() @ g2).t() if ctx.needs_input_grad[1] else None
        return gx, gw
