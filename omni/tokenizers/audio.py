"""Audio tokenizers: EnCodec codes out (``AudioCodec``), log-mel features in (``LogMel`` + encoders).

``AudioCodec`` wraps the ``encodec`` package's ``EncodecModel`` (SEANet encoder/decoder + residual
vector quantizer) behind omni's tokenizer contract: ``encode(wave) -> codes (K, T')``,
``decode(codes) -> wave``, ``sample_rate``, ``frame_rate``, ``num_codebooks``, ``cardinality``.
Its architecture is a :class:`CodecConfig` picked by name from ``CODEC_PRESETS``; weights come
from omni's own training (``omni.train.codec``), from a checkpoint in the encodec
package's format, or from a local transformers ``EncodecModel`` directory (weights mapped into the
encodec package's model, codes identical to transformers').

``LogMel`` is Whisper's front end in batched torch. ``WhisperStyleEncoder`` (ours, Whisper layout)
and ``HFWhisperEncoder`` (transformers' ``WhisperEncoder``, from a config or a local checkpoint)
turn log-mels into features ``(B, N, D)`` for a connector.

Legend: ``B`` batch, ``C`` audio channels, ``T`` samples, ``K`` codebooks, ``T'`` codec frames,
``F`` mel frames, ``N`` encoder features, ``D`` feature width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.io import atomic_dir, atomic_write_json, load_tensors, save_tensors
from omni.media.audio import Audio
from omni.metrics import mel_filters
from omni.schema import from_dict
from omni.tokenizers.base import (
    AUDIO_ENCODERS,
    CODECS,
    MEL_HOP_LENGTH,
    MEL_SAMPLE_RATE,
    BaseAudioEncoder,
    BaseCodec,
)

FORMAT_VERSION = 1
ENCODEC_INSTALL = "pip install encodec"


# ---------------------------------------------------------------------------------------------
# Codec architecture


@dataclass
class CodecConfig:
    """An EnCodec architecture in the ``encodec`` package's terms; the defaults are
    ``EncodecModel.encodec_model_24khz``. ``num_quantizers`` RVQ stages are built; ``encode``
    emits the first ``num_codebooks`` of them (fewer codebooks = lower bitrate, shorter LM rows)."""

    sample_rate: int = 24000
    channels: int = 1
    ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])  # decoder order; hop = product
    n_filters: int = 32
    dimension: int = 128
    n_residual_layers: int = 1
    lstm: int = 2
    codebook_size: int = 1024
    num_quantizers: int = 32
    num_codebooks: int = 8
    causal: bool = True
    norm: str = "weight_norm"
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    true_skip: bool = False
    pad_mode: str = "reflect"
    trim_right_ratio: float = 1.0

    def validate(self, prefix: str = "codec."):
        ints = ("sample_rate", "n_filters", "dimension", "n_residual_layers", "codebook_size",
                "num_quantizers", "num_codebooks", "kernel_size", "last_kernel_size", "residual_kernel_size",
                "dilation_base", "compress")
        for key in ints:
            if getattr(self, key) <= 0:
                raise ValueError(f"{prefix}{key} must be > 0, got {getattr(self, key)}")
        if self.channels not in (1, 2):
            raise ValueError(f"{prefix}channels must be 1 or 2, got {self.channels}")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f"{prefix}ratios must be a non-empty list of positive integers, "
                             f"got {self.ratios}")
        if self.lstm < 0:
            raise ValueError(f"{prefix}lstm must be >= 0, got {self.lstm}")
        if self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"{prefix}codebook_size must be a power of 2, got {self.codebook_size}")
        if self.num_codebooks > self.num_quantizers:
            raise ValueError(f"{prefix}num_codebooks ({self.num_codebooks}) must be <= "
                             f"{prefix}num_quantizers ({self.num_quantizers})")
        if self.norm not in ("weight_norm", "time_group_norm"):
            raise ValueError(f"{prefix}norm must be one of weight_norm, time_group_norm; got {self.norm!r}")
        if self.norm == "time_group_norm" and self.causal:
            raise ValueError(f"{prefix}norm=time_group_norm needs {prefix}causal=false "
                             "(GroupNorm is not causal)")
        if self.pad_mode not in ("reflect", "constant", "replicate"):
            raise ValueError(f"{prefix}pad_mode must be one of reflect, constant, replicate; "
                             f"got {self.pad_mode!r}")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


CODEC_PRESETS: dict[str, CodecConfig] = {
    # unit tests: 11k parameters, 1 kHz frames
    "debug": CodecConfig(sample_rate=16000, ratios=[4, 4], n_filters=4, dimension=16, lstm=1,
                         codebook_size=32, num_quantizers=2, num_codebooks=2),
    # CPU: 2.7M parameters, 16 kHz, 50 Hz x 8 codebooks of 256 (3.2 kbps)
    "tiny": CodecConfig(sample_rate=16000, ratios=[8, 5, 4, 2], n_filters=16, dimension=64, lstm=1,
                        codebook_size=256, num_quantizers=8, num_codebooks=8),
    # GPU: 14.9M parameters, the 24 kHz SEANet at 16 kHz, 50 Hz x 8 codebooks of 1024 (4 kbps)
    "small": CodecConfig(sample_rate=16000, ratios=[8, 5, 4, 2], n_filters=32, dimension=128, lstm=2,
                         codebook_size=1024, num_quantizers=8, num_codebooks=8),
    # = EncodecModel.encodec_model_24khz(pretrained=False): 32 quantizers built, 8 used (6 kbps)
    "encodec_24khz": CodecConfig(),
}


def codec_config(name: str, **overrides) -> CodecConfig:
    """A named architecture from ``CODEC_PRESETS`` with field overrides."""
    if name not in CODEC_PRESETS:
        raise ValueError(f"unknown codec preset {name!r}; available: {', '.join(CODEC_PRESETS)}")
    cfg = dataclasses.replace(CODEC_PRESETS[name], **overrides)
    cfg.validate()
    return cfg


def build_encodec(cfg: CodecConfig):
    """A freshly initialised ``encodec.EncodecModel`` with architecture ``cfg`` (codebooks untrained)."""
    try:
        from encodec import EncodecModel
        from encodec import modules as m
        from encodec import quantization as qt
    except ImportError:
        raise ImportError(f"the audio codec needs the encodec package: {ENCODEC_INSTALL}") from None
    cfg.validate()
    seanet = dict(channels=cfg.channels, dimension=cfg.dimension, n_filters=cfg.n_filters,
                  n_residual_layers=cfg.n_residual_layers, ratios=list(cfg.ratios), norm=cfg.norm,
                  kernel_size=cfg.kernel_size, last_kernel_size=cfg.last_kernel_size,
                  residual_kernel_size=cfg.residual_kernel_size, dilation_base=cfg.dilation_base,
                  causal=cfg.causal, pad_mode=cfg.pad_mode, true_skip=cfg.true_skip, compress=cfg.compress,
                  lstm=cfg.lstm)
    with warnings.catch_warnings():  # encodec uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        encoder = m.SEANetEncoder(**seanet)
        decoder = m.SEANetDecoder(**seanet, trim_right_ratio=cfg.trim_right_ratio)
    quantizer = qt.ResidualVectorQuantizer(dimension=cfg.dimension, n_q=cfg.num_quantizers,
                                           bins=cfg.codebook_size)
    bw_per_q = math.log2(cfg.codebook_size) * cfg.sample_rate / cfg.hop_length / 1000
    return EncodecModel(encoder, decoder, quantizer, target_bandwidths=[cfg.num_quantizers * bw_per_q],
                        sample_rate=cfg.sample_rate, channels=cfg.channels, normalize=False)


# ---------------------------------------------------------------------------------------------
# The codec tokenizer


class AudioCodec(BaseCodec):
    """EnCodec as a tokenizer: waveform <-> ``num_codebooks`` streams of ids in ``[0, cardinality)``.

    ``codec.model`` is the plain ``encodec.EncodecModel``; ``encode``/``decode`` run exactly its
    encoder -> RVQ and RVQ -> decoder ops (no normalisation, no segmenting), under ``no_grad``.
    """

    def __init__(self, config: CodecConfig | str = "tiny", model=None):
        super().__init__()
        self.config = codec_config(config) if isinstance(config, str) else config
        self.config.validate()
        self.model = model if model is not None else build_encodec(self.config)
        self.model.eval()

    # -- rates ------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def hop_length(self) -> int:
        """Samples per codec frame."""
        return self.config.hop_length

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def cardinality(self) -> int:
        """Ids per codebook."""
        return self.config.codebook_size

    # -- tokenizer --------------------------------------------------------------------------
    def _as_batch(self, wave) -> tuple[torch.Tensor, bool]:
        """wave -> (B, C, T) on the model's device; also whether the input had no batch dim."""
        if isinstance(wave, Audio):
            same_rate = wave.sample_rate == self.sample_rate
            wave = (wave if same_rate else wave.resample(self.sample_rate)).waveform
        if not isinstance(wave, torch.Tensor) or not wave.is_floating_point():
            got = f"{wave.dtype} tensor" if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise ValueError(f"encode takes a float waveform tensor or an omni.Audio, got a {got}")
        base = 1 if self.channels == 1 else 2  # dims of one unbatched item: (T,) or (C, T)
        if wave.dim() not in (base, base + 1):
            shapes = "(T,) or (B, T)" if self.channels == 1 else "(C, T) or (B, C, T)"
            raise ValueError(f"encode expects a waveform {shapes} for a {self.channels}-channel codec, "
                             f"got shape {tuple(wave.shape)}")
        single = wave.dim() == base
        x = wave.unsqueeze(0) if single else wave
        x = x.unsqueeze(1) if self.channels == 1 else x
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        if x.shape[-1] == 0:
            raise ValueError("cannot encode an empty waveform")
        p = next(self.model.parameters())
        return x.to(p.device, p.dtype), single

    @torch.no_grad()
    def encode(self, wave) -> torch.Tensor:
        """``wave: (T,)`` or ``(B, T)`` (stereo codecs: ``(C, T)`` / ``(B, C, T)``), or an ``omni.Audio``
        (resampled to ``sample_rate``) -> ``codes: (K, T')`` or ``(B, K, T')`` int64,
        ``T' = ceil(T / hop)``."""
        x, single = self._as_batch(wave)
        emb = self.model.encoder(x)  # (B, D, T')
        codes = self.model.quantizer.vq.encode(emb, n_q=self.num_codebooks).transpose(0, 1)  # (B, K, T')
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """``codes: (K, T')`` or ``(B, K, T')`` -> ``wave: (T,)`` or ``(B, T)`` (stereo: with a C dim),
        ``T = T' * hop`` or ``length`` (trimmed) when given. ``K`` may be fewer than ``num_codebooks``."""
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError(f"decode expects an integer tensor of codes (K, T') or (B, K, T'), "
                             f"got {codes!r:.80}")
        if codes.dim() not in (2, 3):
            raise ValueError(f"decode expects codes (K, T') or (B, K, T'), got shape {tuple(codes.shape)}")
        single = codes.dim() == 2
        c = codes.unsqueeze(0) if single else codes  # (B, K, T')
        if not 1 <= c.shape[1] <= self.config.num_quantizers:
            raise ValueError(f"codes have {c.shape[1]} codebooks; this codec has "
                             f"{self.config.num_quantizers}")
        if c.numel() and (c.min() < 0 or c.max() >= self.cardinality):
            raise ValueError(f"codes must be in [0, {self.cardinality}), got values in "
                             f"[{int(c.min())}, {int(c.max())}]")
        device = next(self.model.parameters()).device
        emb = self.model.quantizer.vq.decode(c.long().to(device).transpose(0, 1))  # (B, D, T')
        wave = self.model.decoder(emb)  # (B, C, T' * hop)
        if length is not None:
            wave = wave[..., :length]
        wave = wave[:, 0] if self.channels == 1 else wave
        return wave[0] if single else wave

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (replaced atomically)."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            save_tensors(tmp / "model.safetensors", self.model.state_dict(), metadata={"format": "pt"})
            atomic_write_json(tmp / "config.json", {"kind": "encodec", "format_version": FORMAT_VERSION,
                                                    "config": dataclasses.asdict(self.config)})
        return directory

    @classmethod
    def load(cls, directory: str | Path, num_codebooks: int | None = None) -> AudioCodec:
        """A codec saved by :meth:`save`; ``num_codebooks`` overrides how many codebooks ``encode`` emits."""
        directory = Path(directory)
        meta_path = directory / "config.json"
        meta = _codec_meta(directory)
        if meta.get("kind") != "encodec":
            raise ValueError(f"{meta_path}: kind is {meta.get('kind')!r}, expected 'encodec'")
        cfg = from_dict(CodecConfig, meta.get("config", {}), "config.")
        if num_codebooks is not None:
            cfg = dataclasses.replace(cfg, num_codebooks=num_codebooks)
        return cls._with_state(cfg, load_tensors(directory / "model.safetensors"), directory)

    @classmethod
    def _with_state(cls, cfg: CodecConfig, state: dict[str, torch.Tensor], source) -> AudioCodec:
        codec = cls(cfg)
        own = codec.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not fit the codec architecture: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]})")
        bad = [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"{source}: shape mismatch for {bad[0]}: checkpoint "
                             f"{tuple(state[bad[0]].shape)}, architecture {tuple(own[bad[0]].shape)} "
                             "(wrong preset?)")
        codec.model.load_state_dict(state)
        codec.model.eval()
        return codec

    @classmethod
    def from_encodec_checkpoint(cls, path: str | Path, preset: str | CodecConfig = "encodec_24khz",
                                num_codebooks: int | None = None) -> AudioCodec:
        """A state dict saved from an ``encodec.EncodecModel`` (e.g. ``encodec_24khz-d7cc33bc.th``).

        ``.th``/``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``, which only
        rebuilds tensors and cannot run code; ``.safetensors`` files are accepted too. ``preset``
        names (or is) the architecture the weights were trained with.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: checkpoint not found")
        cfg = codec_config(preset) if isinstance(preset, str) else preset
        if num_codebooks is not None:
            cfg = dataclasses.replace(cfg, num_codebooks=num_codebooks)
        if path.suffix == ".safetensors":
            state = load_tensors(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: not a loadable tensor checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})") from None
            if isinstance(state, dict) and isinstance(state.get("best_state"), dict):
                state = state["best_state"]  # encodec/audiocraft training checkpoints wrap the weights
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{path}: expected a state dict of tensors")
        return cls._with_state(cfg, state, path)

    @classmethod
    def from_hf(cls, path: str | Path, num_codebooks: int | None = None) -> AudioCodec:
        """A local transformers ``EncodecModel`` directory (``config.json`` + ``model.safetensors``).

        The weights are renamed into the encodec package's model; codes equal transformers'
        ``EncodecModel.encode(x, bandwidth=b)``. ``num_codebooks`` defaults to transformers' own
        default bandwidth (the smallest of ``target_bandwidths``).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a transformers model directory (no config.json)")
        from transformers import EncodecConfig

        hf = EncodecConfig.from_pretrained(str(path))
        if hf.model_type != "encodec":
            raise ValueError(f"{path}: model_type is {hf.model_type!r}, expected 'encodec'")
        if hf.normalize or hf.chunk_length_s:
            raise ValueError(f"{path}: EnCodec models with normalize=True or chunk_length_s (the 48 kHz "
                             "family) are not supported: their codes need per-chunk scales")
        if hf.codebook_dim != hf.hidden_size:
            raise ValueError(f"{path}: codebook_dim {hf.codebook_dim} != hidden_size {hf.hidden_size}")
        bw_per_q = math.log2(hf.codebook_size) * hf.frame_rate
        default_k = int(max(1, math.floor(hf.target_bandwidths[0] * 1000 / bw_per_q)))
        cfg = CodecConfig(sample_rate=hf.sampling_rate, channels=hf.audio_channels,
                          ratios=list(hf.upsampling_ratios), n_filters=hf.num_filters,
                          dimension=hf.hidden_size, n_residual_layers=hf.num_residual_layers,
                          lstm=hf.num_lstm_layers,
                          codebook_size=hf.codebook_size, num_quantizers=hf.num_quantizers,
                          num_codebooks=num_codebooks or min(default_k, hf.num_quantizers),
                          causal=hf.use_causal_conv, norm=hf.norm_type, kernel_size=hf.kernel_size,
                          last_kernel_size=hf.last_kernel_size, residual_kernel_size=hf.residual_kernel_size,
                          dilation_base=hf.dilation_growth_rate, compress=hf.compress,
                          true_skip=not hf.use_conv_shortcut, pad_mode=hf.pad_mode,
                          trim_right_ratio=hf.trim_right_ratio)
        hf_state = load_safetensors_dir(path)
        target = set(build_encodec(cfg).state_dict())
        state = {_hf_encodec_key(k, target, path): v for k, v in hf_state.items()}
        return cls._with_state(cfg, state, path)


