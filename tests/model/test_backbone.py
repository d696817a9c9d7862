import logging

import pytest
import torch

from omni.model.backbone import (
    SIZES,
    Backbone,
    BackboneConfig,
    KVCache,
    Memory,
    Rotary,
    _sdpa,
    backbone_config,
    resolve_backend,
)

ATOL = 1e-5


def _backbone(seed=0, **overrides) -> Backbone:
    torch.manual_seed(seed)
    bb = Backbone(backbone_config("debug", **overrides))
    bb.reset_parameters(std=0.1)  # larger than training init so attention patterns actually differ
    return bb.eval()


def _x(B, T, D=64, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def _pos(B, T):
    return torch.arange(T).expand(B, T)


@torch.no_grad()
def test_output_shape():
    bb = _backbone()
    assert bb(_x(2, 10), _pos(2, 10)).shape == (2, 10, 64)


@torch.no_grad()
def test_causal():
    bb = _backbone()
    x = _x(2, 12)
    y = bb(x, _pos(2, 12))
    x2 = x.clone()
    x2[:, 7] = _x(2, 1, seed=5)[:, 0]
    y2 = bb(x2, _pos(2, 12))
    torch.testing.assert_close(y2[:, :7], y[:, :7], atol=ATOL, rtol=0)
    assert (y2[:, 7:] - y[:, 7:]).abs().amax() > 1e-2


@torch.no_grad()
def test_packed_documents_do_not_see_each_other():
    bb = _backbone()
    a, b = _x(1, 6, seed=2), _x(1, 9, seed=3)
    pad = _x(1, 3, seed=4)
    row = torch.cat([a, b, pad], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(9), torch.zeros(3, dtype=torch.long)])[None]
    doc_ids = torch.tensor([[0] * 6 + [1] * 9 + [-1] * 3])
    y = bb(row, positions, doc_ids=doc_ids)
    torch.testing.assert_close(y[:, :6], bb(a, _pos(1, 6)), atol=ATOL, rtol=0)
    torch.testing.assert_close(y[:, 6:15], bb(b, _pos(1, 9)), atol=ATOL, rtol=0)
    assert torch.isfinite(y).all()
    # without the document mask the second document would see the first
    assert (bb(row, positions)[:, 6:15] - y[:, 6:15]).abs().amax() > 1e-2


@torch.no_grad()
def test_left_padding_matches_unpadded_runs():
    bb = _backbone()
    long, short = _x(1, 10, seed=2), _x(1, 6, seed=3)
    x = torch.cat([long, torch.cat([_x(1, 4, seed=9), short], dim=1)])
    key_padding = torch.ones(2, 10, dtype=torch.bool)
    key_padding[1, :4] = False
    positions = torch.stack([torch.arange(10),
                             torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(6)])])
    y = bb(x, positions, key_padding=key_padding)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0:1], bb(long, _pos(1, 10)), atol=ATOL, rtol=0)
    torch.testing.assert_close(y[1:2, 4:], bb(short, _pos(1, 6)), atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("prefill", [1, 5])
def test_kv_cache_matches_full_forward(prefill):
    bb = _backbone()
    x = _x(2, 11)
    full = bb(x, _pos(2, 11))
    cache = KVCache(bb.config, 2, 11)
    outs = [bb(x[:, :prefill], _pos(2, prefill), cache=cache)]
    t = prefill
    steps = iter([1, 3] * 11)  # single tokens and chunks after the prefill
    while t < 11:
        step = min(next(steps), 11 - t)
        outs.append(bb(x[:, t:t + step], _pos(2, step) + t, cache=cache))
        t += step
    assert t == 11 and cache.length == 11
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="KV cache is full"):
        bb(x[:, :1], _pos(2, 1), cache=cache)


