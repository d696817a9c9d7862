"""Int8 weight-only quantisation of the language model's linear layers, for inference.

``quantize_int8(model)`` swaps every ``nn.Linear`` of the backbone, and the output head, for an
:class:`Int8Linear`: int8 weights with one scale per output channel (absmax / 127), a quarter of
fp32's bytes, which is what decoding reads per token. A tied head gets its own int8 copy; the
embedding stays as it is. A quantised model is for generation and scoring, not for training or
``save_pretrained``.

On a CPU whose best instruction set is AVX2 (no AVX512, so no VNNI for aten's int8 kernel), one
row of fp32 activations (a decoding step at batch 1) goes through ``omni_kernels::int8_gemv``
(``int8_gemv.cpp`` beside this file), built with ``torch.utils.cpp_extension`` on first use
(~15 s, then cached); it reads the weights about twice as fast as aten's kernel there
(docs/benchmarks.md). ``OMNI_INT8_KERNEL=0`` turns it off, ``=1`` asks for it on any x86 CPU.
Where it cannot be built (no compiler) it warns once and aten's kernel does the work.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_ENV = "OMNI_INT8_KERNEL"


@functools.cache
def gemv_kernel() -> bool:
    """Whether ``torch.ops.omni_kernels.int8_gemv`` is loaded (built on the first call where wanted)."""
    wanted = os.environ.get(KERNEL_ENV)
    if wanted == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if wanted != "1" and torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False
    try:
        from torch.utils.cpp_extension import load

        load(name="omni_int8_gemv", sources=[str(Path(__file__).with_name("int8_gemv.cpp"))],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False)
    except Exception as e:  # no compiler or ninja: aten's kernel still works
        warnings.warn(f"omni's int8 decoding kernel could not be built ({type(e).__name__}: {e}); "
                      f"using aten._weight_int8pack_mm. Set {KERNEL_ENV}=0 to skip the attempt.")
        return False
    torch.library.register_fake("omni_kernels::int8_gemv")(
        lambda x, w, scale: x.new_empty(*x.shape[:-1], w.shape[0]))
    return True


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scale).T + bias`` with ``qweight (N, K)`` int8 and ``scale (N,)``.

    On CPU one fp32 row goes through omni's kernel where :func:`gemv_kernel` loads it (at
    construction; it needs ``in_features`` a multiple of 32), and there 32 rows or more (a
    prefill) dequantise the weights and use the float product, ~1.8x faster than aten's int8 kernel
    on such a CPU at 128 rows. Otherwise the product is ``aten._weight_int8pack_mm`` on bf16
    activations (its fast path; the output is cast back to the input's dtype; it needs
    ``in_features`` a multiple of 16); off the CPU the weights are dequantised per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gemv = self.in_features % 32 == 0 and gemv_kernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.gemv and x.device.type == "cpu" and x.dtype == torch.float32 and rows == 1:
            y = torch.ops.omni_kernels.int8_gemv(x, self.qweight, self.scale.float())
        elif x.device.type == "cpu" and self.in_features % 16 == 0 and not (self.gemv and rows >= 32):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                   self.qweight, self.scale_bf16)
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