def _codec_meta(directory: Path) -> dict:
    """A saved codec's ``config.json``."""
    meta_path = directory / "config.json"
    if not meta_path.is_file():
        raise ValueError(f"{directory}: not an omni audio codec directory (no config.json)")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None


CODECS.register("encodec", AudioCodec)


def load_codec(directory: str | Path, num_codebooks: int | None = None) -> BaseCodec:
    """A codec saved by any :data:`CODECS` backend: its ``config.json``'s ``kind`` names the backend,
    whose ``load`` reads the rest (``num_codebooks`` overrides how many codebooks ``encode`` emits)."""
    directory = Path(directory)
    kind = _codec_meta(directory).get("kind")
    return CODECS.get(kind, f"{directory / 'config.json'}: kind").load(directory, num_codebooks=num_codebooks)


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (single or sharded safetensors)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_tensors(path / shard))
        return state
    if any(path.glob("*.bin")):
        raise ValueError(f"{path}: only pickle weights (*.bin) found; omni never unpickles checkpoints. "
                         "Re-save with save_pretrained(..., safe_serialization=True)")
    raise ValueError(f"{path}: no model.safetensors found")


def _hf_encodec_key(key: str, target: set[str], source) -> str:
    """transformers EnCodec name -> encodec package name (same module order, different wrappers)."""
    k = key.replace("parametrizations.weight.original0", "weight_g")
    k = k.replace("parametrizations.weight.original1", "weight_v")
    k = re.sub(r"^(encoder|decoder)\.layers\.", r"\1.model.", k)
    k = re.sub(r"^quantizer\.layers\.(\d+)\.codebook\.", r"quantizer.vq.layers.\1._codebook.", k)
    # transformers keeps the conv (or transposed conv) in `.conv` and the GroupNorm in `.norm`;
    # encodec nests them one level deeper: `.conv.conv` / `.convtr.convtr` and `.conv.norm` / `.convtr.norm`
    candidates = [k, k.replace(".conv.", ".conv.conv."), k.replace(".conv.", ".convtr.convtr."),
                  k.replace(".norm.", ".conv.norm."), k.replace(".norm.", ".convtr.norm.")]
    for c in candidates:
        if c in target:
            return c
    raise ValueError(f"{source}: transformers weight {key!r} has no counterpart in the encodec model")


