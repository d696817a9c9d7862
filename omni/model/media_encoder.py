"""Media encoders: one modality's tokenizer/encoder plus a connector to the model width.

``prepare(obj) -> (data, grid)`` runs in the data pipeline: it decodes and preprocesses a media
object into the tensor a :class:`~omni.sequence.MediaSlot` carries, and says how many tokens
(as a ``(t, h, w)`` grid) the encoder will produce for it, without running the network.
``forward(list of data) -> list of (N_i, dim)`` runs inside the model, so towers can be frozen
or trained end to end.

Config (``OmniConfig.media[modality]``, a recipe's ``model.media.<modality>``)::

    image: {tokenizer: ImageTokenizerConfig fields, connector: ConnectorConfig fields}
    video: {tokenizer: ImageTokenizerConfig fields, video: VideoTokenizerConfig fields, connector: ...}
    audio: {encoder: {kind: whisper_style|hf_whisper, size, n_mels, path, freeze, input_mode}, connector: ...}
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import from_dict

MODALITIES = ("image", "video", "audio")
AUDIO_SAMPLE_RATE = 16000  # the log-mel front end's rate (Whisper)


def _section(cfg: dict, key: str, modality: str) -> dict:
    value = cfg.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"model.media.{modality}.{key} must be a mapping, got {value!r}")
    return value


def _connector(cfg: dict, modality: str, in_dim: int, dim: int):
    from omni.model.connectors import ConnectorConfig

    ccfg = from_dict(ConnectorConfig, _section(cfg, "connector", modality), f"model.media.{modality}.connector.")
    return ccfg.build(in_dim, dim)


def _check_keys(cfg: dict, modality: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key model.media.{modality}.{unknown[0]}; allowed: {', '.join(allowed)}")


class MediaEncoder(nn.Module):
    """Base: ``connector`` maps the encoder's features to the model width."""

    modality = ""

    def prepare(self, obj) -> tuple[torch.Tensor, tuple[int, int, int]]:
        raise NotImplementedError

    def _connect(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.connector(feats, mask)


class ImageEncoder(MediaEncoder):
    modality = "image"

    def __init__(self, cfg: dict, dim: int):
        super().__init__()
        from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer

        _check_keys(cfg, "image", ("tokenizer", "connector"))
        tcfg = from_dict(ImageTokenizerConfig, _section(cfg, "tokenizer", "image"), "model.media.image.tokenizer.")
        self.tokenizer = build_image_tokenizer(tcfg)
        self.connector = _connector(cfg, "image", self.tokenizer.out_dim, dim)

    def prepare(self, obj):
        from omni.media.image import Image

        if isinstance(obj, (str, Path)):
            obj = Image(obj)
        pixels, grid = self.tokenizer.preprocess(obj)  # (3, H', W'), (1, h, w)
        return pixels, self.connector.grid(grid)

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(datas)
        by_shape: dict[tuple, list[int]] = {}
        for i, d in enumerate(datas):
            by_shape.setdefault(tuple(d.shape), []).append(i)
        for idx in by_shape.values():  # same-size images run as one batch
            feats = self._connect(self.tokenizer(torch.stack([datas[i] for i in idx])))
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out


class VideoEncoder(MediaEncoder):
    modality = "video"

    def __init__(self, cfg: dict, dim: int):
        super().__init__()
        from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer
        from omni.tokenizers.video import VideoTokenizerConfig, build_video_tokenizer

        _check_keys(cfg, "video", ("tokenizer", "video", "connector"))
        tcfg = from_dict(ImageTokenizerConfig, _section(cfg, "tokenizer", "video"), "model.media.video.tokenizer.")
        vcfg = from_dict(VideoTokenizerConfig, _section(cfg, "video", "video"), "model.media.video.video.")
        self.video = build_video_tokenizer(vcfg, build_image_tokenizer(tcfg))
        self.connector = _connector(cfg, "video", self.video.out_dim, dim)

    def prepare(self, obj):
        """A :class:`~omni.media.video.Video` or a path (sampled with the recipe's frame settings) ->
        normalised frames (N, 3, H', W'); budgets are checked here, before any forward pass."""
        from omni.media.video import Video

        if isinstance(obj, (str, Path)):
            obj = self.video.load(obj)
        frames = obj.frames if isinstance(obj, Video) else obj
        pixels, grid = self.video.preprocess(frames)  # resized and normalised once, here
        return pixels, self.connector.grid(grid)

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._connect(f[None])[0] for f in self.video.encode_pixels(datas)]


class AudioEncoder(MediaEncoder):
    """Whisper-style input: 16 kHz waveform -> log-mel -> encoder -> connector."""

    modality = "audio"

    def __init__(self, cfg: dict, dim: int):
        super().__init__()
        from omni.tokenizers.audio import LogMel, audio_encoder

        _check_keys(cfg, "audio", ("encoder", "connector"))
        ecfg = dict(_section(cfg, "encoder", "audio"))
        self.encoder = audio_encoder(**ecfg)
        self.logmel = LogMel(n_mels=self.encoder.n_mels)
        self.connector = _connector(cfg, "audio", self.encoder.out_dim, dim)

    def prepare(self, obj):
        """An :class:`~omni.media.audio.Audio`, a path, or a 16 kHz waveform (T,) -> log-mel (n_mels, F)."""
        from omni.media.audio import Audio

        if isinstance(obj, (str, Path)):
            obj = Audio(obj)
        wave = obj.resample(AUDIO_SAMPLE_RATE).waveform if isinstance(obj, Audio) else obj
        if wave.shape[-1] < self.logmel.hop_length:
            wave = F.pad(wave, (0, self.logmel.hop_length - wave.shape[-1]))
        mel = self.logmel(wave.float())
        n = self.encoder.num_tokens(mel.shape[-1])
        return mel, self.connector.grid((n, 1, 1))

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        lengths = torch.tensor([d.shape[-1] for d in datas])
        longest = int(lengths.max())
        mel = torch.stack([F.pad(d, (0, longest - d.shape[-1]), value=float(d.min())) for d in datas])
        from omni.tokenizers.audio import WhisperStyleEncoder

        # ours masks the padding frames out of attention; transformers' pads to 30 s itself
        kwargs = {"mel_lengths": lengths} if isinstance(self.encoder, WhisperStyleEncoder) else {}
        feats = self.encoder(mel, **kwargs)  # (B, N_max, D)
        n = torch.tensor([self.encoder.num_tokens(int(f)) for f in lengths])
        mask = torch.arange(feats.shape[1])[None, :] < n[:, None]
        out = self._connect(feats, mask.to(feats.device))
        if out.shape[1] == feats.shape[1]:  # per-token connector: keep each clip's real tokens
            return [out[i, :int(n[i])] for i in range(len(datas))]
        return list(out)


ENCODERS = {"image": ImageEncoder, "video": VideoEncoder, "audio": AudioEncoder}


def build_media_encoder(modality: str, cfg: dict, dim: int) -> MediaEncoder:
    if modality not in ENCODERS:
        raise ValueError(f"unknown media modality {modality!r} in model.media; choose from {', '.join(ENCODERS)}")
    if not isinstance(cfg, dict):
        raise ValueError(f"model.media.{modality} must be a mapping, got {cfg!r}")
    return ENCODERS[modality](cfg, dim)
