"""Training omni's own EnCodec codec, because no pretrained codec weights can be downloaded here.

``omni tokenizer train tokenizers/audio_codec_tiny.yaml`` -> :func:`load_codec_spec` + :func:`train_codec`.
The codec (``encodec`` package SEANet + RVQ, architecture from ``CODEC_PRESETS``) learns from random
crops of the speech and sound corpora (manifests of wav files) with EnCodec's losses: time-domain
L1, multi-scale log-mel L1, the RVQ commitment penalty (codebooks follow the encoder by EMA, with
k-means init and dead-code restarts inside the encodec package) and, optionally, the MS-STFT
discriminator's hinge + feature-matching losses. It reports held-out multi-scale mel distance and
SI-SDR for the untrained codec (codebooks k-means initialised on the first batch) and the trained
one, and saves the codec with :meth:`AudioCodec.save` plus ``report.json`` and ``metrics.jsonl`` (a
row of losses per step).

:class:`CodecTrainer` runs on the model trainer's machinery (``omni.train.loop``): the same
schedule and time budget, the same guard against NaN/inf updates (``max_skipped_steps`` of them in
a row stop the run), atomic saves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omni.config import Optimization, apply_overrides, find_tokenizer_spec, from_dict, read_yaml
from omni.data.speech import manifest_audio
from omni.io import atomic_write_json, exclusive, write_jsonl
from omni.media.audio import Audio, load_audio, resample
from omni.metrics import MultiScaleMel, si_sdr
from omni.progress import progress as progress_bar
from omni.tokenizers.audio import CODEC_PRESETS, AudioCodec, CodecConfig
from omni.train.loop import Schedule, TrainingError, UpdateGuard, set_lr

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The spec


@dataclass
class LossWeights:
    """EnCodec's loss balance (lambda_t, lambda_f, commitment, lambda_g, lambda_feat)."""

    time_l1: float = 0.1
    mel: float = 1.0
    commit: float = 1.0
    adv: float = 3.0
    feat: float = 3.0


@dataclass
class CodecTrainSpec(Optimization):
    """``tokenizers/audio_codec_*.yaml``: which codec to train, on what, for how long.

    ``codec`` starts from ``CODEC_PRESETS[preset]``; keys given under ``codec:`` override it.
    Training stops at ``steps`` or after ``max_minutes`` of wall clock, whichever comes first; the
    learning-rate schedule (warmup, then cosine to 10%) follows whichever is further along.
    """

    kind: str = "audio_codec"
    preset: str = "tiny"
    codec: CodecConfig = field(default_factory=CodecConfig)
    train_manifests: list[str] = field(default_factory=lambda: ["data/speech/train.jsonl",
                                                                 "data/sounds/train.jsonl"])
    val_manifests: list[str] = field(default_factory=lambda: ["data/speech/val.jsonl",
                                                               "data/sounds/val.jsonl"])
    out: str = "runs/tokenizers/audio_codec_tiny"
    # the shared knobs (omni.config.Optimization) whose codec defaults differ from the model's
    steps: int = 3000
    batch_size: int = 8
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    log_every: int = 25
    segment_s: float = 1.0
    init_out_rms: float = 1.0  # data_init's output level (x the batch's rms); 0 keeps encodec's own init
    dead_code_share: float = 0.2
    loss: LossWeights = field(default_factory=LossWeights)
    mel_scales: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    mel_bins: int = 64
    discriminator: bool = False
    disc_filters: int = 32
    disc_lr: float = 3e-4
    disc_start_step: int = 0
    max_train_files: int = 0
    on_bad_sample: str = "skip"
    num_val_clips: int = 32
    val_max_s: float = 3.0
    eval_every: int = 0
    save_every: int = 0
    threads: int = 0
    device: str = "auto"

    def validate(self):
        if self.kind != "audio_codec":
            raise ValueError(f"kind must be audio_codec, got {self.kind!r}")
        if self.preset not in CODEC_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(CODEC_PRESETS)}; got {self.preset!r}")
        self.codec.validate("codec.")
        self.validate_optimization()
        for key in ("mel_bins", "disc_filters", "num_val_clips"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip", "warmup_steps", "max_train_files",
                    "dead_code_share", "init_out_rms", "eval_every", "save_every", "threads",
                    "disc_start_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("disc_lr", "segment_s", "val_max_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if not self.train_manifests or not self.val_manifests:
            raise ValueError("train_manifests and val_manifests must each list at least one manifest")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample must be one of skip, error; got {self.on_bad_sample!r}")
        segment = round(self.segment_s * self.codec.sample_rate)
        if not self.mel_scales or segment <= max(self.mel_scales):
            raise ValueError(f"segment_s={self.segment_s} ({segment} samples) must be longer than the "
                             f"largest mel scale ({max(self.mel_scales or [0])})")
        if segment < self.codec.hop_length:
            raise ValueError(f"segment_s={self.segment_s} is shorter than one codec frame")


def load_codec_spec(name_or_path: str, overrides: list[str] | None = None) -> CodecTrainSpec:
    """Read a codec spec (by path, or by name under ``tokenizers/``), apply ``a.b=c`` overrides, merge
    ``codec:`` over the preset, validate."""
    raw = apply_overrides(read_yaml(find_tokenizer_spec(name_or_path)), overrides or [])
    preset = raw.get("preset", CodecTrainSpec.preset)
    if preset not in CODEC_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(CODEC_PRESETS)}; got {preset!r}")
    codec = raw.get("codec") or {}
    if not isinstance(codec, dict):
        raise ValueError(f"codec must be a mapping of CodecConfig fields, got {codec!r}")
    raw["codec"] = {**dataclasses.asdict(CODEC_PRESETS[preset]), **codec}
    spec = from_dict(CodecTrainSpec, raw)
    spec.validate()
    return spec


