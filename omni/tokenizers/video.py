"""Video tokenizer: sampled frames -> per-frame image features -> temporal handling.

Frames come from :class:`omni.media.video.Video` (``num_frames`` / ``fps`` sampling); each frame
goes through the image tokenizer (same preprocessing and resize as images). Then, by ``temporal``:

- ``"mrope"`` (Qwen2-VL): every patch token is kept; ``grid = (N, h, w)`` so the backbone's
  M-RoPE gives each token (time, row, column). Time is the frame's timestamp when
  ``positions_per_second`` is set (Qwen2.5-VL's absolute time: ``round(seconds from the first
  sampled frame * positions_per_second)``, see :meth:`VideoTokenizer.time_offsets`), so a 2-fps
  and an 8-fps sampling of one clip place a moment at the same position; unset (``None``, what
  checkpoints written before the key keep), time is the frame's index.
- ``"qformer"`` (VideoLLaMA): a learned frame position embedding is added to every patch of a
  frame (plus a fixed 2-D sin-cos position per patch when the image tokenizer has none, e.g.
  ``patchify``), then a video Q-Former (:class:`omni.model.connectors.QFormer`) reads all
  ``N * h * w`` features and emits ``num_queries`` = M tokens, ``grid = (M, 1, 1)``: a 1-D run of
  positions, as for text (the time order now lives inside the queries, not in the positions).

Sampling (:meth:`VideoTokenizer.load`, the rule of :mod:`omni.media.video`): ``num_frames`` evenly
spaced frames, or with ``fps`` about that many frames a second of the clip, at most ``max_frames``
(then ``num_frames`` is not used). ``max_frames`` is also a budget: a video given as frames with
more of them is refused.

Budgets are checked **before** any resize or forward pass (``check_budget``), with the numbers in
the message, because a too-long video is the usual way to run out of memory. They count frames,
pixels per frame after resizing, and patch tokens through the image encoder (the activations
that grow with video length): ``N x (H'/patch) x (W'/patch)``.

``time_positions=False`` removes time information, for the temporal ablation:

- ``qformer``: no frame position embeddings. The Q-Former's cross-attention is
  permutation-invariant over its inputs, so frame order is then invisible.
- ``mrope``: the frames are put in a random order before encoding (time index = slot, not
  time). Only sharing one time index would not be enough: in a causal decoder, the order of the
  frames in the sequence still tells time (a token sees the frames before it, not after).
  Pass ``generator=`` to :meth:`VideoTokenizer.encode` for a reproducible order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni.media.image import describe
from omni.media.video import Video
from omni.model.connectors import QFormer
from omni.tokenizers.base import BaseVideoTokenizer
from omni.tokenizers.image import ImageTokenizer

TEMPORAL = ("mrope", "qformer")


@dataclass
class VideoTokenizerConfig:
    """Recipe section ``video_tokenizer:`` (the per-frame encoder is ``image_tokenizer:``)."""

    num_frames: int = 8
    fps: float | None = None
    temporal: str = "mrope"
    time_positions: bool = True
    max_frames: int = 64
    max_pixels_per_frame: int = 1024 * 1024
    max_total_tokens: int = 16384
    num_queries: int = 32  # qformer: tokens per video
    qformer_layers: int = 2
    qformer_heads: int = 4
    positions_per_second: float | None = None  # mrope: time positions from timestamps; None: frame index
    frame_diff: bool = False  # each token also carries its change since the previous frame (motion)

    def validate(self) -> None:
        if self.temporal not in TEMPORAL:
            raise ValueError(f"video_tokenizer.temporal must be one of {', '.join(TEMPORAL)}; "
                             f"got {self.temporal!r}")
        for key in ("num_frames", "max_frames", "max_pixels_per_frame", "max_total_tokens", "num_queries",
                    "qformer_layers", "qformer_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"video_tokenizer.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("fps", "positions_per_second"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise ValueError(f"video_tokenizer.{key} must be > 0 (or null), got {value!r}")
        if self.fps is None and self.num_frames > self.max_frames:  # with fps, max_frames caps the count
            raise ValueError(f"video_tokenizer.num_frames ({self.num_frames}) exceeds "
                             f"max_frames ({self.max_frames})")


def _sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE style), (h*w, dim): a quarter of the channels each for
    sin/cos of the row and of the column; channels beyond a multiple of 4 are zero."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / max(q, 1))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    out = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


class VideoTokenizer(BaseVideoTokenizer):
    """Frames -> features for one video. ``encode(frames uint8 (N, 3, H, W))`` gives
    ``(features (T, out_dim), grid (t, h, w))`` with ``t * h * w = T``."""

    def __init__(self, image_tokenizer: ImageTokenizer, num_frames: int = 8, fps: float | None = None,
                 temporal: str = "mrope", time_positions: bool = True, max_frames: int = 64,
                 max_pixels_per_frame: int = 1024 * 1024, max_total_tokens: int = 16384,
                 num_queries: int = 32, qformer_layers: int = 2, qformer_heads: int = 4,
                 frame_batch_size: int = 16, positions_per_second: float | None = None,
                 frame_diff: bool = False):
        super().__init__()
        VideoTokenizerConfig(num_frames, fps, temporal, time_positions, max_frames, max_pixels_per_frame,
                             max_total_tokens, num_queries, qformer_layers, qformer_heads,
                             positions_per_second, frame_diff).validate()
        self.positions_per_second, self.frame_diff = positions_per_second, frame_diff
        self.image_tokenizer = image_tokenizer
        self._num_frames, self._fps = num_frames, fps
        self.temporal, self.time_positions = temporal, time_positions
        self.max_frames, self.max_total_tokens = max_frames, max_total_tokens
        self.max_pixels_per_frame = max_pixels_per_frame
        self.frame_batch_size = frame_batch_size
        d = self.out_dim
        self.frame_pos = self.qformer = None
        if temporal == "qformer":
            if time_positions:
                self.frame_pos = nn.Embedding(max_frames, d)  # VideoLLaMA's learned frame positions
                nn.init.normal_(self.frame_pos.weight, std=0.02)
            self.qformer = QFormer(d, d, num_queries=num_queries, num_layers=qformer_layers,
                                   num_heads=qformer_heads)

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def out_dim(self) -> int:
        return self.image_tokenizer.out_dim * (2 if self.frame_diff else 1)

    def load(self, path, start: float | None = None, end: float | None = None,
             backend: str = "auto") -> Video:
        """The video at ``path`` (``start`` / ``end`` in seconds) with this tokenizer's frame sampling."""
        return Video(path, num_frames=None if self.fps else self.num_frames, fps=self.fps,
                     max_frames=self.max_frames, start=start, end=end, backend=backend)

    def time_offsets(self, timestamps: torch.Tensor) -> torch.Tensor | None:
        """Each sampled frame's M-RoPE time position, counted from the first frame's, from its
        timestamp (seconds, ``(N,)``): ``floor(s * positions_per_second + 0.5)`` (N,) long; ``None``
        where time is the frame index (no ``positions_per_second``, the Q-Former, or the
        ``time_positions=False`` ablation, whose frames are shuffled)."""
        if self.positions_per_second is None or self.temporal != "mrope" or not self.time_positions:
            return None
        seconds = timestamps.double() - timestamps[0]
        return torch.floor(seconds * self.positions_per_second + 0.5).long()

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Tokens this video adds to the sequence (after merging / the Q-Former)."""
        if self.temporal == "qformer":
            return self.qformer.num_queries
        h, w = self.image_tokenizer.grid_for(*self.image_tokenizer.target_size(height, width))
        return num_frames * h * w

    def check_budget(self, num_frames: int, height: int, width: int) -> int:
        """Raise ``ValueError`` with the numbers when ``num_frames`` frames of ``height x width``
        would exceed a budget; returns the patch tokens through the encoder. Runs no model."""
        if num_frames > self.max_frames:
            raise ValueError(f"{num_frames} frames exceeds max_frames={self.max_frames}; "
                             f"lower num_frames or fps")
        th, tw = self.image_tokenizer.target_size(height, width)
        if th * tw > self.max_pixels_per_frame:
            raise ValueError(f"each frame is {th}x{tw} = {th * tw} pixels after resizing, over "
                             f"max_pixels_per_frame={self.max_pixels_per_frame}; lower the image tokenizer's "
                             f"image_size or max_pixels")
        p = self.image_tokenizer.patch_size
        per_frame = (th // p) * (tw // p)
        total = num_frames * per_frame
        if total > self.max_total_tokens:
            raise ValueError(f"{num_frames} frames x {per_frame} tokens = {total} tokens exceeds "
                             f"max_total_tokens={self.max_total_tokens}; lower num_frames or the resolution")
        return total

    def encode(self, frames: torch.Tensor | Video, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """frames: uint8 ``(N, 3, H, W)`` (or a :class:`Video`) -> ``(features (T, out_dim), grid)``."""
        if isinstance(frames, Video):
            frames = frames.frames
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 \
                or frames.shape[1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"expected frames as a non-empty uint8 tensor (N, 3, H, W), "
                             f"got {describe(frames)}")
        pixels, grid = self.preprocess(frames, generator)
        return self.encode_pixels([pixels])[0], grid

    def preprocess(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                   normalize: bool = True) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames (N, 3, H, W) -> normalised pixels (N, 3, H', W') and the token grid; budgets are
        checked first. Without time positions (mrope) the frames are shuffled here. ``normalize=False``:
        the image tower's :meth:`resize` pixels (uint8 for omni's towers), which
        :meth:`frame_features` normalises on the tower's device."""
        n = frames.shape[0]
        self.check_budget(n, frames.shape[2], frames.shape[3])
        if self.temporal == "mrope" and not self.time_positions:
            frames = frames[torch.randperm(n, generator=generator)]
        tok = self.image_tokenizer
        pixels, grid = tok.preprocess(frames) if normalize else tok.resize(frames)
        if self.temporal == "qformer":
            grid = (self.qformer.num_queries, 1, 1)
        return pixels, grid

    def encode_pixels(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed videos (each (N_i, 3, H', W')) -> features per video."""
        return [self.video_tokens(f) for f in self.frame_features(videos)]

    def frame_features(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed videos (each (N_i, 3, H', W'), normalised or uint8) -> the image tower's
        features per video, ``(N_i, h, w, D)``; the frames of all videos go through the tower
        together, ``frame_batch_size`` at a time."""
        param = next(self.image_tokenizer.parameters(), None)
        pixels = torch.cat(videos)
        if param is not None:
            pixels = self.image_tokenizer.normalize(pixels.to(param.device), param.dtype)
        feats_all = torch.cat([self.image_tokenizer(chunk) for chunk in pixels.split(self.frame_batch_size)])
        h, w = self.image_tokenizer.grid_for(*pixels.shape[-2:])
        feats_all = feats_all.reshape(len(pixels), h, w, -1)
        return list(feats_all.split([v.shape[0] for v in videos]))

    def video_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, h, w, D) per-frame features (:meth:`frame_features`) -> the video's tokens. With
        ``frame_diff`` each token is ``[f_t, f_t - f_(t-1)]`` (``2D``; the first frame's change is 0):
        a frozen tower's features say what is where, their differences where something moved
        from and to, which the language model would otherwise have to work out across frames."""
        n, h, w, _ = feats.shape
        feats = feats.reshape(n, h * w, -1)
        if self.frame_diff:
            feats = torch.cat([feats, feats - torch.cat([feats[:1], feats[:-1]])], -1)
        if self.temporal == "mrope":
            return feats.reshape(n * h * w, -1)
        if not self.image_tokenizer.has_positions:
            feats = feats + _sincos_2d(h, w, feats.shape[-1]).to(feats)
        if self.frame_pos is not None:
            feats = feats + self.frame_pos.weight[:n, None, :]
        return self.qformer(feats.reshape(1, n * h * w, -1))[0]  # (M, D)


def build_video_tokenizer(cfg: VideoTokenizerConfig, image_tokenizer: ImageTokenizer) -> VideoTokenizer:
    cfg.validate()
    return VideoTokenizer(image_tokenizer, num_frames=cfg.num_frames, fps=cfg.fps, temporal=cfg.temporal,
                          time_positions=cfg.time_positions, max_frames=cfg.max_frames,
                          max_pixels_per_frame=cfg.max_pixels_per_frame,
                          max_total_tokens=cfg.max_total_tokens,
                          num_queries=cfg.num_queries, qformer_layers=cfg.qformer_layers,
                          qformer_heads=cfg.qformer_heads, positions_per_second=cfg.positions_per_second,
                          frame_diff=cfg.frame_diff)
