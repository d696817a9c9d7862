"""Multi-codebook audio in one token sequence.

A codec gives ``codes: (K, T)`` (K residual codebooks, T frames). Two ways to lay them out:

``flatten`` (AudioLM's coarse/fine order): one token per code, frame-major
``c0[0] c1[0] .. c(K-1)[0] c0[1] ..``. Plain next-token prediction; K times longer sequences.

``delay`` (MusicGen): K parallel *streams* per sequence step; stream k at step t carries codebook
k of frame ``t - k``. Step t's embedding is the sum of its streams' embeddings and one head per
codebook predicts each stream, so a frame costs one step and codebook k still sees codebooks
< k of the same frame. ``T`` frames take ``T + K - 1`` steps; cells outside the frame range are
``EMPTY``.

Ids here are *codebook-local* (0..cardinality-1) unless a function says it adds vocabulary
offsets (see :class:`omni.vocab.Vocab.codebook_range`).
"""

from __future__ import annotations

import torch

EMPTY = -1  # a delay-pattern cell with no code (before a stream starts / after it ends)
PATTERNS = ("delay", "flatten")


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32):
        raise ValueError("codes must be an integer tensor of shape (K, T), "
                         f"got {tuple(codes.shape)} {codes.dtype}")


def delay_apply(codes: torch.Tensor) -> torch.Tensor:
    """codes (K, T) -> (K, T + K - 1) with stream k shifted right by k; EMPTY elsewhere."""
    _check_codes(codes)
    K, T = codes.shape
    out = torch.full((K, T + K - 1), EMPTY, dtype=torch.long)
    for k in range(K):
        out[k, k:k + T] = codes[k]
    return out


def delay_revert(pattern: torch.Tensor) -> torch.Tensor:
    """(K, S) delay layout -> codes (K, S - K + 1): the frames every stream has reached."""
    K, S = pattern.shape
    T = S - K + 1
    if T < 0:
        raise ValueError(f"a delay pattern of {S} steps cannot hold {K} codebooks")
    return torch.stack([pattern[k, k:k + T] for k in range(K)]) if K else pattern[:, :0]


def flatten_apply(codes: torch.Tensor) -> torch.Tensor:
    """codes (K, T) -> (K*T,) frame-major codebook-local ids."""
    _check_codes(codes)
    return codes.T.reshape(-1).long()


def flatten_revert(flat: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """(K*T,) -> codes (K, T). A trailing partial frame is dropped."""
    T = flat.shape[0] // num_codebooks
    return flat[:T * num_codebooks].reshape(T, num_codebooks).T.contiguous()


def to_vocab(local: torch.Tensor, codebook: torch.Tensor | int, vocab) -> torch.Tensor:
    """Codebook-local ids -> unified-vocabulary ids (EMPTY stays EMPTY)."""
    offset = vocab.text_size + torch.as_tensor(codebook) * vocab.codebook_size
    return torch.where(local == EMPTY, local, local + offset)


def from_vocab(ids: torch.Tensor, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Unified ids of audio codes -> (codebook index, codebook-local id)."""
    rel = ids - vocab.text_size
    return rel // vocab.codebook_size, rel % vocab.codebook_size

