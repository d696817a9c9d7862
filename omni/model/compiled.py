"""``torch.compile`` for decoding and training.

:func:`compiled_step`, gpt-fast style: :meth:`OmniModel.decode_step` on a static KV cache
(``KVCache.make_static``), whose shapes are the same at every step. Inductor compiles it once per
model, batch size and cache length; the first call takes tens of seconds on a CPU, the steps
after it skip the per-op overhead of eager PyTorch. :func:`compile_blocks`: the backbone's
blocks for training."""

from __future__ import annotations

import functools

import torch


def static_cache_len(n: int, max_len: int) -> int:
    """The cache length for ``n`` positions: a power of two from 256 on (within ``max_len``), so
    prompts of other lengths reuse a compiled step."""
    return min(max(256, 1 << (n - 1).bit_length()), max_len)


def _mm_one_row(a: torch.Tensor, b: torch.Tensor):
    """``a @ b`` for a single row on CPU as a product and a sum, which inductor fuses into one
    pass over the weights: about twice the bandwidth of the BLAS matrix-vector product here."""
    if a.shape[0] != 1 or a.device.type != "cpu":
        return NotImplemented  # keep the matmul
    return (a[:, :, None] * b[None]).sum(1)


def _inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: _mm_one_row}
    return compile_fx(gm, example_inputs, decompositions=table)


def _step(decode_step, ids, positions, cache):
    return decode_step(ids, positions, cache)


@functools.cache
def compiled_step():
    """``step(model.decode_step, ids (B, 1), positions, cache) -> logits (B, V)``, compiled on
    first use."""
    return torch.compile(_step, dynamic=False, backend=_inductor)


def compile_blocks(model) -> None:
    """Regional compilation (``train.compile``): each backbone block and cross-attention block is
    compiled in place (``nn.Module.compile``: parameter names stay), not the whole model, so the
    blocks share one compiled graph (compiled once, in tens of seconds, not once per layer) and
    the media towers, the loss and the optimizer stay eager. Inductor fuses the norms', rotary's
    and SwiGLU's elementwise work, forward and backward; a block's activation checkpointing
    (``train.activation_checkpointing``) and FlexAttention are traced inside it. The same loss and
    gradients, a faster step."""
    for block in [*model.backbone.layers, *model.backbone.cross.values()]:
        block.compile()
