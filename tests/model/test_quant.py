import copy

import pytest
import torch
from torch import nn

from omni.generation import generate
from omni.model.quant import Int8Linear, quantize_int8
from omni.pipeline import Pipeline


@pytest.mark.parametrize("in_features", [64, 72])  # the int8 CPU kernel (a multiple of 16), dequantising
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_the_float_layer(in_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 40, bias=bias)
    q = Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (40, in_features)
    x = torch.randn(2, 3, in_features)
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
