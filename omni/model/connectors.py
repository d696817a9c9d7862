"""Connectors: encoder features ``(B, N, in_dim)`` -> tokens at model width ``(B, M, out_dim)``.

=============  =====================================================  ====================
kind           what                                                   M (tokens out)
=============  =====================================================  ====================
``identity``   the features as they are (Whisper's decoder reads its  N
               encoder's; needs in_dim == out_dim)
``linear``     one linear layer (LLaVA-1)                             N
``mlp``        Linear -> GELU -> Linear (LLaVA-1.5)                   N
``perceiver``  Flamingo's Perceiver resampler: learned latents that   ``num_queries``
               cross-attend to [features; latents], then an FFN,
               per layer
``qformer``    BLIP-2's Q-Former (the vision side): learned queries   ``num_queries``
               with self-attention, cross-attention to the features
               and an FFN in every layer
``attnpool``   multihead attention pooling: learned probes attend     ``num_queries``
               once to the features, plus an MLP (SigLIP's "MAP"
               head, the pooling option of the PaliGemma/Big Vision
               code, generalised from 1 probe to M)
=============  =====================================================  ====================

``norm: true`` (any kind but identity) puts a LayerNorm on the features going in (as Qwen2-VL's
patch merger does) and an RMSNorm on the tokens coming out, whose gain a pretrained language model
sets to the RMS of its token embeddings (:meth:`Connector.match_scale`). Without it a projector
trained into a frozen LM drifts far off the embeddings' scale (SmolLM2's embeddings have a norm of
3.2; an MLP projector's outputs reached 164 after 60 steps of LLaVA's stage 1), and the LM reads
the image tokens as noise.

All attention blocks are pre-norm (LayerNorm) with residuals; BLIP-2's BERT-based Q-Former is
post-norm and cross-attends every other layer, and its text branch is left out: the decoder
itself is the language model here. A ``mask (B, N)`` (True = real feature) lets a batch hold
feature sets of different lengths.

Every connector has ``num_tokens(n_in) -> M`` and ``grid(in_grid) -> out_grid``: the linear
and MLP connectors keep the encoder's ``(t, h, w)`` layout for M-RoPE; the resamplers emit a
1-D run of M tokens, ``(M, 1, 1)``.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Connector(nn.Module):
    """Base: ``forward(x (B, N, in_dim), mask (B, N) | None) -> (B, M, out_dim)``."""

    in_dim: int
    out_dim: int

    @torch.no_grad()
    def match_scale(self, rms: float) -> None:
        """Set the output norm's gain to ``rms`` (the LM's token-embedding RMS); no-op without one."""

    def num_tokens(self, n_in: int) -> int:
        return n_in

    def grid(self, in_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(in_grid)


class LinearConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


class IdentityConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"connector identity needs the encoder's width ({in_dim}) to be the model's "
                             f"({out_dim})")
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


class MLPConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden_dim = hidden_dim or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class _Attention(nn.Module):
    """Multi-head attention of ``q (B, M, D)`` over ``kv (B, S, D)``; ``mask (B, S)`` True = attend."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, m, d = q.shape
        hd = d // self.num_heads
        q = self.q(q).view(b, m, self.num_heads, hd).transpose(1, 2)  # (B, H, M, hd)
        k, v = self.kv(kv).view(b, kv.shape[1], 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, S, hd)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, m, d))


def _ffn(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class _QueryConnector(Connector):
    """Shared frame of the resamplers: project features to ``hidden_dim``, run ``_mix`` on M learned
    queries, normalise, project to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_dim: int | None = None,
                 num_heads: int = 4):
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_dim) * hidden_dim ** -0.5)
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def num_tokens(self, n_in: int) -> int:
        return self.num_queries

    def grid(self, in_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return (self.num_queries, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.in_proj(x)  # (B, N, hidden)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, M, hidden)
        return self.out_proj(self.norm_out(self._mix(q, ctx, mask)))

    def _mix(self, q, ctx, mask):
        raise NotImplementedError


class PerceiverResampler(_QueryConnector):
    """Flamingo: per layer, latents attend to [features; latents] (so they see each other), then an FFN."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_dim: int | None = None,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__(in_dim, out_dim, num_queries, hidden_dim, num_heads)
        d = self.queries.shape[1]
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm_ctx=nn.LayerNorm(d), norm_q=nn.LayerNorm(d), attn=_Attention(d, num_heads), ffn=_ffn(d)))
            for _ in range(num_layers))

    def _mix(self, q, ctx, mask):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], q.shape[1])], dim=1)
        for layer in self.layers:
            qn = layer["norm_q"](q)
            q = q + layer["attn"](qn, torch.cat([layer["norm_ctx"](ctx), qn], dim=1), mask)
            q = q + layer["ffn"](q)
        return q