# ---------------------------------------------------------------------------------------------
# Log-mel front end (Whisper)



class LogMel(nn.Module):
    """Whisper's log-mel spectrogram, batched: ``wave (T,) | (B, T)`` at 16 kHz -> ``mel (n_mels, F) |
    (B, n_mels, F)`` with ``F = T // hop`` (Whisper drops the STFT's last frame).

    Steps as Whisper: periodic Hann window, centred STFT (reflect padding), power spectrum, Slaney
    mel filters, ``log10(max(x, 1e-10))``, clamp each example to its ``max - 8``, ``(x + 4) / 4``.
    ``pad_to_s=30`` pads/truncates the waveform to 30 s first, exactly like Whisper (3000 frames,
    what a pretrained Whisper encoder expects); ``None`` (default) keeps the real length. Use
    ``n_mels=128`` for whisper-large-v3.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = MEL_SAMPLE_RATE, n_fft: int = 400,
                 hop_length: int = MEL_HOP_LENGTH,
                 pad_to_s: float | None = None):
        super().__init__()
        self.n_mels, self.sample_rate, self.n_fft, self.hop_length = n_mels, sample_rate, n_fft, hop_length
        self.pad_to = None if pad_to_s is None else int(round(pad_to_s * sample_rate))
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filters(sample_rate, n_fft, n_mels).T.contiguous(),
                             persistent=False)  # (n_mels, n_freqs)

    def num_frames(self, num_samples: int) -> int:
        """Mel frames ``F`` for ``num_samples`` samples."""
        return (self.pad_to if self.pad_to is not None else num_samples) // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if not isinstance(wave, torch.Tensor) or not wave.is_floating_point() or wave.dim() not in (1, 2):
            got = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise ValueError(f"LogMel expects a float waveform (T,) or (B, T), got {got}")
        single = wave.dim() == 1
        x = wave[None] if single else wave
        total = self.pad_to if self.pad_to is not None else x.shape[1]
        mel = self._log_mel(x, total)
        return mel[0] if single else mel

    def _log_mel(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """``x: (B, T)``, zero-padded (or truncated) to ``total`` samples -> ``(B, n_mels, total // hop)``.

        Frames whose window lies wholly in the zero padding have exactly zero power, so only the
        signal plus one window of zeros goes through the STFT; those frames are filled in directly.
        """
        if x.shape[1] < self.hop_length:
            raise ValueError(f"LogMel needs at least {self.hop_length} samples, got {x.shape[1]}")
        x = x[:, :total].to(self.window.device, torch.float32)
        x = F.pad(x, (0, min(total, x.shape[1] + self.n_fft) - x.shape[1]))
        spec = torch.stft(x, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)[..., :-1]  # (B, n_freqs, F)
        power = spec.real.square() + spec.imag.square()  # = |X|^2 without the sqrt of abs()
        mel = torch.clamp(self.filters @ power, min=1e-10).log10()  # (B, n_mels, F)
        floor = mel.amax(dim=(1, 2), keepdim=True) - 8.0
        if mel.shape[2] < total // self.hop_length:
            mel = F.pad(mel, (0, total // self.hop_length - mel.shape[2]), value=-10.0)  # log10(1e-10)
        return (torch.maximum(mel, floor) + 4.0) / 4.0

    def batch(self, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms of different lengths -> ``(mel (B, n_mels, F), signal_frames (B,))``: the same as
        the zero-padded batch (Whisper pads with silence) with ``F`` the longest clip's frames (or
        ``pad_to_s``'s), and each clip's frames that hold signal. Each clip is transformed on its own,
        so short clips do not pay for the longest one's frames."""
        if not waves:
            raise ValueError("LogMel.batch needs at least one waveform")
        total = self.pad_to if self.pad_to is not None else max(w.shape[-1] for w in waves)
        mel = torch.stack([self._log_mel(w.reshape(1, -1), total)[0] for w in waves])
        frames = torch.tensor([min(w.shape[-1], total) // self.hop_length for w in waves])
        return mel, frames


# ---------------------------------------------------------------------------------------------
# Audio encoders: log-mel (B, n_mels, F) -> features (B, N, D)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions ``(length, channels)``: sin half, then cos half."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([t.sin(), t.cos()], dim=1)


def _conv_stem_tokens(num_frames: int, subsample: int = 2) -> int:
    """Features after conv(k3, p1) + conv(k3, stride 2, p1) [+ conv(k3, stride 2, p1)]: ceil(F / 2) [/ 2]."""
    n = (num_frames - 1) // 2 + 1
    return (n - 1) // 2 + 1 if subsample == 4 else n


@dataclass(frozen=True)
class EncoderSize:
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int


ENCODER_SIZES: dict[str, EncoderSize] = {
    "debug": EncoderSize(dim=64, num_layers=2, num_heads=2, ffn_dim=256),
    "tiny": EncoderSize(dim=192, num_layers=4, num_heads=3, ffn_dim=768),
    "small": EncoderSize(dim=384, num_layers=4, num_heads=6, ffn_dim=1536),  # whisper-tiny's encoder
    "base": EncoderSize(dim=512, num_layers=6, num_heads=8, ffn_dim=2048),  # whisper-base's encoder
}


class ConvModule(nn.Module):
    """Conformer's convolution module (Gulati et al., 2020), pre-norm and residual outside:
    pointwise conv to 2D -> GLU -> depthwise conv over time -> LayerNorm -> SiLU -> pointwise.
    Padding frames are zeroed first so they do not leak into real ones."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {kernel}")
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.mid_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        if pad_mask is not None:
            h = h.masked_fill(pad_mask[..., None], 0.0)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_out(F.silu(self.mid_norm(h)))


class WhisperStyleEncoder(BaseAudioEncoder):
    """Whisper's encoder layout, our code: conv(3)-GELU-conv(3, stride 2)-GELU, fixed sinusoidal
    positions, pre-norm transformer layers (GELU MLP), final LayerNorm. Halves the frame rate
    (100 mel frames/s -> 50 features/s); ``subsample=4`` adds a third strided conv (25 features/s,
    the usual ASR front end: the transformer layers then cost half). ``stem="conv2d"`` replaces the
    1-D convolutions (each mixing all mel bins) with ESPnet's 2-D subsampling: two 3x3 convolutions
    of ``stem_channels`` over time and frequency, each halving the frequency axis (and time, to the
    same rate as ``subsample``), then a linear layer to ``dim``; the same pattern shifted in pitch
    excites the same filters, which voices of other pitches need. ``conv_kernel > 0`` follows
    each layer with a Conformer convolution module of that kernel (local patterns a from-scratch
    encoder otherwise learns slowly through attention alone). Inputs of any length up to
    ``max_frames``. ``stored_positions``: the position table is saved with the weights (a Whisper
    checkpoint's own, as it was trained) instead of computed."""

    def __init__(self, n_mels: int = 80, dim: int = 192, num_layers: int = 4, num_heads: int = 3,
                 ffn_dim: int | None = None, max_frames: int = 3000, dropout: float = 0.0, subsample: int = 2,
                 conv_kernel: int = 0, stem: str = "conv1d", stem_channels: int = 32,
                 stored_positions: bool = False, input_mode: str = "slice"):
        super().__init__()
        if input_mode not in ("pad", "slice"):
            raise ValueError(f"input_mode must be one of pad, slice; got {input_mode!r}")
        if input_mode == "pad" and (subsample != 2 or stem != "conv1d"):
            raise ValueError("input_mode pad reads Whisper's 30-s window: a Whisper layout (conv1d stem, "
                             "subsample 2) only")
        self.input_mode, self.frozen, self.whisper_config = input_mode, False, None
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if subsample not in (2, 4):
            raise ValueError(f"subsample must be 2 or 4, got {subsample}")
        if stem not in ("conv1d", "conv2d"):
            raise ValueError(f"stem must be one of conv1d, conv2d; got {stem!r}")
        self._n_mels, self.max_frames, self.subsample, self.stem = n_mels, max_frames, subsample, stem
        if stem == "conv2d":  # (B, 1, F, T): frequency first, then time
            self.conv1 = nn.Conv2d(1, stem_channels, kernel_size=3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(stem_channels, stem_channels, kernel_size=3, stride=(2, subsample // 2),
                                   padding=1)
            self.conv3 = None
            self.stem_proj = nn.Linear(stem_channels * ((n_mels - 1) // 2 // 2 + 1), dim)
        else:
            self.conv1 = nn.Conv1d(n_mels, dim, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
            self.conv3 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1) if subsample == 4 else None
        self.register_buffer("positions", sinusoids(_conv_stem_tokens(max_frames, subsample), dim),
                             persistent=stored_positions)
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn_dim or 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.convs = (nn.ModuleList(ConvModule(dim, conv_kernel) for _ in range(num_layers)) if conv_kernel
                      else None)
        self.norm = nn.LayerNorm(dim)
        self._out_dim = dim

    @property
    def n_mels(self) -> int:
        return self._n_mels

    @property
    def frame_rate(self) -> float:
        return MEL_SAMPLE_RATE / MEL_HOP_LENGTH / self.subsample

    @property
    def out_dim(self) -> int:
        return self._out_dim

    @classmethod
    def build(cls, size: str = "tiny", n_mels: int = 80, subsample: int = 2, conv_kernel: int = 0,
              stem: str = "conv1d", stem_channels: int = 32, whisper_config: dict | None = None,
              path: str | None = None, freeze: bool = False, input_mode: str | None = None,
              **_) -> WhisperStyleEncoder:
        """``size`` from :data:`ENCODER_SIZES`; or the encoder of a Whisper checkpoint whose
        transformers config (``whisper_config``) gives the sizes (its weights, position table
        included, are loaded by the importer, :mod:`omni.model.whisper`, or from the checkpoint
        file); or, with ``path``, the encoder of a Whisper checkpoint folder with its weights: an
        omni checkpoint (``omni import whisper --out DIR``) or a transformers Whisper
        folder. ``freeze``: its weights do not train. ``input_mode``: ``pad``
        reads every clip in Whisper's 30-s window (padded with the log-mel floor, the features of the
        real frames returned: what pretrained weights expect), ``slice`` only the clip's frames
        (default, and what from-scratch encoders always do); a tower from ``path`` pads unless told."""
        if path:
            encoder = cls.from_checkpoint(path, input_mode=input_mode or "pad")
        elif whisper_config is not None:
            c = whisper_config
            encoder = cls(n_mels=c.get("num_mel_bins", n_mels), dim=c["d_model"],
                          num_layers=c["encoder_layers"], num_heads=c["encoder_attention_heads"],
                          ffn_dim=c["encoder_ffn_dim"],
                          max_frames=2 * c.get("max_source_positions", 1500), stored_positions=True,
                          input_mode=input_mode or "slice")
            encoder.whisper_config = {k: c[k] for k in WHISPER_ENCODER_KEYS if k in c}
        else:
            encoder = cls.from_size(size, n_mels=n_mels, subsample=subsample, conv_kernel=conv_kernel,
                                    stem=stem, stem_channels=stem_channels, input_mode=input_mode or "slice")
        if freeze:
            encoder.freeze()
        return encoder

    @classmethod
    def from_checkpoint(cls, path: str | Path, input_mode: str = "pad") -> WhisperStyleEncoder:
        """The audio encoder of a Whisper checkpoint folder, weights loaded: omni's own (``config.json``
        with an audio ``whisper_config``, ``model.safetensors``: ``omni import whisper --out DIR``), a
        transformers one (``WhisperForConditionalGeneration`` or ``WhisperModel``, safetensors; the
        decoder's weights are not read). A CTranslate2 folder is imported first (``omni import
        whisper SRC --out DIR``): the importer builds on this module."""
        path = Path(path)
        cfg_file = path / "config.json"
        raw = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else None
        if raw is not None and raw.get("model_type") == "whisper":  # transformers
            config = complete_whisper_config(raw)
            tensors = load_safetensors_dir(path)
            for prefix in ("model.encoder.", "encoder.", ""):
                src = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if "conv1.weight" in src:
                    break
            else:
                raise ValueError(f"{path}: no Whisper encoder weights (conv1.weight) found")
            try:
                state = whisper_encoder_tensors(src.__getitem__, src)
            except KeyError as e:
                raise ValueError(f"{path}: encoder weights missing: {e}") from None
        elif any(path.glob("model.bin*")):  # model.bin, or its parts model.bin.partN
            raise ValueError(f"{path}: a CTranslate2 Whisper; import it first (omni import whisper {path} "
                             "--out DIR) and name DIR")
        elif raw is not None:  # omni's
            enc = ((raw.get("media") or {}).get("audio") or {}).get("encoder") or {}
            config = enc.get("whisper_config")
            if config is None:
                raise ValueError(f"{path}: its audio encoder is not a Whisper encoder (no "
                                 "media.audio.encoder.whisper_config in config.json)")
            prefix = "encoders.audio.encoder."
            tensors = load_safetensors_dir(path)
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if enc.get("kind") == "hf_whisper":  # a checkpoint saved with the old transformers tower
                config = complete_whisper_config(config)
                state = WhisperStyleEncoder.upgrade_state(state, "")
        else:
            raise ValueError(f"{path}: no config.json; give an omni checkpoint of a Whisper (omni import "
                             "whisper --out DIR) or a transformers Whisper folder")
        encoder = cls.build(whisper_config=config, input_mode=input_mode)
        own = set(encoder.state_dict())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"{path}: the audio encoder's weights do not match its config (missing: "
                             f"{missing[:5]}, unexpected: {unexpected[:5]})")
        encoder.load_state_dict(state)
        return encoder

    @staticmethod
    def upgrade_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """``tensors`` with a Whisper encoder under transformers' names at ``prefix + "encoder."`` (how
        checkpoints of the old ``hf_whisper`` tower stored it) renamed to this encoder's, at
        ``prefix``; other tensors unchanged."""
        old = prefix + "encoder."
        if old + "conv1.weight" not in tensors:
            return tensors
        out = {k: v for k, v in tensors.items() if not k.startswith(old)}
        src = {k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}
        out.update({prefix + k: v for k, v in whisper_encoder_tensors(src.__getitem__, src).items()})
        return out

    def freeze(self) -> WhisperStyleEncoder:
        """Its weights stop training (and it stays in eval mode)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    @classmethod
    def from_size(cls, size: str, n_mels: int = 80, **overrides) -> WhisperStyleEncoder:
        if size not in ENCODER_SIZES:
            raise ValueError(f"unknown audio encoder size {size!r}; available: {', '.join(ENCODER_SIZES)}")
        return cls(n_mels=n_mels, **{**dataclasses.asdict(ENCODER_SIZES[size]), **overrides})

    def num_tokens(self, num_frames: int) -> int:
        return _conv_stem_tokens(num_frames, self.subsample)

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``mel: (B, n_mels, F)`` -> ``(B, ceil(F/subsample), D)``. ``mel_lengths: (B,)`` real frames per
        row: features of padding are masked out of attention (their outputs are meaningless)."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"expected mel (B, {self.n_mels}, F), got {tuple(mel.shape)}")
        if mel.shape[2] > self.max_frames:
            raise ValueError(f"{mel.shape[2]} mel frames exceed max_frames={self.max_frames}; "
                             "process long audio in windows")
        frames = mel.shape[2]
        if self.input_mode == "pad":  # the whole window is real frames; the clip's features are returned
            mel, mel_lengths = self._window(mel, mel_lengths), None
        lengths = None if mel_lengths is None else torch.as_tensor(mel_lengths, device=mel.device)
        if lengths is not None and bool((lengths >= mel.shape[-1]).all()):
            lengths = None  # no padding: no masks, and attention keeps its fused (flash) kernel
        if lengths is not None:  # padding frames read as zeros, as the stem's own padding does alone
            mel = mel * (torch.arange(mel.shape[-1], device=mel.device) < lengths[:, None])[:, None, :]

        def conv(layer, x, stride):  # a stem convolution; padding frames stay zero, as alone
            nonlocal lengths
            x = F.gelu(layer(x))
            if lengths is not None:
                lengths = (lengths - 1) // stride + 1
                keep = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]
                x = x * keep.view(x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
            return x

        if self.stem == "conv2d":
            x = conv(self.conv2, conv(self.conv1, mel[:, None], 2), self.subsample // 2)  # (B, C, F/4, N)
            x = self.stem_proj(x.flatten(1, 2).transpose(1, 2))  # (B, N, D)
        else:
            x = conv(self.conv2, conv(self.conv1, mel, 1), 2)
            if self.conv3 is not None:
                x = conv(self.conv3, x, 2)
            x = x.transpose(1, 2)  # (B, N, D)
        x = x + self.positions[:x.shape[1]].to(x.dtype)
        pad_mask = None
        if lengths is not None:  # the stem has brought them to features per row
            pad_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # True: pad
        if self.convs is None and self.training:
            return self.norm(self.layers(x, src_key_padding_mask=pad_mask))[:, :self.num_tokens(frames)]
        for i, layer in enumerate(self.layers.layers):
            x = layer(x, src_key_padding_mask=pad_mask) if self.training else _layer_sdpa(layer, x, pad_mask)
            if self.convs is not None:
                x = x + self.convs[i](x, pad_mask)
        return self.norm(x)[:, :self.num_tokens(frames)]

    def _window(self, mel: torch.Tensor, mel_lengths: torch.Tensor | None) -> torch.Tensor:
        """``input_mode="pad"``: each clip's real frames in a ``max_frames`` window, the rest its log-mel
        floor (silence is log10(1e-10), clamped to max - 8, scaled: max(max - 2, -1.5)), as Whisper
        reads a clip zero-padded to 30 s."""
        B, _, frames = mel.shape
        lengths = (torch.full((B,), frames) if mel_lengths is None else torch.as_tensor(mel_lengths)).tolist()
        window = torch.empty(B, self.n_mels, self.max_frames, dtype=mel.dtype, device=mel.device)
        for i, n in enumerate(lengths):
            real = mel[i, :, :n]
            window[i] = torch.clamp(real.amax() - 2.0, min=-1.5)
            window[i, :, :n] = real
        return window


def _layer_sdpa(layer: nn.TransformerEncoderLayer, x: torch.Tensor, pad_mask: torch.Tensor | None):
    """A pre-norm GELU ``TransformerEncoderLayer`` without dropout (eval), its attention through
    ``scaled_dot_product_attention``: the fused (flash) kernel, which never holds the (N, N) scores
    that ``nn.MultiheadAttention``'s CPU path writes out; what transformers' Whisper encoder runs.
    ``pad_mask (B, N)``: True marks padding keys."""
    B, N, D = x.shape
    attn = layer.self_attn
    H = attn.num_heads
    h = layer.norm1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    mask = None if pad_mask is None else ~pad_mask[:, None, None, :]
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + attn.out_proj(a.transpose(1, 2).reshape(B, N, D))
    return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


WHISPER_ENCODER_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                        "encoder_ffn_dim", "max_source_positions")
# transformers' WhisperConfig defaults: a config saved as its diff (to_diff_dict) leaves these out
WHISPER_CONFIG_DEFAULTS = {"num_mel_bins": 80, "d_model": 384, "encoder_layers": 4,
                           "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
                           "max_source_positions": 1500}


def complete_whisper_config(config: dict | None) -> dict:
    """A transformers Whisper config (or its diff against the defaults) -> the encoder's sizes."""
    return {k: (config or {}).get(k, WHISPER_CONFIG_DEFAULTS[k]) for k in WHISPER_ENCODER_KEYS}


def whisper_encoder_tensors(get, names) -> dict[str, torch.Tensor]:
    """A Whisper encoder's tensors under transformers' names (``get(name)``; ``names``: every name
    there is, for the layer count) -> :class:`WhisperStyleEncoder`'s: q, k, v fused into the
    attention's in-projection, k without a bias (a zero slot)."""
    layers = 1 + max(int(m[1]) for k in names if (m := re.match(r"layers\.(\d+)\.", k)))
    out: dict[str, torch.Tensor] = {}

    def linear(dst, src):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}.weight").float(), get(f"{src}.bias").float()

    linear("conv1", "conv1")
    linear("conv2", "conv2")
    out["positions"] = get("embed_positions.weight").float()
    for i in range(layers):
        src, dst = f"layers.{i}", f"layers.layers.{i}"
        out[f"{dst}.self_attn.in_proj_weight"] = torch.cat(
            [get(f"{src}.self_attn.{x}_proj.weight").float() for x in "qkv"])
        v_bias = get(f"{src}.self_attn.v_proj.bias").float()
        out[f"{dst}.self_attn.in_proj_bias"] = torch.cat(
            [get(f"{src}.self_attn.q_proj.bias").float(), torch.zeros_like(v_bias), v_bias])
        linear(f"{dst}.self_attn.out_proj", f"{src}.self_attn.out_proj")
        linear(f"{dst}.norm1", f"{src}.self_attn_layer_norm")
        linear(f"{dst}.linear1", f"{src}.fc1")
        linear(f"{dst}.linear2", f"{src}.fc2")
        linear(f"{dst}.norm2", f"{src}.final_layer_norm")
    linear("norm", "layer_norm")
    return out


def standalone_encoder_config(section: dict, encoder: nn.Module) -> dict:
    """An audio ``encoder`` section as a checkpoint records it: a Whisper tower loaded from
    ``path`` is described by its sizes (``whisper_config``) and input mode instead, so the
    checkpoint loads without that folder (the tower's weights are in its model.safetensors)."""
    if not section.get("path"):
        return section
    rest = {k: v for k, v in section.items() if k != "path"}
    return {**rest, "kind": "whisper_style", "whisper_config": encoder.whisper_config,
            "input_mode": encoder.input_mode}


AUDIO_ENCODERS.register("whisper_style", WhisperStyleEncoder)


def audio_encoder(kind: str = "whisper_style", size: str = "tiny", n_mels: int = 80, path: str | None = None,
                  freeze: bool = False, input_mode: str | None = None, whisper_config: dict | None = None,
                  subsample: int = 2, conv_kernel: int = 0, stem: str = "conv1d",
                  stem_channels: int = 32) -> BaseAudioEncoder:
    """The recipe-facing builder: the :data:`AUDIO_ENCODERS` backend ``kind`` names, built from the
    rest: ``"whisper_style"`` (ours: ``size`` from ``ENCODER_SIZES``, a Whisper checkpoint's sizes
    ``whisper_config``, or a Whisper checkpoint folder's encoder with its weights, ``path``).
    ``"hf_whisper"``, the transformers-based tower checkpoints saved before, reads as the same
    encoder (its transformers ``whisper_config`` completed with transformers' defaults, 30-s
    windows unless ``input_mode`` says otherwise; the weights are renamed on load,
    :meth:`WhisperStyleEncoder.upgrade_state`)."""
    if kind == "hf_whisper":
        if subsample != 2 or conv_kernel or stem != "conv1d":
            raise ValueError("subsample, conv_kernel and stem do not apply to a Whisper checkpoint's "
                             "encoder; its layout is fixed")
        kind, input_mode = "whisper_style", input_mode or "pad"
        if not path:
            whisper_config = complete_whisper_config({"num_mel_bins": n_mels, **(whisper_config or {})})
    return AUDIO_ENCODERS.get(kind).build(size=size, n_mels=n_mels, path=path, freeze=freeze,
                                          input_mode=input_mode, whisper_config=whisper_config,
                                          subsample=subsample, conv_kernel=conv_kernel, stem=stem,
                                          stem_channels=stem_channels)