# ---------------------------------------------------------------------------------------------
# Data


class RandomCrops:
    """Random fixed-length crops from the audio files of JSONL manifests, read from disk per batch
    (only the crop is decoded), resampled to the codec rate; shorter files are zero-padded."""

    def __init__(self, manifests: list[str], sample_rate: int, max_files: int = 0,
                 on_bad_sample: str = "skip", seed: int = 0):
        import soundfile as sf

        self.sample_rate, self.on_bad_sample = sample_rate, on_bad_sample
        self.rng = random.Random(seed)
        self.files: list[tuple[Path, int, int]] = []  # (path, frames, native rate)
        self.num_bad = 0
        entries = [p for m in manifests for p, _ in manifest_audio(m)]
        if max_files:
            entries = random.Random(seed).sample(entries, min(max_files, len(entries)))
        for path in entries:
            try:
                info = sf.info(str(path))
                if info.frames == 0:
                    raise ValueError("no audio samples")
                self.files.append((path, info.frames, info.samplerate))
            except Exception as e:
                self._bad(path, e)
        if not self.files:
            raise ValueError(f"no usable audio files in {', '.join(manifests)}")

    def _bad(self, path, error):
        if self.on_bad_sample == "error":
            raise ValueError(f"{path}: unusable audio ({error})")
        self.num_bad += 1
        log.warning("skipping %s (%s); on_bad_sample=skip", path, error)

    def batch(self, batch_size: int, num_samples: int) -> torch.Tensor:
        """``(B, num_samples)`` float32 crops."""
        import soundfile as sf

        out = torch.zeros(batch_size, num_samples)
        b = 0
        while b < batch_size:
            if not self.files:
                raise ValueError("every training audio file turned out unusable")
            entry = self.rng.choice(self.files)
            path, frames, sr = entry
            native = math.ceil(num_samples * sr / self.sample_rate)
            start = self.rng.randrange(max(1, frames - native + 1))
            try:
                data, _ = sf.read(str(path), start=start, frames=native, dtype="float32", always_2d=True)
                wave = resample(torch.from_numpy(data.mean(axis=1)), sr, self.sample_rate)[:num_samples]
                if not torch.isfinite(wave).all():
                    raise ValueError("NaN or infinite samples")
            except Exception as e:  # a file that turns bad mid-run is dropped and counted
                self.files.remove(entry)
                self._bad(path, e)
                continue
            out[b, :wave.shape[0]] = wave
            b += 1
        return out


