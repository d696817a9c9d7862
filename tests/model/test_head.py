"""The head's fused cross-entropy (omni/model/head.py) against the unfused one."""

import pytest
import torch

from omni.model.head import LMHead, summed_cross_entropy
from omni.sequence import IGNORE


def _case(seed=0, n=37, dim=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    head = LMHead(dim, vocab)
    torch.nn.init.normal_(head.weight, 0, 0.3, generator=g)
    h = torch.randn(n, dim, generator=g)
    targets = torch.stack([torch.randint(0, vocab, (n,), generator=g),      # text, the whole vocabulary
                           torch.randint(0, 10, (n,), generator=g)], 1)      # a stream over ids 40..49
    targets[::4, 0] = IGNORE
    targets[1::3, 1] = IGNORE
    return head, h, targets, ((0, vocab), (40, 50)), torch.rand(n, generator=g) + 0.5


def _grads(head, h, fn):
    head.zero_grad()
    x = h.clone().requires_grad_()
    loss = fn(x)
    (loss * 0.37).backward()  # a scale, as a mean over the targets gives
    return loss.detach(), x.grad, head.weight.grad


@pytest.mark.parametrize("chunk", [0, 1, 8, 100])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_loss_gives_the_unfused_loss_and_gradients(chunk, weighted):
    head, h, targets, ranges, w = _case()
    w = w if weighted else None
    ref = _grads(head, h, lambda x: summed_cross_entropy(head(x), targets, ranges, w))
    fused = _grads(head, h, lambda x: head.loss(x, targets, ranges, w, chunk))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # text only, over the whole vocabulary: the path that overwrites the logits with their gradient
    ref = _grads(head, h, lambda x: summed_cross_entropy(head(x), targets[:, :1], ranges[:1], w))
    fused = _grads(head, h, lambda x: head.loss(x, targets[:, :1], ranges[:1], w, chunk))
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_loss_under_autocast_and_with_a_frozen_head():
    head, h, targets, ranges, w = _case(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(head, h, lambda x: summed_cross_entropy(head(x), targets, ranges, w))
        fused = _grads(head, h, lambda x: head.loss(x, targets, ranges, w, 8))
    assert fused[1].dtype == fused[2].dtype == torch.float32
    for a, b in zip(fused, ref):  # the same bf16 products, fp32 softmax
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    head.weight.requires_grad_(False)  # LoRA: the embedding-tied head is frozen
    loss, gh, gw = _grads(head, h, lambda x: head.loss(x, targets, ranges, w, 8))
    assert gw is None
    unfused = _grads(head, h, lambda x: summed_cross_entropy(head(x), targets, ranges, w))
    torch.testing.assert_close(gh, unfused[1])


def test_the_fused_loss_backpropagates_once():
    """Its backward scales the gradients the forward left in place: a second one is refused."""
    head, h, targets, ranges, _ = _case()
    loss = head.loss(h.requires_grad_(), targets, ranges)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_cpu_keeps_one_logits_buffer_across_steps():
    """On a CPU the chunk's logits go to a buffer the head keeps (no fresh mapping each step);
    a later, smaller step reuses it and still gets the unfused gradients."""
    head, h, targets, ranges, w = _case()
    _grads(head, h, lambda x: head.loss(x, targets, ranges, w))
    kept = head._workspace.data_ptr()
    ref = _grads(head, h[:9], lambda x: summed_cross_entropy(head(x), targets[:9, :1], ranges[:1]))
    fused = _grads(head, h[:9], lambda x: head.loss(x, targets[:9, :1], ranges[:1]))
    assert head._workspace.data_ptr() == kept
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_loss_on_a_gpu():
    """The same on CUDA (no kept buffer there: the caching allocator reuses memory), fp32 and
    under bf16 autocast."""
    head, h, targets, ranges, w = _case()
    head, h, targets, w = head.cuda(), h.cuda(), targets.cuda(), w.cuda()
    for autocast, tol in ((False, 1e-4), (True, 2e-2)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            ref = _grads(head, h, lambda x: summed_cross_entropy(head(x), targets, ranges, w))
            fused = _grads(head, h, lambda x: head.loss(x, targets, ranges, w, 8))
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert head._workspace is None
