import copy

import pytest
import torch
from torch import nn

from omni.generation import generate
from omni.model import quant
from omni.model.quant import Int8Linear, quantize_int8
from omni.pipeline import Pipeline

needs_kernel = pytest.mark.skipif(
    not quant.gemv_kernel(),
    reason="omni's int8 kernel is for x86 CPUs with AVX2 alone (OMNI_INT8_KERNEL=1 forces it); it needs gcc")


# in_features 64: omni's one-row kernel (a multiple of 32) where it is loaded, else aten's int8 kernel
# (a multiple of 16); 72: dequantising. Rows: 1 (a decoding step), 6, 40 (a prefill: dequantised
# where omni's kernel is loaded).
@pytest.mark.parametrize("in_features", [64, 72])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1, 1), (2, 3), (2, 20)])
def test_int8_linear_is_close_to_the_float_layer(in_features, bias, lead):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 40, bias=bias)
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (40, in_features)
    x = torch.randn(*lead, in_features)
    ref = linear(x)
    y = q(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert (y - ref).norm() / ref.norm() < 0.01


@torch.no_grad()
def test_quantized_model_logits_stay_close(sampling_model, text_tokenizer):
    model = quantize_int8(Pipeline(copy.deepcopy(sampling_model.model), tokenizer=text_tokenizer))
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linear == [] and isinstance(model.lm_head, Int8Linear)
    assert model.embed.weight.dtype == torch.float32
    ids = torch.tensor([[text_tokenizer.vocab.bos_id] + text_tokenizer.encode("The number one is")])
    ref, out = sampling_model(ids).logits, model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.02
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert generate(model, ids, max_new_tokens=4, stop_ids=[]).shape == (1, 4)


@needs_kernel
@pytest.mark.parametrize("n, k", [(45, 96), (8, 8192)])
def test_int8_kernel_matches_the_dequantised_product(n, k):
    """One fp32 row against int8 weights: the exact product of the dequantised weights to ~1e-4
    (x is rounded to int16). Row counts that are not a multiple of 4 take the scalar tail; at
    k=8192 with every weight +-127 and x at full scale the int32 sums would overflow unless
    flushed to fp32 every 256 columns."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    x = torch.randn(1, k, generator=g) * 50
    if k == 8192:
        signs = torch.tensor([1, -1] * (n // 2), dtype=torch.int8)[:, None]
        w = torch.full((n, k), 127, dtype=torch.int8) * signs
        x = torch.full((1, k), 3.0)
    scale = torch.rand(n, generator=g) / 100 + 1e-3
    y = torch.ops.omni_kernels.int8_gemv(x, w, scale)
    ref = (x.double() @ (w.double() * scale.double()[:, None]).T).float()
    assert y.shape == (1, n) and y.dtype == torch.float32
    assert ((y - ref).norm() / ref.norm()).item() < 1e-4


@needs_kernel
def test_int8_linear_takes_the_kernel_for_one_row_eager_and_compiled():
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(64, 40))
    assert q.gemv
    x = torch.randn(1, 1, 64)
    with torch.profiler.profile() as prof:
        y = q(x)
    assert "omni_kernels::int8_gemv" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(torch.compile(q, fullgraph=True)(x), y)


def test_the_int8_kernel_is_off_when_asked_or_when_it_cannot_be_built(monkeypatch):
    import torch.utils.cpp_extension

    monkeypatch.setenv(quant.KERNEL_ENV, "0")
    assert quant.gemv_kernel.__wrapped__() is False
    monkeypatch.setenv(quant.KERNEL_ENV, "1")
    monkeypatch.setattr(quant.platform, "machine", lambda: "x86_64")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built.*no compiler here"):
        assert quant.gemv_kernel.__wrapped__() is False
