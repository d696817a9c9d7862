"""The decoder-only transformer that every modality shares.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU,
a preallocated KV cache for decoding, and pluggable attention (``sdpa`` default, ``xformers``
on CUDA when installed, ``flex``: FlexAttention on a block mask for packed documents, so they
attend at flash speed where SDPA with a dense mask cannot take its flash path). Activation
checkpointing per block (:meth:`Backbone.set_activation_checkpointing`): ``blocks`` recomputes
each block in the backward pass, ``selective`` keeps the matmuls' and attention's outputs and
recomputes only the cheap elementwise work (norms, rotary, SwiGLU).

The backbone sees embeddings and positions only; it knows nothing about modalities. Whisper's
decoder is the same backbone with other options: ``norm: layer`` (LayerNorm with bias), ``mlp:
gelu`` (fc1 -> GELU -> fc2, with biases), ``positions: learned`` (absolute position embeddings
added to the input), ``qkv_bias`` + ``out_bias`` (Whisper's k projection has no bias; its slot in
the fused bias stays 0, which softmax ignores) and
``cross_attention: {placement: after_attn, memory_norm: false, bias: true}``.

Shapes: ``x: (B, T, D)``; ``positions: (B, T)`` (1-D RoPE) or ``(3, B, T)`` (M-RoPE:
time, height, width); ``q: (B, H, T, hd)``; ``k, v: (B, Hkv, S, hd)``.

With ``cross_attention`` set, a cross-attention block before every ``every``-th layer reads a
:class:`Memory` of media features instead of the features sitting in the token sequence: the
Whisper decoder's layout (``every: 1``) or Flamingo's (``gated: true``: tanh gates initialised at
0, so at initialisation the backbone computes exactly what it computes without them; ``ffn:
true`` adds the gated feed-forward of Flamingo's GATED XATTN-DENSE). A token reads only the most
recent media span at or before it in its own document (Flamingo's rule), and a token with none
before it reads nothing. ``media`` names the modalities read this way (the model places the
others' features in the sequence as tokens); null means all.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from omni.schema import choice, from_dict, positive

log = logging.getLogger(__name__)

ATTN_BACKENDS = ("sdpa", "xformers", "flex")
CHECKPOINTING = ("none", "blocks", "selective")


@dataclass
class CrossAttentionConfig:
    """``cross_attention``: a block before every ``every``-th layer reads the media memory, through
    a tanh gate that starts at 0 when ``gated`` (Flamingo), with its own feed-forward when ``ffn``;
    ``media`` lists the modalities read this way (None: all of them)."""

    every: int = 1
    gated: bool = False
    ffn: bool = False
    media: list[str] | None = None
    placement: str = "before"  # before the layer, or after_attn: between its self-attention and MLP (Whisper)
    memory_norm: bool = True  # normalise the memory first (Whisper's encoder output is normed already)
    bias: bool = False  # biases on q, k/v and the output projection (Whisper)

    def validate(self) -> None:
        positive("cross_attention.every", self.every)
        choice("cross_attention.placement", self.placement, ("before", "after_attn"))
        if self.media is not None and not self.media:
            raise ValueError("cross_attention.media must be a non-empty list of modalities (or null for all)")


_NEW_OPTIONS = {"out_bias": (False,), "norm": ("rms",), "mlp": ("swiglu",), "positions": ("rope",)}
_NEW_CROSS_OPTIONS = {"placement": ("before",), "memory_norm": (True,), "bias": (False,)}


@dataclass
class BackboneConfig:
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    ffn_dim: int = 768
    head_dim: int | None = None  # default dim // num_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": .., ...} as in transformers
    mrope_section: list[int] | None = None  # split of head_dim/2 rotary pairs over (t, h, w); None = 1-D
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 family
    out_bias: bool = False  # a bias on the attention output projection (Whisper)
    norm: str = "rms"  # rms (RMSNorm) or layer (LayerNorm with bias, Whisper)
    mlp: str = "swiglu"  # swiglu, or gelu: fc1 -> GELU -> fc2 with biases (Whisper)
    positions: str = "rope"  # rope, or learned: absolute position embeddings of max_seq_len rows (Whisper)
    attn_backend: str = "sdpa"
    # {every: N, gated: bool, ffn: bool, media: [modalities read this way] or null for all};
    # None = media as tokens
    cross_attention: dict | None = None
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. imported from)

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
            self.head_dim = self.dim // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        choice("norm", self.norm, ("rms", "layer"))
        choice("mlp", self.mlp, ("swiglu", "gelu"))
        choice("positions", self.positions, ("rope", "learned"))
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to "
                             f"head_dim/2 = {self.head_dim // 2}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.cross_attention is not None:  # checked as a CrossAttentionConfig, kept as its dict
            xa = from_dict(CrossAttentionConfig, self.cross_attention, "cross_attention.")
            xa.validate()
            self.cross_attention = asdict(xa)

    def cross_layers(self) -> list[int]:
        """Indices of the layers that have a cross-attention block before them."""
        if self.cross_attention is None:
            return []
        return list(range(0, self.num_layers, self.cross_attention["every"]))

    def to_dict(self) -> dict:
        """The config as saved; options added for Whisper are left out at their defaults, so the
        configs of models without them stay as they were."""
        d = {k: v for k, v in asdict(self).items() if _NEW_OPTIONS.get(k, ()) != (v,)}
        if self.cross_attention is not None:
            d["cross_attention"] = {k: v for k, v in self.cross_attention.items()
                                    if _NEW_CROSS_OPTIONS.get(k, ()) != (v,)}
        return d

    def num_params(self, vocab_size: int = 0, tied: bool = True) -> int:
        hd, h, kv, d = self.head_dim, self.num_heads, self.num_kv_heads, self.dim
        norm = d * (2 if self.norm == "layer" else 1)
        attn = d * (h + 2 * kv) * hd + h * hd * d + (h + 2 * kv) * hd * self.qkv_bias + d * self.out_bias
        if self.mlp == "gelu":
            ffn = 2 * d * self.ffn_dim + self.ffn_dim + d
        else:
            ffn = 3 * d * self.ffn_dim
        cross = 0
        if self.cross_attention is not None:
            xa = self.cross_attention
            cross = 4 * d * h * hd + norm * (1 + xa["memory_norm"]) + (ffn + norm if xa["ffn"] else 0)
            cross += 3 * h * hd + d if xa["bias"] else 0
            cross += (2 if xa["ffn"] else 1) if xa["gated"] else 0
        positions = self.max_seq_len * d if self.positions == "learned" else 0
        return (self.num_layers * (attn + ffn + 2 * norm) + len(self.cross_layers()) * cross + norm
                + positions + vocab_size * d * (1 if tied else 2))


# Named sizes (torchtune / gpt-fast style). A recipe picks one and overrides only what varies.
SIZES: dict[str, dict] = {
    "debug": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=192),
    "tiny": dict(dim=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_dim=704),
    "small": dict(dim=512, num_layers=8, num_heads=8, num_kv_heads=4, ffn_dim=1408),
    "base": dict(dim=1024, num_layers=16, num_heads=16, num_kv_heads=8, ffn_dim=2816),
}


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary pairs over (t, h, w): 1/4, 3/8, 3/8 (16, 24, 24 of 64)."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def backbone_config(size: str, **overrides) -> BackboneConfig:
    """``backbone_config("tiny", max_seq_len=1024)``; ``None`` overrides are ignored."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return BackboneConfig(**{**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def _rope_inv_freq(cfg: BackboneConfig) -> torch.Tensor:
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "llama3":  # same formula as transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, llama3")