@torch.no_grad()
def test_static_decode_steps_match_full_forward():
    """``decode`` on a static cache (written at a slot, a mask instead of slicing, room to spare)
    gives what the full forward gives, for a left-padded row too; it advances nothing itself."""
    bb = _backbone()
    x = _x(2, 9)
    padding = torch.tensor([[True] * 9, [False, False] + [True] * 7])
    pos = (padding.cumsum(-1) - 1).clamp(min=0)
    full = bb(x, pos, key_padding=padding)
    cache = KVCache(bb.config, 2, 16)
    outs = [bb(x[:, :5], pos[:, :5], key_padding=padding[:, :5], cache=cache)]
    cache.make_static()
    for t in range(5, 9):
        outs.append(bb.decode(x[:, t:t + 1], cache.num_valid.clone(), cache))
        assert cache.length == t and int(cache.slot) == t
        cache.advance(1, None)
    torch.testing.assert_close(torch.cat(outs, dim=1)[padding], full[padding], atol=ATOL, rtol=0)
    # a cross-attention backbone with no memory in its cache decodes text alone (the memory case:
    # tests/model/test_whisper.py)
    assert _backbone(cross_attention={"every": 1}).decode(x[:, :1], _pos(2, 1), cache).shape == (2, 1, 64)


@torch.no_grad()
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention_equals_mha_with_repeated_kv(num_kv_heads):
    gqa = _backbone(num_heads=4, num_kv_heads=num_kv_heads)
    mha = _backbone(num_heads=4, num_kv_heads=4)
    rep, hd, H = 4 // num_kv_heads, 16, 4
    state = gqa.state_dict()
    for i in range(gqa.config.num_layers):
        w = state[f"layers.{i}.attn.wqkv.weight"]  # rows: q (H*hd), k (Hkv*hd), v (Hkv*hd)
        q, k, v = w.split([H * hd, num_kv_heads * hd, num_kv_heads * hd])
        # query head h reads kv head h // rep
        k, v = (t.view(num_kv_heads, hd, -1).repeat_interleave(rep, dim=0).reshape(H * hd, -1)
                for t in (k, v))
        state[f"layers.{i}.attn.wqkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = _x(2, 9)
    torch.testing.assert_close(gqa(x, _pos(2, 9)), mha(x, _pos(2, 9)), atol=ATOL, rtol=0)
    # and with an explicit mask (the non-causal-fast path)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5] * 2)
    torch.testing.assert_close(gqa(x, _pos(2, 9), doc_ids=doc_ids), mha(x, _pos(2, 9), doc_ids=doc_ids),
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_mrope_with_equal_axes_matches_1d_rope():
    bb = _backbone(mrope_section=[2, 3, 3])  # head_dim 16: 8 rotary pairs over (t, h, w)
    x = _x(2, 8)
    pos = _pos(2, 8) + 3
    y1 = bb(x, pos)
    torch.testing.assert_close(bb(x, torch.stack([pos, pos, pos])), y1, atol=ATOL, rtol=0)
    other = torch.stack([pos, pos.flip(-1), pos])
    assert (bb(x, other) - y1).abs().amax() > 1e-3


def test_mrope_sections_take_their_axis():
    cfg = backbone_config("debug", mrope_section=[2, 3, 3])
    rot = Rotary(cfg)
    pos = torch.tensor([[[5, 6]], [[11, 12]], [[17, 18]]])  # (3, B=1, T=2)
    cos, _ = rot(pos)
    assert cos.shape == (1, 1, 2, 16)
    axis_of_pair = [0, 0, 1, 1, 1, 2, 2, 2]
    for i, axis in enumerate(axis_of_pair):
        expect = torch.cos(pos[axis, 0].float() * rot.inv_freq[i])
        torch.testing.assert_close(cos[0, 0, :, i], expect)
        torch.testing.assert_close(cos[0, 0, :, i + 8], expect)  # second half mirrors the first


def test_resolve_backend_falls_back_to_sdpa_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("xformers", torch.device("cpu")) is _sdpa
    assert "falling back to sdpa" in caplog.text
    assert resolve_backend("sdpa", torch.device("cpu")) is _sdpa


def _cuda_xformers() -> bool:
    from omni.model.backbone import _xformers_problem

    return torch.cuda.is_available() and _xformers_problem("cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_xformers(), reason="needs CUDA and xformers")
@torch.no_grad()
def test_xformers_matches_sdpa():
    dev = torch.device("cuda")
    bb = _backbone(num_heads=4, num_kv_heads=2).to(dev)
    x = _x(2, 13).to(dev)
    pos = _pos(2, 13).to(dev)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 13], device=dev)
    key_padding = torch.ones(2, 13, dtype=torch.bool, device=dev)
    key_padding[1, :3] = False
    cases = [dict(), dict(doc_ids=doc_ids), dict(key_padding=key_padding)]
    ref = []
    for kw in cases:
        ref.append(bb(x, pos, **kw))
    bb.set_attn_backend("xformers", dev)
    for kw, r in zip(cases, ref):
        torch.testing.assert_close(bb(x, pos, **kw), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", list(SIZES))
def test_named_sizes_build_and_count_parameters(size):
    cfg = backbone_config(size)
    with torch.device("meta"):
        bb = Backbone(cfg)
    assert cfg.num_params() == sum(p.numel() for p in bb.parameters())
    assert cfg.head_dim * cfg.num_heads == cfg.dim


def test_sizes_grow_and_overrides_apply():
    counts = [backbone_config(s).num_params() for s in ("debug", "tiny", "small", "base")]
    assert counts == sorted(counts)
    cfg = backbone_config("tiny", max_seq_len=1024, num_layers=None)
    assert cfg.max_seq_len == 1024 and cfg.num_layers == SIZES["tiny"]["num_layers"]
    with pytest.raises(ValueError, match="unknown model size 'huge'.*debug"):
        backbone_config("huge")


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=100, num_heads=8), "divisible by num_heads"),
    (dict(num_heads=8, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(dim=36, num_heads=4), "head_dim must be even"),
    (dict(mrope_section=[2, 2, 2]), "mrope_section"),
    (dict(attn_backend="flash"), "attn_backend"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**kwargs)


def test_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        Backbone(BackboneConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def _packed_batch(B=2, T=20, mrope=False):
    """Two rows of packed documents (the first ends in padding, doc -1), M-RoPE positions when
    asked (a 2x3 grid in the middle of the second document), and a memory of media spans that
    start inside the documents."""
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4, [0] * 12 + [1] * 8])
    lengths = [torch.unique_consecutive(r, return_counts=True)[1] for r in doc_ids]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    if mrope:
        pos = pos.expand(3, B, T).clone()
        pos[1, 1, 2:8] = torch.tensor([0, 0, 0, 1, 1, 1]) + 2
        pos[2, 1, 2:8] = torch.tensor([0, 1, 2, 0, 1, 2]) + 2
    start = torch.tensor([[2, 2, 9, 9, 9], [3, 3, 14, 14, 2 ** 62]])
    memory = Memory(_x(B, 5, seed=9), start, doc_ids.gather(1, start.clamp(max=T - 1)))
    return _x(B, T), pos, doc_ids, memory