def validation_clips(manifests: list[str], sample_rate: int, num_clips: int,
                     max_s: float) -> list[torch.Tensor]:
    """The first ``num_clips`` clips of at least 0.2 s, taken in turn from each manifest, each cut to
    ``max_s`` seconds."""
    clips = []
    for path in _round_robin([[p for p, _ in manifest_audio(m)] for m in manifests]):
        wave, _ = load_audio(path, sample_rate)
        if wave.shape[0] >= 0.2 * sample_rate:  # the largest mel window must fit
            clips.append(wave[:round(max_s * sample_rate)])
        if len(clips) == num_clips:
            break
    if not clips:
        raise ValueError(f"no validation audio in {', '.join(manifests)}")
    return clips


def _round_robin(lists: list[list]) -> list:
    out = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


@torch.no_grad()
def evaluate_codec(codec: AudioCodec, clips: list[torch.Tensor], mel: MultiScaleMel | None = None) -> dict:
    """Mean multi-scale mel distance and SI-SDR (dB) of ``decode(encode(clip))`` over ``clips``, and
    each codebook's perplexity over their codes (``exp`` of the entropy of its code counts: how many
    of its ``cardinality`` codes it effectively uses)."""
    was_training = codec.model.training
    codec.model.eval()
    device = next(codec.model.parameters()).device
    mel = (mel or MultiScaleMel(codec.sample_rate)).to(device)
    dist, sdr, counts = [], [], torch.zeros(codec.num_codebooks, codec.cardinality)
    for clip in progress_bar(clips, desc=f"scoring the codec on {len(clips)} held-out clips", unit="clip"):
        clip = clip.to(device)
        codes = codec.encode(clip)
        counts += F.one_hot(codes.cpu().long(), codec.cardinality).sum(1)
        out = codec.decode(codes, length=clip.shape[0])
        dist.append(float(mel.distance(out[None], clip[None])))
        sdr.append(float(si_sdr(out, clip)))
    codec.model.train(was_training)
    p = counts / counts.sum(1, keepdim=True)
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum(1))
    return {"mel_distance": sum(dist) / len(dist), "si_sdr": sum(sdr) / len(sdr),
            "codebook_perplexity": [round(float(x), 1) for x in perplexity]}


def reconstruct_manifest(codec: AudioCodec, manifest: str | Path, out_dir: str | Path,
                         limit: int | None = None) -> Path:
    """Pass every clip of a manifest through the codec; writes the wavs and ``out_dir/<name>.jsonl``
    (same rows, ``audio`` pointing at the reconstruction). For intelligibility checks: run the ASR
    model on this manifest and on the original and compare WER."""
    manifest, out_dir = Path(manifest), Path(out_dir)
    rows = []
    for path, row in manifest_audio(manifest)[:limit]:
        wave, _ = load_audio(path, codec.sample_rate)
        rec = codec.decode(codec.encode(wave), length=wave.shape[0]).cpu()
        rel = f"audio/{row.get('id', path.stem)}.wav"
        Audio(rec, codec.sample_rate).save(out_dir / rel)
        rows.append({**row, "audio": rel})
    out = out_dir / manifest.name
    write_jsonl(out, rows)
    return out


# ---------------------------------------------------------------------------------------------
# Training


def _hinge_d(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)]
    return sum(terms) / len(terms)


def _feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """EnCodec's relative feature loss: L1 between discriminator activations / mean |real activation|."""
    terms = [(f - r).abs().mean() / (r.abs().mean() + 1e-8)
             for rs, fs in zip(real, fake, strict=True) for r, f in zip(rs, fs, strict=True)]
    return sum(terms) / len(terms)


