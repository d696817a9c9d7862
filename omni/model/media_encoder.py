"""Media encoders: one modality's tokenizer/encoder plus a connector to the model width.

``prepare(tensor) -> (data, grid)`` runs in the processor (``omni.processor``), after it decoded a
media file: it preprocesses decoded pixels, frames or a waveform into the tensor a
:class:`~omni.sequence.MediaSlot` carries, and says how many tokens
(as a ``(t, h, w)`` grid) the encoder will produce for it, without running the network.
``forward(list of data) -> list of (N_i, dim)`` runs inside the model, so towers can be frozen
or trained end to end.

Config (``OmniConfig.media[modality]``, a recipe's ``model.media.<modality>``)::

    image: {tokenizer: ImageTokenizerConfig fields, connector: ConnectorConfig fields,
            tagger: TaggerConfig fields (optional)}
    video: {tokenizer: ImageTokenizerConfig fields, video: VideoTokenizerConfig fields, connector: ...}
    audio: {encoder: {kind: whisper_style, size, n_mels, path, freeze, input_mode}, connector: ...,
            normalize: none|mean|meanvar, spec_augment: {...}, stack: int, ctc_weight: float,
            ctc_on: features|connector, precompute: bool, pad_to_s: float}

Speech recognition helpers on the audio side (what the small-data ASR recipes need):
``normalize: mean`` subtracts each mel band's mean over the utterance (``meanvar`` also divides by
its standard deviation); ``spec_augment`` masks
random frequency bands and time spans while training (SpecAugment); ``stack`` concatenates that
many consecutive encoder features into one token (fewer backbone tokens per second);
``ctc_weight`` adds a CTC head over the text vocabulary on the encoder features, trained on the
transcript a slot carries as ``labels`` (an auxiliary loss, as in hybrid CTC/attention ASR).
``ctc_on: connector`` puts that loss on the connector's tokens instead, scored against the language
model's own input embeddings (one learned scale; blank = the pad id's row): it pulls each speech token
towards the embedding of the word said there, what a frozen encoder's connector must learn for an
LLM to read speech (a stack-wise per-token connector only).
``precompute`` (a frozen tower only) runs the encoder once in ``prepare``, so a dataset holds
features instead of mels and training steps skip the tower: a pretrained Whisper encoder costs
one forward pass per clip instead of one per step. Image and video towers do the same with
``tokenizer.precompute``: a slot then carries the tower's features, ``(h*w, D)`` for an image and
``(N, h, w, D)`` for a video's frames, and the model runs only the video's temporal part and the
connector. ``pad_to_s: 30`` pads every clip with silence
to 30 s before the log-mel, the window a whole Whisper model reads (its decoder attends to all
1500 features). An image ``tagger`` (:mod:`omni.tokenizers.tagger`) writes a pretrained classifier's
top labels as text after each image (:meth:`ImageEncoder.tag_text`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from omni.model.connectors import ConnectorConfig
from omni.schema import choice, from_dict, positive
from omni.tokenizers.audio import LogMel, audio_encoder, standalone_encoder_config
from omni.tokenizers.base import MEL_SAMPLE_RATE
from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer, standalone_config
from omni.tokenizers.tagger import ImageTagger, TaggerConfig
from omni.tokenizers.video import VideoTokenizerConfig, build_video_tokenizer

AUDIO_SAMPLE_RATE = MEL_SAMPLE_RATE  # the log-mel front end's rate (Whisper)


@dataclass
class SpecAugment:
    """SpecAugment's masking (Park et al., 2019), applied to training mels only: ``freq_masks``
    bands of up to ``freq_width`` mel bins and ``time_masks`` spans of up to ``time_width`` of the
    utterance, set to the utterance mean."""

    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width: float = 0.1

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        mel = mel.clone()
        n_mels, frames = mel.shape
        fill = mel.mean()
        for _ in range(self.freq_masks):
            w = int(torch.randint(0, self.freq_width + 1, ()))
            f0 = int(torch.randint(0, max(1, n_mels - w), ()))
            mel[f0:f0 + w] = fill
        for _ in range(self.time_masks):
            w = int(torch.randint(0, int(self.time_width * frames) + 1, ()))
            t0 = int(torch.randint(0, max(1, frames - w), ()))
            mel[:, t0:t0 + w] = fill
        return mel


@dataclass
class AudioEncoderConfig:
    """``model.media.audio.encoder``: the arguments of :func:`omni.tokenizers.audio.audio_encoder`."""

    kind: str = "whisper_style"
    size: str = "tiny"
    n_mels: int = 80
    path: str | None = None
    freeze: bool = False
    input_mode: str | None = None  # pad | slice; None: pad for a tower from `path`, else slice
    whisper_config: dict | None = None
    subsample: int = 2
    conv_kernel: int = 0
    stem: str = "conv1d"
    stem_channels: int = 32


@dataclass
class ImageMediaConfig:
    """``model.media.image``: an image tower and the connector to the model width; optionally a
    tagger whose labels follow each image as text."""

    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    tagger: TaggerConfig | None = None

    def validate(self, key: str) -> None:
        self.tokenizer.validate()
        self.connector.validate()
        if self.tagger is not None:
            self.tagger.validate(f"{key}.tagger")
            if self.tagger.retrieve_by == "tower" and not self.tokenizer.frozen:
                raise ValueError(f"{key}.tagger.retrieve_by: tower needs a frozen image tower (its memory's "
                                 f"features are computed once); set {key}.tokenizer.freeze: true")


@dataclass
class VideoMediaConfig:
    """``model.media.video``: a per-frame image tower, the video's frame sampling and time, a connector."""

    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    video: VideoTokenizerConfig = field(default_factory=VideoTokenizerConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)

    def validate(self, key: str) -> None:
        self.tokenizer.validate()
        self.video.validate()
        self.connector.validate()