class QFormer(_QueryConnector):
    """BLIP-2 (vision side): per layer, queries self-attend, cross-attend to the features, then an FFN."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_dim: int | None = None,
                 num_layers: int = 2, num_heads: int = 4):
        super().__init__(in_dim, out_dim, num_queries, hidden_dim, num_heads)
        d = self.queries.shape[1]
        self.norm_ctx = nn.LayerNorm(d)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            norm_self=nn.LayerNorm(d), self_attn=_Attention(d, num_heads),
            norm_cross=nn.LayerNorm(d), cross_attn=_Attention(d, num_heads), ffn=_ffn(d)))
            for _ in range(num_layers))

    def _mix(self, q, ctx, mask):
        ctx = self.norm_ctx(ctx)
        for layer in self.layers:
            qn = layer["norm_self"](q)
            q = q + layer["self_attn"](qn, qn)
            q = q + layer["cross_attn"](layer["norm_cross"](q), ctx, mask)
            q = q + layer["ffn"](q)
        return q


class AttentionPool(_QueryConnector):
    """SigLIP's MAP head with M probes: one cross-attention of the probes over the features, then an MLP."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_dim: int | None = None,
                 num_heads: int = 4):
        super().__init__(in_dim, out_dim, num_queries, hidden_dim, num_heads)
        d = self.queries.shape[1]
        self.norm_ctx = nn.LayerNorm(d)
        self.attn = _Attention(d, num_heads)
        self.ffn = _ffn(d)

    def _mix(self, q, ctx, mask):
        q = self.attn(q, self.norm_ctx(ctx), mask)  # no residual to the probes, as in SigLIP's head
        return q + self.ffn(q)


class NormedConnector(Connector):
    """``norm: true``: LayerNorm(features) -> the connector -> RMSNorm with a learned gain."""

    def __init__(self, inner: Connector):
        super().__init__()
        self.in_dim, self.out_dim = inner.in_dim, inner.out_dim
        self.norm_in = nn.LayerNorm(inner.in_dim)
        self.inner = inner
        self.norm_out = nn.RMSNorm(inner.out_dim, eps=1e-6)

    @torch.no_grad()
    def match_scale(self, rms: float) -> None:
        self.norm_out.weight.fill_(rms)

    def num_tokens(self, n_in: int) -> int:
        return self.inner.num_tokens(n_in)

    def grid(self, in_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return self.inner.grid(in_grid)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm_out(self.inner(self.norm_in(x), mask))


CONNECTORS = {"identity": IdentityConnector, "linear": LinearConnector, "mlp": MLPConnector,
              "perceiver": PerceiverResampler, "qformer": QFormer, "attnpool": AttentionPool}


def _options(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_dim", "out_dim")]


def build_connector(kind: str, in_dim: int, out_dim: int, **kw) -> Connector:
    """A connector by name; ``kw`` are that kind's options (``num_queries``, ``hidden_dim``,
    ``num_layers``, ``num_heads``); an option the kind lacks is a ``ValueError`` naming the allowed ones."""
    if kind not in CONNECTORS:
        raise ValueError(f"connector kind must be one of {', '.join(CONNECTORS)}; got {kind!r}")
    allowed = _options(CONNECTORS[kind])
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"connector {kind!r} has no option {unknown[0]!r}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    return CONNECTORS[kind](in_dim, out_dim, **kw)


@dataclass
class ConnectorConfig:
    """Recipe section ``connector:``. Options a kind does not use stay ``None``; ``in_dim`` comes
    from the encoder and ``out_dim`` from the model width when the model builds it."""

    kind: str = "mlp"
    num_queries: int | None = None
    hidden_dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    norm: bool = False  # LayerNorm in, RMSNorm out at the LM's embedding scale (see the module doc)

    def options(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("kind", "norm") and v is not None}

    def validate(self) -> None:
        if self.kind not in CONNECTORS:
            raise ValueError(f"connector.kind must be one of {', '.join(CONNECTORS)}; got {self.kind!r}")
        allowed = _options(CONNECTORS[self.kind])
        for key, value in self.options().items():
            if key not in allowed:
                raise ValueError(f"connector.{key} does not apply to kind {self.kind!r} "
                                 f"(its options: {', '.join(allowed) or 'none'})")
            if value < 1:
                raise ValueError(f"connector.{key} must be >= 1, got {value}")
        if self.norm and self.kind == "identity":
            raise ValueError("connector.norm does not apply to kind 'identity' "
                             "(it passes features as they are)")

    def build(self, in_dim: int, out_dim: int) -> Connector:
        self.validate()
        connector = build_connector(self.kind, in_dim, out_dim, **self.options())
        return NormedConnector(connector) if self.norm else connector
