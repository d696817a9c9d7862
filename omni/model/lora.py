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