@pytest.mark.parametrize("case", ["packed", "mrope", "cross", "padding"])
def test_flex_attention_matches_the_dense_mask(case):
    """The flex backend's block mask gives SDPA-with-dense-mask outputs (FlexAttention's own kernel,
    forward; on a CPU it has no backward, so gradients go through the block mask's mask_mod made
    dense) and gradients, with packed documents, M-RoPE, cross-attention and left padding."""
    xa = dict(cross_attention={"every": 2}) if case == "cross" else {}
    mrope = dict(mrope_section=[4, 2, 2]) if case == "mrope" else {}
    x, pos, doc_ids, memory = _packed_batch(mrope=bool(mrope))
    kw = dict(doc_ids=doc_ids, memory=memory if xa else None)
    if case == "padding":
        key_padding = torch.ones(2, 20, dtype=torch.bool)
        key_padding[1, :5] = False
        kw = dict(key_padding=key_padding)
    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        bb = _backbone(**xa, **mrope)
        bb.set_attn_backend(backend)
        with torch.no_grad():
            outs.append(bb(x, pos, **kw))
        bb.train()
        xg = x.clone().requires_grad_()
        bb(xg, pos, **kw).square().mean().backward()
        grads.append([xg.grad, *(p.grad for p in bb.parameters())])
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)
    for g_flex, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_flex, g_ref, atol=1e-6, rtol=1e-5)
    assert grads[0][0].abs().sum() > 0