@dataclass
class AudioMediaConfig:
    """``model.media.audio``: log-mel, an encoder and a connector, with the speech options (see the
    module docstring)."""

    encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    normalize: str = "none"
    spec_augment: SpecAugment | None = None
    stack: int = 1
    ctc_weight: float = 0.0
    ctc_on: str = "features"
    precompute: bool = False
    pad_to_s: float | None = None

    def validate(self, key: str) -> None:
        choice(f"{key}.normalize", self.normalize, ("none", "mean", "meanvar"))
        positive(f"{key}.stack", self.stack)
        choice(f"{key}.ctc_on", self.ctc_on, ("features", "connector"))
        if self.precompute and not self.encoder.freeze:
            raise ValueError(f"{key}.precompute needs a frozen encoder (encoder.freeze: true)")
        if self.precompute and self.spec_augment is not None:
            raise ValueError(f"{key}.spec_augment acts on mels, so it cannot be used with precompute")
        self.connector.validate()


MEDIA_CONFIGS = {"image": ImageMediaConfig, "video": VideoMediaConfig, "audio": AudioMediaConfig}


def media_config(modality: str, raw, prefix: str = "model.media"):
    """A recipe's (or config.json's) ``media.<modality>`` section as its typed config, checked key
    by key and validated: the one place a media section is read."""
    if modality not in MEDIA_CONFIGS:
        raise ValueError(f"unknown media modality {modality!r} in {prefix}; "
                         f"choose from {', '.join(MEDIA_CONFIGS)}")
    key = f"{prefix}.{modality}"
    cfg = from_dict(MEDIA_CONFIGS[modality], raw, key + ".")
    cfg.validate(key)
    return cfg


