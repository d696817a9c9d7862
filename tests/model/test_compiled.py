import copy

import pytest
import torch

from omni.model.backbone import backbone_config
from omni.model.compiled import compile_blocks, static_cache_len
from omni.model.omni_model import OmniConfig, OmniModel
from omni.vocab import Vocab


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


def test_regionally_compiled_blocks_with_selective_checkpointing_train_like_eager():
    """``train.compile`` with ``train.activation_checkpointing: selective`` on packed rows: each
    block compiled (the checkpoint and its policy traced inside), the same loss and gradients as
    eager. Two debug blocks share one graph, so this compiles once (~10-30 s on a CPU)."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    eager = OmniModel(OmniConfig(backbone_config("debug", max_seq_len=32), Vocab.default(100))).train()
    eager.reset_parameters()
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        model.backbone.set_activation_checkpointing("selective")
    compile_blocks(compiled)
    assert all(b._compiled_call_impl is not None for b in compiled.backbone.layers)
    ids, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10] * 2)
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    losses = [m(ids, positions=positions, targets=targets, doc_ids=doc_ids).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    grads = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did go through dynamo