class Rotary(nn.Module):
    """cos/sin tables computed from explicit positions, so packed rows, left padding and M-RoPE all work."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        self.mrope_section = cfg.mrope_section
        self.register_buffer("inv_freq", _rope_inv_freq(cfg), persistent=False)

    def reset_buffers(self) -> None:
        with torch.no_grad():
            self.inv_freq.copy_(_rope_inv_freq(self.config))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) or (3, B, T) -> cos, sin of shape (B, 1, T, hd), float32."""
        pos = positions.float()
        if pos.dim() == 2:
            freqs = pos[..., None] * self.inv_freq  # (B, T, hd/2)
        else:
            # M-RoPE (Qwen2-VL): rotary pair i takes its angle from the t, h or w axis by section.
            per_axis = pos[..., None] * self.inv_freq  # (3, B, T, hd/2)
            if self.mrope_section is None:
                freqs = per_axis[0]
            else:
                chunks = per_axis.split(self.mrope_section, dim=-1)
                freqs = torch.cat([c[i] for i, c in enumerate(chunks)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Cross-attention memory

NO_SLOT = 2 ** 62  # the start of a memory column that is padding: no token ever reaches it


@dataclass
class Memory:
    """Media features the cross-attention blocks read.

    features (B, M, D); start (B, M): the sequence index from which a column's media span is
    visible (``NO_SLOT`` for padding); doc (B, M) or None: the packed document it belongs to.
    """

    features: torch.Tensor
    start: torch.Tensor
    doc: torch.Tensor | None = None
    _one_start: int | None = field(default=None, init=False, repr=False)

    def one_start(self) -> int:
        """The start every column shares (one span per row, all starting at the same index), or -1
        when they differ; computed once (one device sync), then kept."""
        if self._one_start is None:
            lo, hi = self.start.aminmax()
            self._one_start = int(lo) if int(lo) == int(hi) and int(lo) != NO_SLOT else -1
        return self._one_start

    def mask(self, past: int, T: int, doc_ids: torch.Tensor | None) \
            -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For the query indices ``past .. past+T-1``: the attention mask (B, 1, T, M), True =
        attend, and which queries read anything at all (B, T, 1). A query reads the columns of the
        latest span that starts at or before it, in its own document. (None, None) when every query
        reads every column (one span that starts at or before ``past``, no documents: Whisper's
        decoding steps), so attention runs unmasked."""
        if (doc_ids is None or self.doc is None) and 0 <= self.one_start() <= past:
            return None, None
        q = torch.arange(past, past + T, device=self.start.device)[None, :, None]
        starts = self.start[:, None, :]
        reached = starts <= q  # (B, T, M)
        latest = torch.where(reached, starts, -1).amax(-1, keepdim=True)
        visible = reached & (starts == latest)
        if doc_ids is not None and self.doc is not None:
            visible = visible & (self.doc[:, None, :] == doc_ids[:, :, None])
        reads = visible.any(-1, keepdim=True)
        # a query that reads nothing attends anywhere, then is zeroed
        return (visible | ~reads)[:, None], reads


class CrossAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        bias = cfg.cross_attention["bias"]
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=bias)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.num_heads * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=bias)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, M, hd), contiguous: computed once per prompt and read at every
        decoding step, where SDPA on CPU reads the strided views about 3x slower."""
        B, M, _ = memory.shape
        k, v = self.wkv(memory).view(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k.contiguous(), v.contiguous()

    def forward(self, x, kv, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


# what selective checkpointing keeps: the outputs of matmuls and attention (their recompute would
# cost FLOPs); norms, rotary, activations and casts are recomputed (torchtitan's op-level policy)
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
              torch.ops.higher_order.flex_attention}


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def checkpointed(module: nn.Module, fn, *args):
    """``fn(*args)``, under activation checkpointing when ``module`` trains with
    ``module.checkpointing`` set (``blocks``: keep only the inputs; ``selective``: keep what
    :data:`_SAVED_OPS` computes too). Called inside the block's forward, so that a compiled
    block (``train.compile``) traces the checkpoint and its policy."""
    mode = module.checkpointing
    if mode == "none" or not (module.training and torch.is_grad_enabled()):
        return fn(*args)
    kw = {"context_fn": _selective_context} if mode == "selective" else {}
    return checkpoint(fn, *args, use_reentrant=False, **kw)


class CrossBlock(nn.Module):
    """norm -> cross-attention over the (normed) memory [-> norm -> MLP], each added to the
    residual stream, through ``tanh(gate)`` when gated (gates start at 0)."""

    checkpointing = "none"  # see checkpointed()

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        xa = cfg.cross_attention
        self.norm = make_norm(cfg)
        self.memory_norm = make_norm(cfg) if xa["memory_norm"] else nn.Identity()
        self.attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(1)) if xa["gated"] else None
        self.ffn_norm = make_norm(cfg) if xa["ffn"] else None
        self.ffn = make_mlp(cfg) if xa["ffn"] else None
        self.ffn_gate = nn.Parameter(torch.zeros(1)) if xa["ffn"] and xa["gated"] else None

    def memory_kv(self, memory: torch.Tensor):
        return self.attn.memory_kv(self.memory_norm(memory))

    def forward(self, *args):
        return checkpointed(self, self._forward, *args)

    def _forward(self, x, kv, mask, reads):
        """``mask``, ``reads``: :meth:`Memory.mask`'s (None, None: every query reads everything)."""
        h = self.attn(self.norm(x), kv, mask)
        if reads is not None:
            h = h * reads.to(x.dtype)
        x = x + (h if self.attn_gate is None else torch.tanh(self.attn_gate).to(x.dtype) * h)
        if self.ffn is not None:
            h = self.ffn(self.ffn_norm(x))
            if reads is not None:
                h = h * reads.to(x.dtype)
            x = x + (h if self.ffn_gate is None else torch.tanh(self.ffn_gate).to(x.dtype) * h)
        return x


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for every layer plus which cached positions are real (not padding).

    ``k[layer], v[layer]: (B, Hkv, S_max, hd)``, one tensor per layer (a compiled step updates
    each in place); ``valid: (B, S_max)``; ``length``: positions filled so far. After
    ``make_static``, ``slot`` is ``length`` as a tensor and :meth:`Backbone.decode` steps run on it.
    """

    def __init__(self, cfg: BackboneConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.num_valid = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # real tokens per row
        self.max_len = max_len
        self.length = 0
        self.slot: torch.Tensor | None = None  # (1,): where a static step writes its keys/values
        self.has_padding = False
        self.memory: Memory | None = None  # cross-attention memory, set by the prompt pass
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> memory keys/values
        self.cross_mask: tuple | None = None  # Memory.mask of the decoding steps, set by make_static

    def make_static(self) -> None:
        """From now on, write at ``slot`` and attend over all ``max_len`` slots (a mask hides the
        unfilled ones): the same shapes at every step, for :meth:`Backbone.decode`."""
        self.slot = torch.tensor([self.length], device=self.valid.device)
        if self.memory is not None:  # every media span lies in the prompt: one mask for every step
            self.cross_mask = self.memory.mask(self.length, 1, None)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mark_padding(self, key_padding: torch.Tensor) -> None:
        """Record which of the next ``key_padding.shape[1]`` positions are real (True) or padding."""
        n = key_padding.shape[1]
        self.valid[:, self.length:self.length + n] = key_padding
        self.has_padding = self.has_padding or not bool(key_padding.all())

    def advance(self, n: int, key_padding: torch.Tensor | None) -> None:
        """Count ``n`` new positions (``key_padding`` says which are real) once every layer has them."""
        self.length += n
        self.num_valid += n if key_padding is None else key_padding.sum(-1, keepdim=True)
        if self.slot is not None:
            self.slot += n

    def narrow(self, num_rows: int) -> KVCache:
        """The first ``num_rows`` rows as a cache sharing this one's storage, ``slot`` included
        (continuous batching decodes its live rows only, which it keeps at the front)."""
        out = copy.copy(self)
        out.k, out.v = [k[:num_rows] for k in self.k], [v[:num_rows] for v in self.v]
        out.valid, out.num_valid = self.valid[:num_rows], self.num_valid[:num_rows]
        return out

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep, repeat or permute the batch rows (beam search): row ``i`` becomes old row ``rows[i]``."""
        rows = rows.to(self.valid.device)
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid, self.num_valid = self.valid.index_select(0, rows), self.num_valid.index_select(0, rows)
        if self.memory is not None:
            m = self.memory
            self.memory = Memory(m.features.index_select(0, rows), m.start.index_select(0, rows),
                                 None if m.doc is None else m.doc.index_select(0, rows))
        self.cross_kv = {i: (k.index_select(0, rows), v.index_select(0, rows))
                         for i, (k, v) in self.cross_kv.items()}


# ---------------------------------------------------------------------------------------------
# Attention backends


def _sdpa(q, k, v, mask, is_causal):
    B, H, T, hd = q.shape
    kv = k.shape[1]
    if T == 1 and H != kv:
        # Decoding one token: fold the query heads that share a key/value head into the query
        # axis, (B, H, 1, hd) -> (B, Hkv, H/Hkv, hd), so keys/values are never repeated; a
        # (B, 1, 1, S) mask broadcasts over the folded axis.
        out = F.scaled_dot_product_attention(q.reshape(B, kv, H // kv, hd), k, v, attn_mask=mask)
        return out.reshape(B, H, 1, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=H != kv)


@functools.cache
def _xformers_problem(device: str) -> str | None:
    """Why xformers cannot attend on ``device``, or None. Importing is not enough: a wheel built
    for another torch/CUDA imports but has no kernels, so a tiny attention call is tried."""
    if not device.startswith("cuda"):
        return "xformers runs on CUDA devices only"
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 - any failure means: use SDPA
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return None


def _xformers(q, k, v, mask, is_causal):
    import xformers.ops as xops

    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants (B, T, H, hd)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        # xformers needs the bias's last dim aligned to 8 elements: allocate padded, then slice.
        S = bias.shape[-1]
        padded = bias.new_zeros(*bias.shape[:-1], (S + 7) // 8 * 8)[..., :S]
        padded.copy_(bias)
        attn_bias = padded.expand(q.shape[0], q.shape[2], q.shape[1], S)
    elif is_causal:
        attn_bias = xops.LowerTriangularMask()
    else:
        attn_bias = None
    return xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias).transpose(1, 2)


@functools.cache
def _flex_kernel(device_type: str):
    """``flex_attention``, compiled on CUDA (uncompiled it is a reference path that materialises
    the scores); on CPU as it is (forward only: PyTorch has no CPU backward for it)."""
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


@functools.cache
def _block_mask_builder(device_type: str):
    """``create_block_mask``, compiled on CUDA (torchtitan's way): eager, it evaluates the mask_mod
    over every (row, query, key) at once, gigabytes of temporaries for 32 rows of 2048."""
    return torch.compile(create_block_mask) if device_type == "cuda" else create_block_mask


def _flex(q, k, v, mask, is_causal):
    """FlexAttention for a :class:`BlockMask` (packed documents, padding; see
    :meth:`Backbone._block_mask`): blocks with nothing to attend are skipped, full blocks run
    unmasked. Any other mask (decoding on a cache, cross-attention) goes through SDPA."""
    if not isinstance(mask, BlockMask):
        return _sdpa(q, k, v, mask, is_causal)
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        # no CPU backward for FlexAttention: the same mask_mod, evaluated densely, through SDPA
        B, _, T, _ = q.shape
        dense = create_mask(mask.mask_mod, B, 1, T, k.shape[2], device=q.device)
        return _sdpa(q, k, v, dense, False)
    return _flex_kernel(q.device.type)(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def resolve_backend(name: str, device: torch.device):
    if name == "flex":
        return _flex
    if name == "xformers":
        problem = _xformers_problem(str(device))
        if problem is None:
            return _xformers
        log.warning("attn_backend=xformers unusable (%s); falling back to sdpa", problem)
    return _sdpa


# ---------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 like transformers' LlamaRMSNorm, then cast back.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(cfg: BackboneConfig) -> nn.Module:
    """``norm: rms`` -> RMSNorm; ``layer`` -> LayerNorm with bias."""
    return RMSNorm(cfg.dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.dim, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                              bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.attend = _sdpa

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd],
                                     dim=-1)
        q = q.view(B, T, self.num_heads, hd).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, hd).transpose(1, 2)
        if cos is not None:  # rotary positions (learned ones were added to the input)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(B, T, self.num_kv_heads, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self.attend(q, k, v, mask, is_causal)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections, fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """fc1 -> GELU -> fc2, with biases (Whisper's, GPT-2's)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


def make_mlp(cfg: BackboneConfig) -> nn.Module:
    return SwiGLU(cfg.dim, cfg.ffn_dim) if cfg.mlp == "swiglu" else GeluMLP(cfg.dim, cfg.ffn_dim)


class Block(nn.Module):
    checkpointing = "none"  # see checkpointed()

    def __init__(self, cfg: BackboneConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = make_norm(cfg)
        self.ffn = make_mlp(cfg)

    def forward(self, *args):
        return checkpointed(self, self._forward, *args)

    def _forward(self, x, cos, sin, mask, is_causal, cache, cross=None):
        """``cross``: (CrossBlock, its arguments) to run between self-attention and the MLP (Whisper)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        if cross is not None:
            x = cross[0](x, *cross[1:])
        return x + self.ffn(self.ffn_norm(x))


class Backbone(nn.Module):
    """Embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        self.rotary = Rotary(cfg)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.cross = nn.ModuleDict({str(i): CrossBlock(cfg) for i in cfg.cross_layers()})
        self.norm = make_norm(cfg)
        self.set_attn_backend(cfg.attn_backend)

    def set_attn_backend(self, name: str, device: torch.device | None = None) -> None:
        device = device or (self.norm.weight.device)
        fn = resolve_backend(name, device)
        self.uses_flex = fn is _flex
        for layer in self.layers:
            layer.attn.attend = fn

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none``, ``blocks`` (every block and cross-attention block recomputed in the backward
        pass) or ``selective`` (only their elementwise work recomputed); training only."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        for block in [*self.layers, *self.cross.values()]:
            block.checkpointing = mode

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, std), residual output projections scaled by 1/sqrt(2L)."""
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("wo.weight", "w2.weight")) else std)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: Memory | None = None) -> torch.Tensor:
        """Run the blocks.

        doc_ids (B, T): packed rows; tokens attend only within their own document.
        key_padding (B, T): False marks padding tokens (left padding in batched prompts).
        cache: decode with a KV cache; the new tokens are appended after ``cache.length``.
        memory: media features for the cross-attention blocks; with a cache, the prompt pass's
        memory is kept in it for the decoding steps.
        """
        B, T, _ = x.shape
        cos = sin = None
        if self.pos_embed is not None:  # learned absolute positions (1-D: M-RoPE's time axis)
            x = x + self.pos_embed(positions if positions.dim() == 2 else positions[0])
        else:
            cos, sin = self.rotary(positions)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.uses_flex and cache is None and (doc_ids is not None or key_padding is not None):
            mask, is_causal = self._block_mask(B, T, x.device, doc_ids, key_padding), False
        else:
            mask, is_causal = self._mask(B, T, x.device, doc_ids, key_padding, cache)
        cross = self._cross_inputs(T, doc_ids, cache, memory)
        xa_cfg = self.config.cross_attention
        inside = xa_cfg is not None and xa_cfg["placement"] == "after_attn"
        for i, layer in enumerate(self.layers):
            xa = None
            if cross is not None and str(i) in self.cross:
                xa = (self.cross[str(i)], cross[0](i), *cross[1:])
            if xa is not None and not inside:
                x = xa[0](x, *xa[1:])
            x = layer(x, cos, sin, mask, is_causal, cache, xa if inside else None)
        if cache is not None:
            cache.advance(T, key_padding)
        return self.norm(x)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row, ``x (B, 1, D)``, on a static cache (``KVCache.make_static``):
        keys/values go to ``cache.slot`` and a mask (real, filled slots) stands in for slicing, so
        every step has the same shapes and ``torch.compile`` traces it once. The caller advances
        the cache. Cross-attention blocks read the prompt's memory through the keys/values the
        prompt pass cached (``cache.cross_kv``) and the mask ``make_static`` fixed."""
        cos = sin = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions if positions.dim() == 2 else positions[0])
        else:
            cos, sin = self.rotary(positions)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        filled = torch.arange(cache.max_len, device=x.device) <= cache.slot
        mask = (cache.valid & filled)[:, None, None, :]
        xa_cfg = self.config.cross_attention
        inside = xa_cfg is not None and xa_cfg["placement"] == "after_attn"
        reading = len(self.cross) and cache.memory is not None
        for i, layer in enumerate(self.layers):
            xa = None
            if reading and str(i) in self.cross:
                xa = (self.cross[str(i)], cache.cross_kv[i], *cache.cross_mask)
                if not inside:
                    x = xa[0](x, *xa[1:])
            x = layer(x, cos, sin, mask, False, cache, xa if inside else None)
        return self.norm(x)

    def _cross_inputs(self, T, doc_ids, cache, memory):
        """(layer -> memory keys/values, mask, reads) for the cross-attention blocks, or None."""
        if not len(self.cross):
            if memory is not None:
                raise ValueError("this backbone has no cross-attention blocks to read a memory")
            return None
        if cache is not None:
            if memory is not None:
                cache.memory, cache.cross_kv = memory, {}
            memory = cache.memory
        if memory is None:
            return None  # text only: the cross-attention blocks have nothing to read
        past = cache.length if cache is not None else 0
        mask, reads = memory.mask(past, T, doc_ids)
        features = memory.features

        def kv(i: int):
            if cache is None:
                return self.cross[str(i)].memory_kv(features)
            if i not in cache.cross_kv:
                cache.cross_kv[i] = self.cross[str(i)].memory_kv(features)
            return cache.cross_kv[i]

        return kv, mask, reads

    @staticmethod
    def _block_mask(B, T, device, doc_ids, key_padding) -> BlockMask:
        """:meth:`_mask`'s rule for a forward without a cache, as FlexAttention's block mask:
        causal, within a document, real keys only (a padding query sees itself)."""
        def mask_mod(b, h, q, kv):
            keep = q >= kv
            if doc_ids is not None:
                keep = keep & (doc_ids[b, q] == doc_ids[b, kv])
            if key_padding is not None:
                keep = keep & (key_padding[b, kv] | (q == kv))
            return keep

        return _block_mask_builder(device.type)(mask_mod, B, None, T, T, device=device)

    @staticmethod
    def _mask(B, T, device, doc_ids, key_padding, cache):
        """Boolean attention mask (B, 1, T, S), True = attend; or None with is_causal for the fast path."""
        past = cache.length if cache is not None else 0
        if cache is not None:
            if cache.length + T > cache.max_len:
                raise ValueError(f"KV cache is full: {cache.length} + {T} tokens "
                                 f"exceed its {cache.max_len} slots")
            if key_padding is not None:
                cache.mark_padding(key_padding)
            padded = cache.has_padding
        else:
            padded = key_padding is not None and not bool(key_padding.all())
        if doc_ids is None and not padded:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new token attends to everything cached
        S = past + T
        q_pos = torch.arange(past, S, device=device)
        mask = (q_pos[:, None] >= torch.arange(S, device=device)[None, :])[None].expand(B, T, S)
        if doc_ids is not None:
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
        if padded:
            valid = cache.valid[:, :S] if cache is not None else key_padding
            mask = mask & valid[:, None, :]
            # A padding query row would attend to nothing (NaN softmax): let it see itself.
            mask = mask | (q_pos[:, None] == torch.arange(S, device=device)[None, :])[None]
        return mask[:, None], False