class MediaEncoder(nn.Module):
    """Base: ``connector`` maps the encoder's features to the model width; ``section`` is the
    config section it was built from (as written: what a checkpoint records), ``cfg`` its typed
    form (:func:`media_config`)."""

    modality = ""
    section: dict
    # what ``prepare`` returns for a given config, versioned: part of the processor's fingerprint,
    # so a prepared-sample cache of an older form is rebuilt, never misread (images and video:
    # 2 = uint8 pixels normalised in ``forward``; 1 = float32 normalised pixels)
    data_format = 1

    def __init__(self, section: dict):
        super().__init__()
        self.section = section
        self.cfg = media_config(self.modality, section)
        # training on several processes: an auxiliary head runs (at zero weight) on a batch without
        # labels too, so that every process's step uses the same parameters (OmniModel.every_tower)
        self.always_aux = False
        self._dummy: torch.Tensor | None = None

    def _blank(self) -> torch.Tensor:
        """A small input of zeros, as ``prepare`` takes it (pixels, frames or a waveform)."""
        raise NotImplementedError

    def dummy(self) -> torch.Tensor:
        """This encoder's input for a step whose batch holds none of its modality, when every tower
        must run anyway (``OmniModel.every_tower``): ``prepare`` of blank media, made once. The
        global RNG streams are left as they were (a video's frame shuffle draws from them)."""
        if self._dummy is None:
            with torch.random.fork_rng(devices=[]):
                self._dummy = self.prepare(self._blank())[0]
        return self._dummy

    def standalone_config(self) -> dict:
        """``section`` as a checkpoint records it: with a tower loaded from a local folder (``path``)
        described by its own config instead, so the checkpoint loads without that folder."""
        return self.section

    def prepare(self, obj) -> tuple[torch.Tensor, tuple[int, int, int]]:
        raise NotImplementedError

    def precomputed(self) -> nn.Module | None:
        """The frozen tower whose outputs ``prepare`` computes (``precompute``), else None: the
        processor's fingerprint covers its weights, as a cache of its features depends on them."""
        return None

    @torch.no_grad()
    def _precompute(self, run, x: torch.Tensor) -> torch.Tensor:
        """``run(x)`` through the precomputed tower, on its device and without gradients; the result
        on the CPU, as a slot's data."""
        return run(x.to(next(self.precomputed().parameters()).device)).cpu()

    def encode(self, datas: list[torch.Tensor], labels: list | None = None,
               embed: torch.Tensor | None = None):
        """``forward`` plus this encoder's weighted auxiliary loss on ``labels`` (None without one): a
        mean over the clips whose label is not None (OmniModel.encode_media counts them, so that a
        trainer on several processes can weight each one's mean into the global batch's). ``embed``:
        the language model's input embeddings, for a loss scored against them."""
        return self(datas), None

    def _connect(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.connector(feats, mask)


class ImageEncoder(MediaEncoder):
    modality = "image"
    data_format = 2

    def __init__(self, section: dict, dim: int, text_size: int = 0):
        super().__init__(section)
        self.tokenizer = build_image_tokenizer(self.cfg.tokenizer)
        self.connector = self.cfg.connector.build(self.tokenizer.out_dim, dim)
        self.tagger = None if self.cfg.tagger is None else ImageTagger.build(
            self.cfg.tagger, retriever=self.tokenizer.image_feature, key_dim=self.tokenizer.hidden_dim)

    def standalone_config(self) -> dict:
        tokenizer = standalone_config(self.section.get("tokenizer", {}), self.tokenizer)
        tagger = {} if self.tagger is None else {"tagger": self.tagger.standalone()}
        return {**self.section, "tokenizer": tokenizer, **tagger}

    def tag_text(self, image) -> str | None:
        """The text that follows ``image`` (an Image or uint8 pixels) in a prompt: the tagger's labels,
        or None without a tagger (or without a likely label)."""
        return None if self.tagger is None else self.tagger.text(image)

    def precomputed(self) -> nn.Module | None:
        return self.tokenizer if self.cfg.tokenizer.precompute else None

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, 32, 32, dtype=torch.uint8)

    def prepare(self, obj):
        """An :class:`~omni.media.image.Image` or uint8 pixels (3, H, W) -> the pixels resized,
        still uint8 (normalised in ``forward``, on the model's device), or with ``precompute`` the
        tower's features ``(h*w, D)``; and the grid."""
        pixels, grid = self.tokenizer.resize(obj)  # (3, H', W'), (1, h, w)
        if self.precomputed():
            pixels = self._precompute(lambda x: self.tokenizer(x[None])[0], pixels)
        return pixels, self.connector.grid(grid)

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(datas)
        by_shape: dict[tuple, list[int]] = {}
        for i, d in enumerate(datas):
            by_shape.setdefault(tuple(d.shape), []).append(i)
        for idx in by_shape.values():  # same-size images run as one batch
            batch = torch.stack([datas[i] for i in idx])
            feats = self._connect(batch if self.precomputed() else self.tokenizer(batch))
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out


