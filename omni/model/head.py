"""The language-model head, and its cross-entropy fused with it for training.

Training over a 49k-152k vocabulary spends a fifth of a step in the head, and the unfused loss
keeps three (N, V) fp32 tensors per step (the logits, their log-softmax, the gradient). The fused
loss (as Liger's and Apple's "cut cross-entropy" are) computes, a chunk of rows at a time, the
logits, the summed cross-entropy and already the gradients of the rows and the weight: no more
than one chunk's logits ever exist, and nothing is recomputed in the backward pass, which only
scales what the forward left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni.sequence import IGNORE


class LMHead(nn.Linear):
    """The head (no bias): ``forward`` gives logits; ``loss`` the fused, summed cross-entropy.
    ``loss`` is a method of the module so that FSDP gathers the head's weight for it
    (``register_fsdp_forward_method``) as it does for ``forward``."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)
        self._workspace: torch.Tensor | None = None  # a CPU's logits buffer, kept between steps

    def loss(self, h: torch.Tensor, targets: torch.Tensor, ranges: tuple[tuple[int, int], ...],
             weights: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """The cross-entropy summed over the real targets of rows ``h (N, D)``: ``targets (N, K)``,
        column k over the vocabulary range ``ranges[k]`` (ids relative to its start, ``IGNORE``
        where a row has none), each row weighted by ``weights (N,)`` when given; ``chunk`` rows at a
        time (0: all at once)."""
        return _LinearCrossEntropy.apply(h, self.weight, targets, tuple(ranges), weights, chunk,
                                         self._logits_buffer)

    def _logits_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        """An fp32 ``(rows, V)`` buffer for a chunk's logits. On a CPU it is kept between steps:
        a fresh one of a few hundred MB is mapped anew by the C allocator each time, and its page
        faults cost as much as the log-softmax over it (43 of 56 ms for 1020 x 49152). A GPU's
        caching allocator reuses freed memory already."""
        if device.type != "cpu":
            return torch.empty(rows, self.out_features, device=device)
        n = rows * self.out_features
        if self._workspace is None or self._workspace.numel() < n:
            self._workspace = torch.empty(n)
        return self._workspace[:n].view(rows, self.out_features)


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ranges, weights=None) -> torch.Tensor:
    """What :meth:`LMHead.loss` computes, from logits ``(N, V)`` (the unfused path, and its
    reference): column k of ``targets`` over ``logits[:, ranges[k]]``."""
    total = logits.new_zeros((), dtype=torch.float32)
    for k, (a, b) in enumerate(ranges):
        losses = F.cross_entropy(logits[:, a:b].float(), targets[:, k], ignore_index=IGNORE, reduction="none")
        total = total + (losses.sum() if weights is None else (losses * weights).sum())
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ranges, weights, chunk, buffer):
        device = h.device.type
        # under autocast the head's products run in its dtype, as an autocast F.linear would
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(device, enabled=False):
            x_all, w = h.to(dtype), weight.to(dtype)
            gh = torch.empty_like(x_all) if need_h else None
            # the weight's gradient, summed over the chunks in fp32 when the products are not
            gw = None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            step = chunk if chunk > 0 else max(1, h.shape[0])
            for i in range(0, h.shape[0], step):
                x = x_all[i:i + step]
                z = buffer(x.shape[0], x.device)
                _logits_into(z, x, w)
                loss, g = _loss_and_logit_grad(z, targets[i:i + step], ranges,
                                               None if weights is None else weights[i:i + step],
                                               need_h or need_w)
                total += loss
                if g is None:  # the loss alone (no gradient needed: a validation pass)
                    continue
                g = g.to(dtype)
                if need_h:
                    torch.mm(g, w, out=gh[i:i + step])
                if need_w and gw is None:
                    gw = (g.t() @ x).float()
                elif need_w:
                    gw.addmm_(g.t(), x) if dtype == torch.float32 else gw.add_((g.t() @ x).float())
        ctx.save_for_backward(gh, gw)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        # the forward's gradients (of a loss of weight 1) scaled in place: a second backward through
        # them (retain_graph) fails on their version counter instead of scaling them twice
        gh, gw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if gh is None else gh.mul_(grad.to(gh.dtype)).to(h_dtype)
        gw = None if gw is None else gw.mul_(grad.to(gw.dtype)).to(w_dtype)
        return gh, gw, None, None, None, None, None


# vocabulary rows per product on a CPU: a block's logits stay in cache while they are written
# (1020 x 576 by 576 x 49152: 274 against 308 ms into the same buffer)
CPU_BLOCK = 512


def _logits_into(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``z (C, V) = x @ w.T`` in fp32, ``z`` an fp32 buffer (the products in ``w``'s dtype)."""
    if w.dtype != torch.float32:
        z.copy_(F.linear(x, w))
        return
    step = CPU_BLOCK if z.device.type == "cpu" else z.shape[1]
    for j in range(0, z.shape[1], step):
        torch.mm(x, w[j:j + step].t(), out=z[:, j:j + step])


def _loss_and_logit_grad(z: torch.Tensor, targets: torch.Tensor, ranges, weights: torch.Tensor | None,
                         grad_too: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed (weighted) cross-entropy of logits ``z (C, V)`` (fp32) and, with ``grad_too``,
    its gradient with respect to them (else None): per column k, softmax minus one-hot over
    ``ranges[k]``, times each row's weight (0 where the row's target is ``IGNORE``). With one column
    over the whole vocabulary (text) ``z`` is overwritten: it becomes the gradient."""
    whole = len(ranges) == 1 and tuple(ranges[0]) == (0, z.shape[1])
    grad = None if whole or not grad_too else torch.zeros_like(z)
    total = z.new_zeros(())
    for k, (a, b) in enumerate(ranges):
        t = targets[:, k]
        real = t != IGNORE
        scale = real.to(z.dtype) if weights is None else real * weights.to(z.dtype)
        idx = t.clamp(min=0)[:, None]
        # one fused pass (in place where z is not read again), then the softmax in place
        p = torch.log_softmax(z, 1, out=z) if whole else torch.log_softmax(z[:, a:b], 1)
        total = total - (p.gather(1, idx)[:, 0] * scale).sum()
        if not grad_too:
            continue
        p = p.exp_()
        if weights is not None or not bool(real.all()):
            p.mul_(scale[:, None])
        p.scatter_add_(1, idx, -scale[:, None])
        if whole:
            grad = p
        else:
            grad[:, a:b] += p
    return total, grad
