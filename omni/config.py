"""Typed recipe configs: YAML files validated into dataclasses, with ``a.b=c`` overrides.

Precedence: command-line overrides > recipe file > dataclass defaults. Unknown keys, wrong
types and impossible combinations raise ``ValueError`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omni.data.tasks import TASKS, TaskSpec
from omni.model.audio_codes import PATTERNS
from omni.model.backbone import ATTN_BACKENDS, CHECKPOINTING, SIZES
from omni.model.blip2 import Blip2Config
from omni.model.contrastive import ContrastiveConfig
from omni.model.lora import LoraSpec
from omni.model.media_encoder import MODALITIES, media_config
from omni.schema import choice, did_you_mean, from_dict, positive
from omni.vocab import SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]


# what a pretrained checkpoint decides (ModelConfig.pretrained)
PRETRAINED_OWNS = ("size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len",
                   "rope_theta", "tie_embeddings")


@dataclass
class ModelConfig:
    """The backbone: a named size (``omni.model.backbone.SIZES``) plus per-field overrides."""

    size: str = "tiny"
    dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    attn_backend: str = "sdpa"
    tie_embeddings: bool = True
    mrope: bool = False  # 3-D (time, height, width) rotary positions for image/video
    audio_pattern: str = "delay"  # how audio codes are laid out: delay (MusicGen) or flatten (AudioLM)
    media: dict = field(default_factory=dict)  # modality -> encoder + connector (omni/model/media_encoder.py)
    # None: media features are tokens in the sequence; {every: N, gated, ffn, media}: cross-attention
    # blocks read them (Whisper's decoder: every 1; Flamingo: gated), only the modalities listed
    # in `media` when it is given (the others stay tokens), see omni/model/backbone.py
    cross_attention: dict | None = None
    # {embed_dim, temperature}: a contrastive head for data.task=contrastive (omni/model/contrastive.py)
    contrastive: dict | None = None
    # {itc, itm, itg: loss weights (0 = off), embed_dim, temperature}: BLIP-2 stage 1 on data.task=contrastive
    # pairs, a Q-Former connector trained with three losses (omni/model/blip2.py)
    blip2: dict | None = None
    # an omni checkpoint folder (e.g. `omni import smollm2 --out weights/smollm2-135m`): the backbone
    # (its context included), vocabulary, tokenizer and weights start from it; media, cross_attention
    # and mrope add to it
    pretrained: str | None = None

    def validate(self):
        if self.pretrained is not None:
            owned = [f.name for f in dataclasses.fields(self) if f.name in PRETRAINED_OWNS
                     and getattr(self, f.name) != f.default]
            if owned:
                raise ValueError(f"model.pretrained takes {', '.join(owned)} from {self.pretrained}; "
                                 f"leave model.{owned[0]} out")
        choice("model.size", self.size, SIZES)
        choice("model.attn_backend", self.attn_backend, ATTN_BACKENDS)
        choice("model.audio_pattern", self.audio_pattern, PATTERNS)
        positive("model.max_seq_len", self.max_seq_len)
        for modality, section in self.media.items():
            media_config(modality, section)
        for modality in (self.cross_attention or {}).get("media") or []:
            if modality not in self.media:
                raise ValueError(f"model.cross_attention.media names {modality!r}, which model.media has "
                                 f"no encoder for (has: {', '.join(self.media) or 'none'})")
        if self.contrastive is not None:
            ContrastiveConfig.parse(self.contrastive)
        if self.blip2 is not None:
            Blip2Config.parse(self.blip2)
            if self.contrastive is not None:
                raise ValueError("model.contrastive and model.blip2 are two objectives for the same pairs; "
                                 "keep one")
            if self.cross_attention is not None:
                raise ValueError("model.blip2 puts the query outputs in the sequence; it cannot be used with "
                                 "model.cross_attention")


def _pretrained_media(path: str | None) -> dict:
    """The media sections of the checkpoint ``model.pretrained`` names (an imported Whisper reads
    audio); none while it is missing (the run reports that)."""
    f = Path(path) / "config.json" if path else None
    if f is None or not f.is_file():
        return {}
    return json.loads(f.read_text(encoding="utf-8")).get("media") or {}


@dataclass
class TokenizerConfig:
    """Where the text tokenizer lives; ``omni train`` trains it from ``spec`` when ``path`` is missing."""

    spec: str = "text_spm"
    path: str = "runs/tokenizers/text_spm"


@dataclass
class CodecRef:
    """The recipe's ``codec`` section: where the audio codec whose codes the model reads and writes
    is (``omni tokenizer train audio_codec_tiny``); its architecture is
    :class:`omni.tokenizers.audio.CodecConfig`."""

    path: str | None = None


@dataclass
class TaskData(TaskSpec):
    """One task's data: the task (the fields of :class:`omni.data.tasks.TaskSpec`, what turns the
    rows into samples) and a directory ``path`` holding each split's manifest, ``files``
    (``train.jsonl`` and ``val.jsonl`` by default; a glob of JSONL, Parquet or Arrow shards, see
    :mod:`omni.data.manifest`). In a mixture, ``weight`` is the task's share of the training
    samples (relative to the others), ``loss_weight`` how much each of its training targets counts
    in the loss (a weighted mean over the step's targets; held-out losses stay unweighted) and
    ``name`` labels it."""

    path: str = "data/text"
    # each split's manifest under `path`: a file or a glob of .jsonl/.parquet/.arrow shards
    files: str = "{split}.jsonl"
    weight: float = 1.0
    loss_weight: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or (f"{self.task}:{self.media}" if self.task in ("caption", "fewshot")
                             else self.task)

    def validate(self, key: str = "data"):
        choice(f"{key}.task", self.task, TASKS)
        choice(f"{key}.media", self.media, MODALITIES)
        if "{split}" not in self.files or not self.files.endswith((".jsonl", ".parquet", ".arrow")):
            raise ValueError(f"{key}.files must name each split's manifest with {{split}} and end in .jsonl, "
                             f".parquet or .arrow (e.g. {{split}}/*.parquet), got {self.files!r}")
        if not self.weight > 0:
            raise ValueError(f"{key}.weight must be > 0, got {self.weight}")
        if not self.loss_weight > 0:
            raise ValueError(f"{key}.loss_weight must be > 0, got {self.loss_weight}")
        if self.ways < 1 or self.episodes < 0:
            raise ValueError(f"{key}.ways must be >= 1 and {key}.episodes >= 0, "
                             f"got {self.ways} and {self.episodes}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise ValueError(f"{key}.{name} must be seconds >= 0 (or null), got {value!r}")
        if (self.start is not None or self.end is not None) and self.media != "video":
            raise ValueError(f"{key}.start / {key}.end cut video clips; {key}.media is {self.media!r}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"{key}.end ({self.end}) must be after {key}.start ({self.start})")


@dataclass
class DataConfig(TaskData):
    """The recipe's ``data`` section: one task (the fields of :class:`TaskData`), or a
    ``mixture`` of tasks whose samples are drawn by weight and packed into shared rows."""

    seq_len: int = 256
    on_bad_sample: str = "skip"
    mixture: list[TaskData] = field(default_factory=list)
    # prepared samples (omni.data.cache): "" keeps each task's in a `cache` folder beside its manifests
    cache_dir: str = ""
    cache_workers: int = 0  # processes that build a cache's shards (0: the training process)
    # > 0: training samples grouped into this many length buckets, each packed into rows of its own,
    # and each micro-batch drawn from one bucket (less padding for audio clips of mixed lengths)
    length_buckets: int = 0

    def tasks(self) -> list[TaskData]:
        return list(self.mixture) or [self]

    def validate(self):
        choice("data.on_bad_sample", self.on_bad_sample, ("skip", "error"))
        if self.cache_workers < 0:
            raise ValueError(f"data.cache_workers must be >= 0 (0: build in the training process), "
                             f"got {self.cache_workers}")
        positive("data.seq_len", self.seq_len)
        if self.length_buckets < 0:
            raise ValueError(f"data.length_buckets must be >= 0 (0: off), got {self.length_buckets}")
        if self.length_buckets and any(TASKS[p.task].pairs for p in self.tasks() if p.task in TASKS):
            raise ValueError("data.length_buckets groups packed rows; the contrastive task's pairs are "
                             "not packed")
        if not self.mixture:
            return super().validate()
        for i, part in enumerate(self.mixture):
            part.validate(f"data.mixture[{i}]")
        labels = [p.label for p in self.mixture]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"data.mixture has two tasks labelled {dup[0]!r}; give them distinct `name`s")


@dataclass
class Optimization:
    """The knobs both trainers read, declared once: the model's ``train:`` section
    (:class:`TrainConfig`) and a codec spec (:class:`omni.train.codec.CodecTrainSpec`). Training
    stops after ``steps`` or ``max_minutes`` (> 0; evaluations excluded), the learning rate warms
    up over ``warmup_steps`` then decays, AdamW takes ``betas`` and ``weight_decay``, gradients are
    clipped to ``grad_clip``, ``max_skipped_steps`` updates in a row skipped for a NaN/inf loss or
    gradient stop the run, and a line is logged every ``log_every`` steps."""

    seed: int = 0
    steps: int = 1000
    max_minutes: float = 0.0
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    max_skipped_steps: int = 10
    log_every: int = 10

    def validate_optimization(self, prefix: str = "") -> None:
        """The checks both trainers make; ``prefix`` names the section (``train.``)."""
        for key in ("steps", "batch_size", "log_every", "max_skipped_steps"):
            positive(f"{prefix}{key}", getattr(self, key))
        if self.lr <= 0:
            raise ValueError(f"{prefix}lr must be > 0, got {self.lr}")
        if self.max_minutes < 0:
            raise ValueError(f"{prefix}max_minutes must be >= 0 (0: no time budget), got {self.max_minutes}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{prefix}betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class TrainConfig(Optimization):
    out_dir: str = "runs/text_tiny"
    grad_accum: int = 1
    min_lr_ratio: float = 0.1
    mixed_precision: str = "auto"
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True
    overwrite: bool = False  # a new run in a folder that holds one moves the old run aside (never deletes it)
    resume_changed: bool = False  # resume although the recipe changed in a way that breaks exactness
    progress: bool = True  # a bar on a terminal, a log line every ~10% of the steps otherwise
    num_workers: int = 0  # DataLoader worker processes reading and packing rows (0: in the training process)
    # the backbone's blocks through torch.compile (omni/model/compiled.py): the same losses, a faster step
    # once the first one has compiled (tens of seconds)
    compile: bool = False
    # none, blocks (each block recomputed in the backward pass: least memory, ~1/3 more compute) or
    # selective (matmul and attention outputs kept, norms/rotary/activations recomputed)
    activation_checkpointing: str = "none"
    # > 0: the output head fused with its cross-entropy (omni/model/head.py) over this many rows at a
    # time, so no more than a chunk's (tokens x vocabulary) fp32 logits ever exist (0: all at once)
    loss_chunk: int = 0
    # all: the token loss plus the media encoders' auxiliary losses (CTC); aux: those alone, with no
    # language-model forward (a stage that teaches a connector to read speech before the LM sees it)
    loss: str = "all"
    export: str = "last"  # the model written to out_dir: the last weights, or those best by train.best_metric
    # what "best" means: val_loss, or a task's own metric on its validation split,
    # "<task label>.<metric>" (e.g. stamps.cider_d: greedy captions scored as omni eval scores them,
    # over the split's first eval_batches x batch_size rows); wer, cer, loss and ppl are better lower,
    # anything else higher
    best_metric: str = "val_loss"
    eval_at_start: bool = False  # evaluate the starting weights too (a stage's init_from is then a candidate)
    # several processes: ddp (a whole model per process, gradients all-reduced) or fsdp (FSDP2: weights,
    # gradients and optimizer state sharded over the processes; omni/train/parallel.py)
    parallel: str = "ddp"
    # stages (omni/train/stages.py): globs over module names that train (None: all), a run whose
    # weights to start from (a list: each run in turn, a later one's tensors over an earlier's), and
    # LoRA adapters (merged into plain weights on save)
    trainable: list[str] | None = None
    init_from: str | list[str] | None = None
    lora: LoraSpec | None = None
    # globs over module names (as trainable's) -> a multiple of train.lr for their parameters, the
    # first matching pattern winning: e.g. {encoders.audio: 0.5} for an encoder whose batch is a
    # mixture task's few clips while the decoder's is every task's tokens
    lr_scale: dict[str, float] | None = None

    def validate(self):
        self.validate_optimization("train.")
        for key in ("grad_accum", "eval_every", "eval_batches", "save_every", "keep_checkpoints"):
            positive(f"train.{key}", getattr(self, key))
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0 (0: read data in the training process), "
                             f"got {self.num_workers}")
        for pattern, scale in (self.lr_scale or {}).items():
            if scale <= 0:
                raise ValueError(f"train.lr_scale.{pattern} must be > 0, got {scale}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"train.warmup_steps must be in [0, train.steps={self.steps}], "
                             f"got {self.warmup_steps}")
        choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        choice("train.export", self.export, ("last", "best"))
        choice("train.loss", self.loss, ("all", "aux"))
        choice("train.activation_checkpointing", self.activation_checkpointing, CHECKPOINTING)
        if self.loss_chunk < 0:
            raise ValueError(f"train.loss_chunk must be >= 0 (0: the loss over all rows at once), "
                             f"got {self.loss_chunk}")
        choice("train.parallel", self.parallel, ("ddp", "fsdp"))
        if self.parallel == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("train.parallel=fsdp trains in bf16 or fp32 (train.mixed_precision: bf16, no or "
                             "auto); fp16's loss scaling is not wired for sharded gradients")
        if isinstance(self.init_from, list) and not self.init_from:
            raise ValueError("train.init_from is an empty list (leave it out to start from scratch)")
        if self.trainable is not None and not self.trainable:
            raise ValueError("train.trainable is an empty list: nothing would train "
                             "(leave it out to train everything)")
        if self.lora is not None:
            self.lora.validate()


@dataclass
class RecipeConfig:
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    codec: CodecRef = field(default_factory=CodecRef)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        for part in (self.model, self.data, self.train):
            part.validate()
        if self.data.seq_len > self.model.max_seq_len and not self.model.pretrained:  # else: checked on build
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        media = {**_pretrained_media(self.model.pretrained), **self.model.media}
        for part in self.data.tasks():
            task = TASKS[part.task]
            if task.reads_media and not task.pairs and part.media not in media:
                raise ValueError(f"data task {part.label} reads {part.media} but model.media has no "
                                 f"{part.media} encoder (has: {', '.join(media) or 'none'})")
            pair_model = self.model.contrastive is not None or self.model.blip2 is not None
            if task.pairs and (not pair_model or part.media not in media):
                raise ValueError(f"data task {part.label} needs model.contrastive (or model.blip2) and a "
                                 f"model.media.{part.media} encoder")
            if self.model.blip2 is not None and not task.pairs:
                raise ValueError(f"model.blip2 trains on (image, text) pairs: data.task must be contrastive, "
                                 f"got {part.task!r}")
            if task.pairs and self.data.mixture:
                raise ValueError(f"a {part.task} task trains on pairs, not packed rows: it cannot be part of "
                                 "data.mixture")
            if task.writes_audio and not self.codec.path:
                raise ValueError(f"data task {part.label} writes audio codes, so it needs codec.path "
                                 "(a trained audio codec)")
        best = self.train.best_metric
        if best != "val_loss":
            labels = [p.label for p in self.data.tasks()]
            label, _, key = best.rpartition(".")
            if label not in labels or not key:
                raise ValueError(f"train.best_metric must be val_loss or <task label>.<metric> with a task "
                                 f"of data ({', '.join(labels)}), e.g. {labels[0]}.cider_d; got {best!r}")
        if self.train.loss == "aux" and not any((m or {}).get("ctc_weight") for m in media.values()):
            raise ValueError("train.loss=aux trains on the media encoders' auxiliary loss, but no "
                             "model.media encoder has one: set model.media.audio.ctc_weight")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TextTokenizerSpec:
    """How to train the SentencePiece text tokenizer (``tokenizers/text_spm.yaml``)."""

    kind: str = "sentencepiece"
    corpus: str = "data/text/train.jsonl"
    out: str = "runs/tokenizers/text_spm"
    vocab_size: int = 4096
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    max_sentences: int = 300000
    seed: int = 0

    def validate(self):
        choice("kind", self.kind, ("sentencepiece",))
        choice("model_type", self.model_type, ("unigram", "bpe", "word"))
        minimum = 4 + len(SPECIAL_TOKENS) + 32
        if self.vocab_size < minimum:
            raise ValueError(f"vocab_size must be >= {minimum} (meta pieces + special tokens), "
                             f"got {self.vocab_size}")


# ---------------------------------------------------------------------------------------------
# Loading


def find_recipe(name_or_path: str) -> Path:
    """A recipe by path, or by name under ``recipes/`` (``text/tiny`` -> ``recipes/text/tiny.yaml``)."""
    return _find(name_or_path, "recipes", "recipe")


def find_tokenizer_spec(name_or_path: str) -> Path:
    return _find(name_or_path, "tokenizers", "tokenizer spec")


def _find(name_or_path: str, folder: str, what: str) -> Path:
    p = Path(name_or_path)
    candidates = [p, p.with_suffix(".yaml")]
    for root in (Path.cwd(), REPO_ROOT):
        candidates += [root / folder / name_or_path, root / folder / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted(
        str(f.relative_to(REPO_ROOT / folder).with_suffix("")) for f in (REPO_ROOT / folder).rglob("*.yaml")
    )
    raise ValueError(f"{what} {name_or_path!r} not found (looked for a file and under {folder}/);"
                     f"{did_you_mean(name_or_path, available)} available: {', '.join(available) or 'none'}")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    path = find_recipe(name_or_path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem if path.parent.name == "recipes" else
                   f"{path.parent.name}/{path.stem}")
    cfg = from_dict(RecipeConfig, apply_overrides(raw, overrides or []))
    cfg.validate()
    return cfg


def load_tokenizer_spec(name_or_path: str, overrides: list[str] | None = None) -> TextTokenizerSpec:
    raw = read_yaml(find_tokenizer_spec(name_or_path))
    spec = from_dict(TextTokenizerSpec, apply_overrides(raw, overrides or []))
    spec.validate()
    return spec


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    raw = _deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:  # not YAML, so a string: data.files={split}/*.parquet
            node[leaf] = value
    return raw


def _deepcopy(d):
    return {k: _deepcopy(v) for k, v in d.items()} if isinstance(d, dict) else d


_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def split_name(split) -> str:
    """``split`` if it is a plain name: letters, digits, ``_``, ``-`` and ``.`` (not leading).

    A split becomes file names (``<data>/<split>.jsonl``, a run's ``eval_<split>.json``), so a
    value like ``../x`` would read or write outside those folders; it is refused, named."""
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split must be a plain name (letters, digits, '_', '-', and '.' not leading); "
                         f"got {split!r}")
    return split
