import copy

import pytest
import torch

from omni.model.compiled import compile_blocks, static_cache_len


def test_static_cache_len_is_a_power_of_two_bucket_within_the_context():
    assert [static_cache_len(n, 2048) for n in (1, 256, 257, 600, 1500)] == [256, 256, 512, 1024, 2048]
    assert static_cache_len(600, 700) == 700


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks(sampling_model, text_tokenizer):
    eager = copy.deepcopy(sampling_model.model).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    ids = torch.tensor([[text_tokenizer.vocab.bos_id] + text_tokenizer.encode("The number one is two")] * 2)
    for model in (eager, compiled):
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    torch.testing.assert_close(compiled(ids[:, :-1], targets=ids[:, 1:]).loss,
                               eager(ids[:, :-1], targets=ids[:, 1:]).loss, atol=1e-6, rtol=0)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