@torch.no_grad()
def data_init(model: nn.Module, x: torch.Tensor, out_rms: float) -> None:
    """Data-dependent init of a fresh codec (LSUV; the init weight normalisation was proposed with):
    zero every conv bias, then scale each conv in turn so that on the batch ``x`` ``(B, T)`` its
    output has an rms of 1, and the decoder's last conv ``out_rms`` times the batch's rms.

    With the encodec package's default init each conv shrinks its input by ~0.6 and each ELU
    further: the tiny codec's bottleneck carried rms 0.0009 and its output 0.0001 against speech
    at 0.09, and its random biases were as large as that signal. Training then sat on a plateau
    (train mel loss ~1.05, nothing passing the bottleneck) for its first 300-850 steps; from this
    init it is below 0.7 by step 200 (see ``docs/LOG.md``)."""
    for name, p in model.named_parameters():
        if name.endswith(".bias") and ".lstm." not in name:
            p.zero_()
    convs = [m for part in (model.encoder, model.decoder) for m in part.modules()
             if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    level = out_rms * float(x.pow(2).mean().sqrt())

    def rescale(conv, args, out):  # biases are zero, so the output scales with the weight
        scale = (level if conv is convs[-1] else 1.0) / out.pow(2).mean().sqrt().clamp_min(1e-12)
        (conv.weight_g if hasattr(conv, "weight_g") else conv.weight).mul_(scale)
        return out * scale  # what the rescaled conv outputs: later layers are set on it

    hooks = [conv.register_forward_hook(rescale) for conv in convs]
    try:
        model.decoder(model.encoder(x[:, None]))
    finally:
        for hook in hooks:
            hook.remove()


class DeadCodeReviver:
    """Restarts codebook entries that have stopped being used, at random frames of the current batch.

    The encodec package's own expiry (``threshold_ema_dead_code``) has no effect: the EMA update
    right after it rebuilds every entry from ``embed_avg / cluster_size``, which it leaves alone. Its
    threshold (2 uses per batch) also assumes large batches. Without a working expiry the tiny
    codec's first codebook had collapsed to 16 of its 256 codes (perplexity 10.5). Here an entry is
    dead when its moving-average use falls below ``share`` of a uniform codebook's (frames per
    batch / cardinality); its entry, ``embed_avg`` and ``cluster_size`` are all reset, as
    vector-quantize-pytorch does, so the restart survives the next EMA update."""

    def __init__(self, quantizer, share: float):
        self.share, self.inputs = share, {}
        self.codebooks = [layer._codebook for layer in quantizer.vq.layers]
        for cb in self.codebooks:
            cb.threshold_ema_dead_code = 0  # the package's no-op expiry only costs time
            if share:
                cb.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, codebook, args):
        if codebook.training:
            self.inputs[id(codebook)] = args[0].detach()

    @torch.no_grad()
    def __call__(self) -> int:
        """Revive the dead entries of every codebook that saw a batch since the last call; returns how
        many."""
        revived = 0
        for cb in self.codebooks:
            x = self.inputs.pop(id(cb), None)
            if x is None:
                continue
            x = x.reshape(-1, x.shape[-1])
            size = self.share * x.shape[0] / cb.codebook_size
            dead = cb.cluster_size < size
            n = int(dead.sum())
            if n:
                pick = x[torch.randint(x.shape[0], (n,), device=x.device)]
                cb.embed[dead] = pick
                cb.embed_avg[dead] = pick * size
                cb.cluster_size[dead] = size
                revived += n
        return revived


def train_codec(spec: CodecTrainSpec) -> dict:
    """Train the codec described by ``spec``; save it to ``spec.out``; return (and write) the report.

    ``spec.out`` is locked while training (:func:`omni.io.exclusive`): a second training into the
    same folder is refused at once, naming this one's pid, instead of the two overwriting each
    other's saves and report."""
    spec.validate()
    with exclusive(spec.out, "codec"):
        return CodecTrainer(spec).setup().train()