class VideoEncoder(MediaEncoder):
    modality = "video"
    data_format = 2

    def __init__(self, section: dict, dim: int, text_size: int = 0):
        super().__init__(section)
        self.video = build_video_tokenizer(self.cfg.video, build_image_tokenizer(self.cfg.tokenizer))
        self.connector = self.cfg.connector.build(self.video.out_dim, dim)

    def standalone_config(self) -> dict:
        tokenizer = standalone_config(self.section.get("tokenizer", {}), self.video.image_tokenizer)
        return {**self.section, "tokenizer": tokenizer}

    def precomputed(self) -> nn.Module | None:
        return self.video.image_tokenizer if self.cfg.tokenizer.precompute else None

    def _blank(self) -> torch.Tensor:
        return torch.zeros(self.cfg.video.num_frames, 3, 32, 32, dtype=torch.uint8)

    def prepare(self, frames):
        """uint8 frames (N, 3, H, W) -> the frames resized, still uint8 (N, 3, H', W'; normalised in
        ``forward``), or with ``precompute`` the tower's features (N, h, w, D); budgets are checked
        here, before any forward pass (``omni.processor`` samples a video's frames as
        ``self.video.load``)."""
        pixels, grid = self.video.preprocess(frames, normalize=False)  # resized once, here
        if self.precomputed():
            pixels = self._precompute(lambda x: self.video.frame_features([x])[0], pixels)
        return pixels, self.connector.grid(grid)

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = datas if self.precomputed() else self.video.frame_features(datas)
        return [self._connect(self.video.video_tokens(f)[None])[0] for f in feats]