def test_flex_backend_builds_a_block_mask_only_for_masked_forwards():
    from torch.nn.attention.flex_attention import BlockMask

    bb = _backbone()
    bb.set_attn_backend("flex")
    seen, flex = [], bb.layers[0].attn.attend
    bb.layers[0].attn.attend = lambda q, k, v, mask, c: seen.append(type(mask)) or flex(q, k, v, mask, c)
    x, pos, doc_ids, _ = _packed_batch()
    with torch.no_grad():
        bb(x, pos, doc_ids=doc_ids)  # packed documents: the block mask
        bb(x, pos)  # plain causal: SDPA's is_causal flash path, no mask at all
        cache = KVCache(bb.config, 2, 24)
        bb(x, pos, cache=cache)
        bb(x[:, :1], pos[:, :1] + 20, cache=cache)  # decoding on a cache: SDPA
    assert seen == [BlockMask, type(None), type(None), type(None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_kernel_gradients_match_sdpa_on_cuda():
    dev = torch.device("cuda")
    x, pos, doc_ids, _ = _packed_batch()
    grads = []
    for backend in ("sdpa", "flex"):
        bb = _backbone(num_heads=4, num_kv_heads=2).to(dev).train()
        bb.set_attn_backend(backend, dev)
        xg = x.to(dev).requires_grad_()
        bb(xg, pos.to(dev), doc_ids=doc_ids.to(dev)).square().mean().backward()
        grads.append([xg.grad, *(p.grad for p in bb.parameters())])
    for g_flex, g_ref in zip(*grads[::-1]):
        torch.testing.assert_close(g_flex, g_ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    x, pos, doc_ids, memory = _packed_batch()
    grads = []
    for ckpt in ("none", mode):
        bb = _backbone(cross_attention={"every": 2, "ffn": True}).train()
        bb.set_activation_checkpointing(ckpt)
        bb(x, pos, doc_ids=doc_ids, memory=memory).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bb.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0
    with pytest.raises(ValueError, match="selective"):
        bb.set_activation_checkpointing("full")


def test_selective_checkpointing_keeps_matmuls_and_recomputes_the_rest():
    """What the backward pass recomputes: ``blocks`` the matmuls too, ``selective`` only the
    elementwise work (norms, rotary, SwiGLU): as many matmuls as without checkpointing, more ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    x, pos, _, _ = _packed_batch()
    ops = {}
    for mode in ("none", "blocks", "selective"):
        bb = _backbone().train()
        bb.set_activation_checkpointing(mode)
        loss = bb(x, pos).sum()
        with Count() as count:
            count.ops = []
            loss.backward()
        ops[mode] = (sum(op is torch.ops.aten.mm.default for op in count.ops), len(count.ops))
    assert ops["selective"][0] == ops["none"][0] < ops["blocks"][0]
    assert ops["none"][1] < ops["selective"][1] < ops["blocks"][1]


WHISPER_OPTIONS = dict(norm="layer", mlp="gelu", positions="learned", qkv_bias=True, out_bias=True)


@torch.no_grad()
def test_whisper_options_build_count_and_decode_like_the_full_forward():
    """LayerNorm, GELU MLP, learned positions and biases: parameters as counted, modules as named,
    the KV-cached decode equal to the full forward; left out of the saved config at their defaults."""
    bb = _backbone(**WHISPER_OPTIONS)
    cfg = bb.config
    assert cfg.num_params() == sum(p.numel() for p in bb.parameters())
    assert isinstance(bb.norm, torch.nn.LayerNorm) and bb.pos_embed.weight.shape == (cfg.max_seq_len, 64)
    assert {n for n, _ in bb.layers[0].named_parameters()} >= {"ffn.w1.bias", "ffn.w2.bias", "attn.wqkv.bias",
                                                               "attn.wo.bias", "attn_norm.bias"}
    x = _x(2, 9)
    full = bb(x, _pos(2, 9))
    cache = KVCache(cfg, 2, 9)
    steps = [bb(x[:, :4], _pos(2, 4), cache=cache)] + [bb(x[:, t:t + 1], _pos(2, 1) + t, cache=cache)
                                                       for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert bb(x, _pos(2, 9) + 1).sub(full).abs().max() > 1e-3  # positions matter
    saved = cfg.to_dict()
    assert {k: saved[k] for k in WHISPER_OPTIONS} == WHISPER_OPTIONS
    assert not {"norm", "mlp", "positions", "out_bias"} & set(backbone_config("debug").to_dict())
    assert BackboneConfig(**saved) == cfg
    with pytest.raises(ValueError, match="norm must be one of rms, layer"):
        BackboneConfig(norm="batch")