class CodecTrainer:
    """One codec training run, audiocraft's ``CompressionSolver`` in omni: what is the codec's own
    is here (the model and its data-dependent init, the losses of one :meth:`step`, the held-out
    :meth:`evaluate`, the report); what every trainer shares is the model trainer's
    (``omni.train.loop``: the :class:`Schedule` of steps, time budget and learning rate, the
    :class:`UpdateGuard` that skips NaN/inf updates, :func:`set_lr`), and :meth:`save` is the
    codec's atomic folder write (:func:`omni.io.atomic_dir`).

    The time budget is wall clock from the first step, periodic evaluations and saves included;
    the cosine counts its steps from 0 (see :class:`Schedule`)."""

    def __init__(self, spec: CodecTrainSpec):
        self.spec = spec
        self.schedule = Schedule(spec.lr, spec.steps, spec.warmup_steps, spec.max_minutes, min_ratio=0.1,
                                 cosine_from_warmup=False)
        self.guard = UpdateGuard(spec.max_skipped_steps)
        self.steps_done, self.skipped_steps, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []  # one row per step

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> CodecTrainer:
        """The codec (initialised on the first batch: LSUV-style scaling, k-means codebooks), the data,
        the untrained codec's held-out scores, and the optimizers; in an order that keeps a seed's
        run the same."""
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        self.device = device = torch.device("cuda" if use_cuda else "cpu")
        torch.manual_seed(spec.seed)
        self.codec = codec = AudioCodec(spec.codec).to(device)
        model = codec.model
        sr, self.segment = codec.sample_rate, round(spec.segment_s * codec.sample_rate)
        self.mel = MultiScaleMel(sr, tuple(spec.mel_scales), spec.mel_bins).to(device)
        self.data = RandomCrops(spec.train_manifests, sr, spec.max_train_files, spec.on_bad_sample, spec.seed)
        self.clips = validation_clips(spec.val_manifests, sr, spec.num_val_clips, spec.val_max_s)
        self.num_params = sum(p.numel() for p in model.parameters())
        log.info("codec %s: %.2fM parameters, %d Hz, %.0f frames/s x %d codebooks of %d; %d train files, "
                 "%d val clips", spec.preset, self.num_params / 1e6, sr, codec.frame_rate,
                 codec.num_codebooks, codec.cardinality, len(self.data.files), len(self.clips))

        t = time.perf_counter()
        log.info("initialising the codec on its first batch of %d x %.1f s crops (output scaling, k-means "
                 "codebooks)...", spec.batch_size, spec.segment_s)  # tens of seconds on a CPU
        self.first = self.data.batch(spec.batch_size, self.segment).to(device)  # also the first step's
        if spec.init_out_rms:
            data_init(model, self.first, spec.init_out_rms)
        model.train()
        with torch.no_grad():  # k-means initialisation of the codebooks, as the first training step would do
            model.quantizer.vq(model.encoder(self.first[:, None]), n_q=codec.num_codebooks)
        log.info("initialised in %.0f s", time.perf_counter() - t)
        self.revive = DeadCodeReviver(model.quantizer, spec.dead_code_share)
        self.before = self.evaluate()
        log.info("untrained (k-means codebooks): mel distance %.4f, SI-SDR %.2f dB",
                 self.before["mel_distance"], self.before["si_sdr"])

        self.opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=tuple(spec.betas),
                                     weight_decay=spec.weight_decay)
        self.disc = self.opt_d = None
        if spec.discriminator:
            from encodec.msstftd import MultiScaleSTFTDiscriminator

            self.disc = MultiScaleSTFTDiscriminator(filters=spec.disc_filters).to(device)
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=spec.disc_lr, betas=tuple(spec.betas))
        return self

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        """Step until the schedule ends; log, evaluate and save on their periods; then the final
        evaluation, save and report."""
        spec = self.spec
        self.t0 = time.perf_counter()
        while True:
            self.seconds = time.perf_counter() - self.t0
            if self.schedule.finished(self.steps_done, self.seconds):
                break
            row = self.step()
            step = self.steps_done
            if step % spec.log_every == 0 or step == 1:
                self.log_step(row)
            if spec.eval_every and step % spec.eval_every == 0:
                ev = self.evaluate()
                log.info("step %d  held-out mel distance %.4f  SI-SDR %.2f dB", step, ev["mel_distance"],
                         ev["si_sdr"])
            if spec.save_every and step % spec.save_every == 0:
                self.save()
        return self._finish()

    def step(self) -> dict:
        """One update of the codec (and, from ``disc_start_step``, of the discriminator before it) on
        a fresh batch of random crops; the row of losses it logs."""
        spec, codec, model = self.spec, self.codec, self.codec.model
        factor = self.schedule.factor(self.steps_done, self.seconds)
        set_lr(self.opt, spec.lr * factor)
        x, self.first = self.first, None
        if x is None:
            x = self.data.batch(spec.batch_size, self.segment).to(self.device)
        model.train()
        emb = model.encoder(x[:, None])  # (B, D, T')
        quantized, _, commit = model.quantizer.vq(emb, n_q=codec.num_codebooks)
        y = model.decoder(quantized)[:, 0, :self.segment]  # (B, T)
        parts = {"time_l1": (y - x).abs().mean(), "mel": self.mel.distance(y, x), "commit": commit.mean()}
        if self.disc is not None and self.steps_done >= spec.disc_start_step:
            parts.update(self._adversarial(x, y, factor))
        loss = sum(getattr(spec.loss, k) * v for k, v in parts.items() if k != "disc")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(model.parameters())
        if spec.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        updated = self.guard.update(self.opt, loss.item(), grad_norm)
        self.steps_done += 1
        row = {"step": self.steps_done, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
               "revived": self.revive(), "emb_rms": emb.detach().pow(2).mean().sqrt().item(),
               "lr": spec.lr * factor}
        self.history.append(row)
        if not updated:
            self._skipped(row, grad_norm)
        return row

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor, factor: float) -> dict[str, torch.Tensor]:
        """One discriminator update (hinge loss on real ``x`` against the detached reconstruction
        ``y``), then the codec's adversarial and feature-matching losses against it."""
        set_lr(self.opt_d, self.spec.disc_lr * factor)
        real_logits, _ = self.disc(x[:, None])
        fake_logits, _ = self.disc(y.detach()[:, None])
        d_loss = _hinge_d(real_logits, fake_logits)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        fake_logits, fake_maps = self.disc(y[:, None])
        with torch.no_grad():
            _, real_maps = self.disc(x[:, None])
        return {"adv": sum(F.relu(1 - f).mean() for f in fake_logits) / len(fake_logits),
                "feat": _feature_matching(real_maps, fake_maps), "disc": d_loss.detach()}

    def _skipped(self, row: dict, grad_norm: float) -> None:
        self.skipped_steps += 1
        log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)", row["step"],
                    row["loss"], grad_norm, self.guard.in_a_row)
        if self.guard.exhausted:
            raise TrainingError(
                f"loss is {row['loss']}, gradient norm {grad_norm} at step {row['step']}: "
                f"{self.guard.in_a_row} updates in a row skipped (max_skipped_steps); stopped without "
                "saving. Lower lr or check the data.")

    def log_step(self, row: dict) -> None:
        secs = time.perf_counter() - self.t0
        losses = [k for k in row if k not in ("step", "loss", "revived", "emb_rms", "lr")]
        eta = self.schedule.eta(row["step"], secs, secs / max(row["step"], 1))
        audio_per_s = row["step"] * self.spec.batch_size * self.spec.segment_s / max(secs, 1e-9)
        log.info("step %d/%d  loss %.4f  %s  lr %.2e  %.0f s (ETA %.0f s)  %.1f audio-s/s", row["step"],
                 self.spec.steps, row["loss"],
                 "  ".join([f"{k} {row[k]:.4f}" for k in losses]
                           + [f"revived {row['revived']}", f"emb_rms {row['emb_rms']:.3f}"]),
                 row["lr"], secs, eta, audio_per_s)

    def evaluate(self) -> dict:
        """Held-out multi-scale mel distance, SI-SDR and codebook use (:func:`evaluate_codec`)."""
        return evaluate_codec(self.codec, self.clips, self.mel)

    def save(self) -> Path:
        """The codec into ``spec.out``, replaced as a whole (its lock stays held)."""
        return self.codec.save(self.spec.out)

    def _finish(self) -> dict:
        spec, codec, step = self.spec, self.codec, self.steps_done
        seconds = time.perf_counter() - self.t0
        after = self.evaluate()
        codec.model.eval()
        codec.to("cpu")
        out = self.save()
        before, history = self.before, self.history
        window = max(1, min(25, len(history) // 10))  # mean of the first / last 10% of steps (at most 25)
        head, tail = history[:window], history[-window:]
        report = {
            "out": str(out), "preset": spec.preset, "params": self.num_params, "device": str(self.device),
            "sample_rate": codec.sample_rate, "frame_rate": codec.frame_rate,
            "num_codebooks": codec.num_codebooks, "cardinality": codec.cardinality,
            "bitrate_kbps": codec.frame_rate * codec.num_codebooks * math.log2(codec.cardinality) / 1000,
            "steps": step, "seconds": round(seconds, 1), "audio_seconds_per_second":
                round(step * spec.batch_size * spec.segment_s / max(seconds, 1e-9), 2),
            "train_files": len(self.data.files), "skipped_files": self.data.num_bad,
            "val_clips": len(self.clips), "skipped_steps": self.skipped_steps,
            "loss_first": sum(r["loss"] for r in head) / max(1, len(head)),
            "loss_last": sum(r["loss"] for r in tail) / max(1, len(tail)),
            "before": before, "after": after,
            "mel_distance_reduction": 1 - after["mel_distance"] / before["mel_distance"],
            "si_sdr_gain_db": after["si_sdr"] - before["si_sdr"],
            "spec": dataclasses.asdict(spec),
        }
        write_jsonl(out / "metrics.jsonl", history)
        atomic_write_json(out / "report.json", report)
        if self.data.num_bad:
            log.warning("skipped %d unusable audio files (on_bad_sample=skip)", self.data.num_bad)
        log.info("held-out mel distance %.4f -> %.4f (%.0f%% lower), SI-SDR %.2f -> %.2f dB; saved %s",
                 before["mel_distance"], after["mel_distance"], 100 * report["mel_distance_reduction"],
                 before["si_sdr"], after["si_sdr"], out)
        return report


def format_report(report: dict) -> str:
    """The few lines ``omni tokenizer train`` prints after training a codec."""
    r, b, a = report, report["before"], report["after"]
    return (f"trained a {r['params'] / 1e6:.2f}M-parameter codec ({r['frame_rate']:g} Hz x "
            f"{r['num_codebooks']} codebooks of {r['cardinality']}, {r['bitrate_kbps']:.1f} kbps) for "
            f"{r['steps']} steps in {r['seconds'] / 60:.1f} min on {r['device']}\n"
            f"held-out multi-scale mel distance {b['mel_distance']:.4f} -> {a['mel_distance']:.4f} "
            f"({100 * r['mel_distance_reduction']:.0f}% lower); "
            f"SI-SDR {b['si_sdr']:.2f} -> {a['si_sdr']:.2f} dB\n"
            f"codes in use per codebook (perplexity): "
            f"{' '.join(f'{x:.0f}' for x in a['codebook_perplexity'])} of {r['cardinality']}\n"
            f"saved to {r['out']} (report.json beside it)")