class AudioEncoder(MediaEncoder):
    """Whisper-style input: 16 kHz waveform -> log-mel -> encoder -> (stack) -> connector."""

    modality = "audio"
    bucket_waste = 0.25  # length_buckets: padding allowed per encoder call (inf: one call for all)

    def __init__(self, section: dict, dim: int, text_size: int = 0):
        super().__init__(section)
        cfg = self.cfg
        self.encoder = audio_encoder(**asdict(cfg.encoder))
        self.logmel = LogMel(n_mels=self.encoder.n_mels, pad_to_s=cfg.pad_to_s)
        self.normalize, self.spec_augment, self.stack = cfg.normalize, cfg.spec_augment, cfg.stack
        self.ctc_weight, self.precompute, self.text_size = cfg.ctc_weight, cfg.precompute, text_size
        if self.ctc_weight and not text_size:
            raise ValueError("model.media.audio.ctc_weight needs the text vocabulary size")
        # blank = the pad id (0), which no transcript contains. On the connector's tokens the classes
        # are the LM's input embeddings (passed to encode), times a learned scale
        on_features = bool(self.ctc_weight) and cfg.ctc_on == "features"
        self.ctc_head = nn.Linear(self.encoder.out_dim, text_size) if on_features else None
        self.ctc_scale = nn.Parameter(torch.ones(())) if self.ctc_weight and not on_features else None
        if self.precompute and not getattr(self.encoder, "frozen", False):
            raise ValueError("model.media.audio.precompute needs a frozen encoder (encoder.freeze: true)")
        self.connector = cfg.connector.build(self.encoder.out_dim * self.stack, dim)

    def standalone_config(self) -> dict:
        encoder = standalone_encoder_config(self.section.get("encoder", {}), self.encoder)
        return {**self.section, "encoder": encoder}

    def precomputed(self) -> nn.Module | None:
        return self.encoder if self.precompute else None

    def _blank(self) -> torch.Tensor:
        return torch.zeros(AUDIO_SAMPLE_RATE // 2)  # 0.5 s of silence

    def num_tokens(self, num_frames: int) -> int:
        return -(-self.encoder.num_tokens(num_frames) // self.stack)

    def prepare(self, wave):
        """A 16 kHz waveform (T,) -> log-mel (n_mels, F) (``omni.processor`` decodes and resamples)."""
        if wave.shape[-1] < self.logmel.hop_length:
            wave = F.pad(wave, (0, self.logmel.hop_length - wave.shape[-1]))
        mel = self.logmel(wave.float())
        if self.normalize != "none":
            mel = mel - mel.mean(dim=-1, keepdim=True)
        if self.normalize == "meanvar":
            mel = mel / (mel.std(dim=-1, keepdim=True) + 1e-5)
        grid = self.connector.grid((self.num_tokens(mel.shape[-1]), 1, 1))
        if self.precompute:  # the frozen tower's features (N, D) are the slot's data
            return self._precompute(lambda x: self.encoder(x[None])[0], mel), grid
        return mel, grid

    def _features(self, datas: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features (B, N_max, D) and each clip's real feature count (B,)."""
        if self.precompute:  # datas are features already
            n = torch.tensor([d.shape[0] for d in datas])
            return torch.stack([F.pad(d, (0, 0, 0, int(n.max()) - d.shape[0])) for d in datas]), n
        if self.training and self.spec_augment is not None:
            datas = [self.spec_augment(d) for d in datas]
        lengths = [d.shape[-1] for d in datas]
        n = torch.tensor([self.encoder.num_tokens(f) for f in lengths])
        if getattr(self.encoder, "input_mode", "slice") == "pad":  # every clip in a 30-s window anyway
            return self.encoder(_pad_mels(datas), mel_lengths=torch.tensor(lengths)), n
        # Ours masks padding frames out of attention, but still computes them: clips of similar
        # length go through together, so a 10 s sound does not pad twenty 2 s utterances to 10 s.
        order, parts = [], []
        for group in length_buckets(lengths, self.bucket_waste):
            feats = self.encoder(_pad_mels([datas[i] for i in group]),
                                 mel_lengths=torch.tensor([lengths[i] for i in group]))
            parts.append(F.pad(feats, (0, 0, 0, int(n.max()) - feats.shape[1])))
            order += group
        return torch.cat(parts)[torch.tensor(order).argsort()], n

    def forward(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._split(*self._connected(*self._features(datas)))

    def _connected(self, feats: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, N, D) -> the connector's tokens (B, N', dim) and each clip's real count."""
        if self.stack > 1:  # (B, N, D) -> (B, ceil(N/s), s*D): s consecutive features per token
            B, N, D = feats.shape
            feats = F.pad(feats, (0, 0, 0, -N % self.stack)).reshape(B, -1, self.stack * D)
            n = -(-n // self.stack)
        mask = torch.arange(feats.shape[1])[None, :] < n[:, None]
        out = self._connect(feats, mask.to(feats.device))
        if out.shape[1] != feats.shape[1]:  # a query connector: a fixed number of tokens per clip
            n = torch.full_like(n, out.shape[1])
        return out, n

    @staticmethod
    def _split(out: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
        return [out[i, :int(n[i])] for i in range(len(out))]

    def _ctc_logits(self, feats, n, embed) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """The CTC head's logits (B, N, text_size), their lengths, and the connector's tokens with
        their counts."""
        out, m = self._connected(feats, n)
        if self.ctc_head is not None:
            return self.ctc_head(feats), n, (out, m)
        if embed is None:
            raise ValueError("ctc_on: connector scores against the language model's embeddings: pass embed")
        if out.shape[1] != -(-feats.shape[1] // self.stack):
            raise ValueError("ctc_on: connector needs a connector with one token per (stacked) feature, "
                             f"not {self.cfg.connector.kind}")
        return (out @ embed[:self.text_size].T) * self.ctc_scale, m, (out, m)

    def encode(self, datas, labels=None, embed=None):
        feats, n = self._features(datas)
        # the CTC loss covers the clips that carry a transcript (a mixture's sound clips do not)
        keep = [i for i, lab in enumerate(labels or []) if lab is not None]
        if not self.ctc_weight or not keep:
            out = self._split(*self._connected(feats, n))
            if self.ctc_weight and labels is not None and self.always_aux:  # uses the head, adds nothing
                head = self.ctc_scale if self.ctc_head is None else self.ctc_head(feats[:1, :1]).sum()
                return out, 0 * head
            return out, None
        logits, lengths, connected = self._ctc_logits(feats, n, embed)
        log_probs = logits[keep].float().log_softmax(-1).transpose(0, 1)  # (N, B, V)
        targets = torch.cat([labels[i].long() for i in keep]).to(feats.device)
        target_lengths = torch.tensor([len(labels[i]) for i in keep])
        ctc = F.ctc_loss(log_probs, targets, lengths[keep], target_lengths, blank=0, zero_infinity=True)
        return self._split(*connected), self.ctc_weight * ctc

    @torch.no_grad()
    def ctc_log_probs(self, datas: list[torch.Tensor], embed: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The auxiliary CTC head's log-probabilities ``(B, N, text_size)`` (blank = id 0) and each
        clip's real frame count ``(B,)``: for greedy CTC transcripts and joint CTC/attention decoding.
        ``embed``: the language model's input embeddings, for ``ctc_on: connector``."""
        if not self.ctc_weight:
            raise ValueError("this audio encoder has no CTC head (model.media.audio.ctc_weight)")
        logits, n, _ = self._ctc_logits(*self._features(datas), embed)
        return logits.float().log_softmax(-1), n

    def ctc_decode(self, datas: list[torch.Tensor], embed: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy CTC transcripts (text ids) from the auxiliary head: repeats merged, blanks dropped."""
        log_probs, n = self.ctc_log_probs(datas, embed)
        best = log_probs.argmax(-1)
        out = []
        for row, length in zip(best.tolist(), n.tolist()):
            ids = [t for i, t in enumerate(row[:length]) if t != 0 and (i == 0 or t != row[i - 1])]
            out.append(ids)
        return out


def _pad_mels(mels: list[torch.Tensor]) -> torch.Tensor:
    """(n_mels, F_i) clips -> (B, n_mels, F_max), each padded with its own quietest value."""
    longest = max(m.shape[-1] for m in mels)
    return torch.stack([F.pad(m, (0, longest - m.shape[-1]), value=float(m.min())) for m in mels])


def length_buckets(lengths: list[int], waste: float = 0.25) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, shortest first: a group grows while
    padding every member to its longest costs at most ``waste`` more than the real lengths."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= (1 + waste) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


ENCODERS = {"image": ImageEncoder, "video": VideoEncoder, "audio": AudioEncoder}
MODALITIES = tuple(ENCODERS)


def build_media_encoder(modality: str, section: dict, dim: int, text_size: int = 0) -> MediaEncoder:
    """The encoder for ``model.media.<modality>`` (its section checked by :func:`media_config`)."""
    if modality not in ENCODERS:
        raise ValueError(f"unknown media modality {modality!r} in model.media; "
                         f"choose from {', '.join(ENCODERS)}")
    return ENCODERS[modality](section, dim, text_size)
