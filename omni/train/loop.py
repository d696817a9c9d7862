"""The one training loop, on accelerate: single CPU, one GPU, or DDP/FSDP under
``accelerate launch`` / ``torchrun``.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows (the global micro-batch,
split evenly over processes), mixed precision (bf16 on GPU by default), gradient clipping,
warmup + cosine learning rate. Periodic eval on the validation split, metrics as JSONL, a
progress bar with tokens/s, atomic checkpoints with exact resume, and a loss-curve PNG.

Shaped like a torchtune recipe: :class:`Trainer` builds everything in :meth:`Trainer.setup` and
runs a short :meth:`Trainer.train` over its :meth:`~Trainer.step`, :meth:`~Trainer.evaluate` and
:meth:`~Trainer.save`. What does not depend on the model is here for every trainer (the codec's,
``omni.train.codec``, uses it too): :class:`Schedule` (when a run ends, its learning rate on the
way), :class:`UpdateGuard` (no update from a NaN/inf loss or gradient), :func:`set_lr` and
:class:`MetricsLog`.

What a run promises (docs/reliability.md): one process writes a run folder at a time
(``omni.io.exclusive``); a folder holding another run is never trained over (``omni.train.run``);
an update whose loss or gradient is NaN/inf is skipped, and ``train.max_skipped_steps`` of them
in a row stop the run; a checkpoint never holds NaN/inf; SIGTERM/SIGINT stop after the current
step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    broadcast_object_list,
    gather_object,
    set_seed,
)

from omni.config import RecipeConfig, load_tokenizer_spec
from omni.data.tasks import TASKS, TaskSpec, dataset_for, split_manifest
from omni.io import atomic_write_bytes, exclusive
from omni.metrics import lower_is_better
from omni.model.compiled import compile_blocks
from omni.model.objectives import PairObjective
from omni.model.omni_model import bf16_is_emulated
from omni.model_card import write_model_card
from omni.pipeline import Pipeline, pipeline_from_recipe
from omni.processor import TOKENIZER_DIR
from omni.progress import progress
from omni.schema import from_dict
from omni.tokenizers.text import TextTokenizer, corpus_texts, load_text_tokenizer, saved_kind
from omni.train.checkpoint import (
    STATE_FILE,
    NonFiniteError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    non_finite,
    rng_state,
    save_checkpoint,
)
from omni.train.parallel import (
    full_state_dict,
    load_shards,
    no_gradient_sync,
    save_shards,
    shard_model,
    share_of_global_mean,
    whole_copy,
)
from omni.train.run import StopSignals, open_run
from omni.train.stages import apply_stages, init_from, select

log = logging.getLogger(__name__)

# (model, recipe, task label, rows) -> that task's metrics on its validation split (omni.eval.score_split)
Scorer = Callable[[Pipeline, RecipeConfig, str, int], dict]

# Dense bf16 peak FLOP/s per device, for MFU; the first name in the device's name wins (the PCIe
# and NVL H100s before the SXM one). Anything not listed reports MFU as unknown.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``/usr/bin/time -v``'s maximum)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss stayed NaN); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float
    stopped_by: str | None = None  # the signal that stopped the run early (it saved a checkpoint to resume)
    checkpoint: Path | None = None  # the newest checkpoint


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` as ``progress``
    goes from 0 to 1 (the one schedule of the model and codec trainers)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Schedule:
    """When a run ends and its learning rate on the way, for every trainer: ``steps`` optimizer
    steps or ``max_minutes`` of training time, whichever comes first; linear warmup over
    ``warmup_steps``, then cosine from ``lr`` down to ``min_ratio * lr``, following whichever of
    steps and time is further along (so a slow machine still ends at the low lr). The cosine
    counts steps from the end of warmup, or from step 0 with ``cosine_from_warmup=False`` (the
    codec trainer's schedule, kept so that its runs stay the same)."""

    lr: float
    steps: int
    warmup_steps: int = 0
    max_minutes: float = 0.0
    min_ratio: float = 0.1
    cosine_from_warmup: bool = True

    @classmethod
    def of(cls, tc) -> Schedule:
        """The schedule of a recipe's ``train:`` section (``omni.config.TrainConfig``)."""
        return cls(tc.lr, tc.steps, tc.warmup_steps, tc.max_minutes, tc.min_lr_ratio)

    def progress(self, step: int, seconds: float = 0.0) -> float:
        start = self.warmup_steps if self.cosine_from_warmup else 0
        progress = (step - start) / max(1, self.steps - start)
        if self.max_minutes:
            progress = max(progress, seconds / (self.max_minutes * 60))
        return progress

    def factor(self, step: int, seconds: float = 0.0) -> float:
        """The multiple of ``lr`` for ``step`` after ``seconds`` of training."""
        return lr_factor(step, self.warmup_steps, self.progress(step, seconds), self.min_ratio)

    def lr_at(self, step: int, seconds: float = 0.0) -> float:
        return self.lr * self.factor(step, seconds)

    def out_of_time(self, seconds: float) -> bool:
        return bool(self.max_minutes) and seconds >= self.max_minutes * 60

    def finished(self, step: int, seconds: float) -> bool:
        return step >= self.steps or self.out_of_time(seconds)

    def eta(self, step: int, seconds: float, s_per_step: float) -> float:
        """Seconds left at ``s_per_step``: to the last step, or to the time budget if that comes first."""
        left = max(0, self.steps - step) * s_per_step
        return min(left, max(0.0, self.max_minutes * 60 - seconds)) if self.max_minutes else left


def lr_at(step: int, cfg, train_seconds: float = 0.0) -> float:
    """``cfg.lr`` on the recipe's :class:`Schedule` (``cfg``: a ``TrainConfig``)."""
    return Schedule.of(cfg).lr_at(step, train_seconds)


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group's lr: ``lr`` times the group's ``lr_scale`` (``train.lr_scale``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # a checkpoint from before lr_scale has none


class UpdateGuard:
    """Applies an optimizer update only when its loss and gradient norm are finite (a NaN/inf one
    would poison the weights); counts the updates skipped in a row, and :attr:`exhausted` says when
    ``limit`` of them should stop the run. Under fp16 (``scaled``) the grad scaler skips inf
    gradients itself and lowers its scale, so only the loss is checked."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def update(self, optimizer, loss: float, grad_norm: float, scaled: bool = False) -> bool:
        """``optimizer.step()`` unless ``loss`` or ``grad_norm`` is NaN/inf; whether it stepped."""
        if math.isfinite(loss) and (math.isfinite(grad_norm) or scaled):
            optimizer.step()
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit


class MetricsLog:
    """A run's ``metrics.jsonl``: one JSON object per line, appended (by the main process only:
    ``enabled=False`` elsewhere). :func:`read_metrics` reads it back."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """On resume, drop the rows after ``step`` (see :func:`_truncate_metrics`)."""
        if self.enabled:
            _truncate_metrics(self.path, step)


class Throughput:
    """Tokens/s and s/step over the steps since the last :meth:`reset` (evaluations and saves reset
    it, so they never count as training time)."""

    def __init__(self):
        self.tokens_per_s = 0.0
        self.reset()

    def reset(self) -> None:
        self.tokens, self.steps, self.start = 0, 0, time.perf_counter()

    def measure(self) -> tuple[float, float]:
        """(tokens/s, s/step) of the window so far."""
        elapsed = time.perf_counter() - self.start
        self.tokens_per_s = self.tokens / max(elapsed, 1e-9)
        return self.tokens_per_s, elapsed / max(self.steps, 1)


class RowStream:
    """Deterministic, resumable order over dataset rows: a fresh seeded permutation per epoch.

    ``cursor`` counts rows consumed so far; it is the data position saved in checkpoints. The
    rows of a packed dataset are planned from its samples' lengths when it is built, so the
    cursor alone restores the exact stream, mixtures included (``omni.data.tasks``).

    ``groups`` (a length bucket per row, ``PackedDataset.row_buckets``) with ``batch_size``: each
    global micro-batch of ``batch_size`` rows is drawn from one group, the micro-batches of an
    epoch in a seeded order. A group's rows that do not fill a micro-batch (at most
    ``batch_size - 1`` per group) are pooled into mixed micro-batches, placed where the epoch's
    rows meet the micro-batch grid (its first and last, which an epoch shares with its neighbours)
    and after the single-group ones; every row is still taken once per epoch.
    """

    def __init__(self, num_rows: int, seed: int, groups=None, batch_size: int = 1):
        self.num_rows, self.seed, self.batch_size = num_rows, seed, batch_size
        self.groups = None if groups is None else np.asarray(groups)
        self._epoch, self._perm = -1, None

    def take(self, cursor: int, n: int) -> list[int]:
        out = []
        for c in range(cursor, cursor + n):
            epoch, i = divmod(c, self.num_rows)
            if epoch != self._epoch:
                self._perm, self._epoch = self._order(epoch), epoch
            out.append(self._perm[i])
        return out

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        if self.groups is None:
            return torch.randperm(self.num_rows, generator=g).tolist()
        B, N = self.batch_size, self.num_rows
        chunks, pool = [], []
        for b in np.unique(self.groups):
            rows = np.flatnonzero(self.groups == b)
            rows = rows[torch.randperm(len(rows), generator=g).numpy()].tolist()
            full = len(rows) // B * B
            chunks += [rows[k:k + B] for k in range(0, full, B)]
            pool += rows[full:]
        chunks = [chunks[k] for k in torch.randperm(len(chunks), generator=g).tolist()]
        head = (B - epoch * N % B) % B  # rows that complete the micro-batch the last epoch began
        whole = max(N - head, 0) // B  # micro-batches wholly inside this epoch
        while len(chunks) > whole:  # the grid has room for fewer single-group micro-batches
            pool = chunks.pop() + pool
        pool = [pool[k] for k in torch.randperm(len(pool), generator=g).tolist()]
        return pool[:head] + [r for c in chunks for r in c] + pool[head:]


class MicroBatches:
    """This process's rows of every global micro-batch of ``batch_size`` rows, from ``cursor`` on,
    forever: a DataLoader's ``batch_sampler``. Each micro-batch is split evenly over the ``world``
    processes, so each row is read once per epoch by one process; the loader's workers read and
    pack the rows, in order."""

    def __init__(self, stream: RowStream, cursor: int, batch_size: int, rank: int = 0, world: int = 1):
        self.stream, self.cursor, self.batch_size = stream, cursor, batch_size
        self.rank, self.world = rank, world

    def __iter__(self):
        share = self.batch_size // self.world
        for cursor in itertools.count(self.cursor, self.batch_size):
            yield self.stream.take(cursor, self.batch_size)[self.rank * share:(self.rank + 1) * share]


def batches(dataset, stream: RowStream, cursor: int, batch_size: int, rank: int = 0, world: int = 1,
            num_workers: int = 0, mrope: bool = False):
    """This process's collated micro-batches from ``cursor`` on (:class:`MicroBatches`), read by
    ``num_workers`` DataLoader processes (0: in this one, as each is asked for). The loader's own
    seed comes from a generator of its own, so the global RNG streams stay those of a run without it."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicroBatches(stream, cursor, batch_size, rank, world),
        collate_fn=functools.partial(type(dataset).collate, mrope=mrope), num_workers=num_workers,
        generator=torch.Generator())
    return iter(loader)


def _mixed_precision(choice: str) -> str:
    """accelerate's mixed precision for ``train.mixed_precision``: ``auto`` is bf16 on a GPU that has
    it and fp32 elsewhere; ``bf16`` (the CPU recipes ask for it: 2.4x faster where the CPU has bfloat16
    units) falls back to fp32 on a CPU that would emulate it, many times slower."""
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if choice == "bf16" and not cuda and bf16_is_emulated("cpu"):
        log.warning("train.mixed_precision=bf16, but this CPU has no bfloat16 kernels (no AVX512 or AMX) "
                    "and would emulate it many times slower than fp32: training in fp32")
        return "no"
    return choice


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _param_groups(model, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: matrices decay, vectors and an embedding of which only some rows train
    (``trained_rows``, see :func:`omni.train.stages.train_code_rows`) do not; ``lr_scale``
    (``train.lr_scale``) gives the parameters its globs select their own multiple of the scheduled lr."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scales: dict[str, float] = {}
    for pattern, scale in (lr_scale or {}).items():
        for name in select(params, [pattern], "train.lr_scale"):
            scales.setdefault(name, scale)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in params.items():
        decay = p.dim() >= 2 and not hasattr(p, "trained_rows")
        groups.setdefault((decay, scales.get(name, 1.0)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))]


def _to_device(batch: dict, device) -> dict:
    # media slots stay where they are: the model's encoders move their inputs
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _forward(model, batch: dict):
    if batch.get("contrastive"):  # model is the PairObjective around the model (setup)
        return model(batch["input_ids"], batch["key_padding"], batch["media"])
    return model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                 doc_ids=batch["doc_ids"], streams=batch.get("streams"),
                 stream_targets=batch.get("stream_targets"), media=batch.get("media"),
                 loss_weights=batch.get("loss_weights"))


def prepare_tokenizer(cfg: RecipeConfig, accelerator):
    """Load the recipe's tokenizer; train it from ``tokenizer.spec`` on the training data if missing.
    A model started from ``model.pretrained`` takes that checkpoint's tokenizer."""
    if cfg.model.pretrained:
        path = Path(cfg.model.pretrained) / TOKENIZER_DIR
        if not path.is_dir():
            raise ValueError(f"model.pretrained: {cfg.model.pretrained} has no tokenizer ({TOKENIZER_DIR}/)")
        return load_text_tokenizer(path)
    path = Path(cfg.tokenizer.path)
    with accelerator.main_process_first():
        if accelerator.is_main_process and saved_kind(path) is None:
            spec = load_tokenizer_spec(cfg.tokenizer.spec)
            corpora = [(split_manifest(p, "train"), TaskSpec.of(p).text_field) for p in cfg.data.tasks()]
            log.info("training tokenizer %s on %s -> %s", cfg.tokenizer.spec,
                     ", ".join(str(c) for c, _ in corpora), path)
            texts = itertools.chain.from_iterable(corpus_texts(c, field) for c, field in corpora)
            with exclusive(path, "tokenizer"):  # another run training the same tokenizer is refused
                try:
                    tok = TextTokenizer.train(texts, vocab_size=spec.vocab_size, model_type=spec.model_type,
                                              character_coverage=spec.character_coverage,
                                              max_sentences=spec.max_sentences, seed=spec.seed)
                except ValueError as e:  # e.g. a caption corpus far too small for text_spm's 4,096 pieces
                    raise ValueError(f"{path} holds no tokenizer yet, and training {cfg.tokenizer.spec} on "
                                     f"this recipe's own training text failed: {e}. "
                                     f"{_tokenizer_first(cfg, spec)}") from None
                tok.save(path)
    return load_text_tokenizer(path)


def _tokenizer_first(cfg: RecipeConfig, spec) -> str:
    """What to run before a recipe whose tokenizer could not be trained on its own data."""
    corpus = Path(spec.corpus)
    build = ""
    if not corpus.is_file() and corpus.parent.name in ("text", "speech", "sounds", "images", "video"):
        build = f"`omni data build {corpus.parent.name} --out {corpus.parent}`, then "
    return (f"Train the tokenizer on its own corpus ({spec.corpus}) first: {build}`omni tokenizer train "
            f"{cfg.tokenizer.spec} out={cfg.tokenizer.path}` (vocab_size=N for fewer pieces), or set "
            "tokenizer.path to a trained tokenizer")


def _build_command(part) -> str:
    """The ``omni data build`` command that makes the corpus a data task reads. Audio captions read
    speech (transcripts) or sound effects (captions): the folder's name tells which, else both are named."""
    if part.task == "text":
        kinds = ["text"]
    elif part.task in ("continue", "speak"):
        kinds = ["speech"]
    elif part.media == "audio":
        name = Path(part.path).name
        kinds = ["speech"] if "speech" in name else ["sounds"] if "sound" in name else ["speech", "sounds"]
    else:
        kinds = [{"image": "images", "video": "video"}[part.media]]
    return " or ".join(f"`omni data build {k} --out {part.path}`" for k in kinds)


def _check_data(cfg: RecipeConfig) -> None:
    """What the run reads exists: the pretrained checkpoint, the manifests."""
    pretrained = cfg.model.pretrained
    if pretrained and not (Path(pretrained) / "config.json").is_file():
        raise ValueError(f"model.pretrained: {pretrained} is not an omni checkpoint folder (no config.json); "
                         "import one, e.g. `omni import smollm2 --out weights/smollm2-135m`")
    for part in cfg.data.tasks():
        for split in ("train", "val"):
            try:
                split_manifest(part, split)
            except ValueError as e:
                raise ValueError(f"{e}; build the corpus with {_build_command(part)} "
                                 "(kinds: `omni data build --help`)") from None


def build_pipeline(cfg: RecipeConfig, accelerator) -> Pipeline:
    """The recipe's freshly built model and processor (seeded; the tokenizer trained first when
    missing; started from ``model.pretrained``): what training and ``omni data prepare`` prepare
    samples with."""
    set_seed(cfg.train.seed)
    built = pipeline_from_recipe(cfg, prepare_tokenizer(cfg, accelerator))
    if cfg.model.pretrained:
        init_from(built.model, cfg.model.pretrained)
        built.model.match_media_scale()  # new connectors at the pretrained embeddings' scale
    return built


def prepare_data(cfg: RecipeConfig) -> dict:
    """``omni data prepare``: the recipe's prepared-sample caches built ahead of training (what
    ``omni train`` builds where missing before its first step), with a bar per manifest; returns
    the train and val datasets."""
    _check_data(cfg)
    processor = build_pipeline(cfg, Accelerator(cpu=True)).processor
    return {split: dataset_for(cfg.data, split, processor, cfg.train.seed, progress=None)
            for split in ("train", "val")}


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """``omni export``: a training checkpoint (``RUN/checkpoints/step_N``, whose LoRA adapters are
    kept apart so the run can resume) -> an omni checkpoint folder with the adapters folded into
    their base weights, the processor's files beside them, as a run exports at its end. The model is
    rebuilt the way resuming rebuilds it; ``out`` is written atomically, after the checkpoint loads."""
    built = checkpoint_pipeline(path)
    with exclusive(out, "export"):
        built.save_pretrained(out)
    return Path(out)


def checkpoint_recipe(path: str | Path) -> RecipeConfig:
    """The recipe a training checkpoint (``RUN/checkpoints/step_N``) was written under: its trainer
    state holds it."""
    f = Path(path) / STATE_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: unreadable trainer state ({e})") from None
    return _recipe_of(meta, f)


def _recipe_of(meta, state_file: Path) -> RecipeConfig:
    if not isinstance(meta, dict) or not isinstance(meta.get("recipe"), dict):
        raise ValueError(f"{state_file}: no recipe in the trainer state (not written by omni train)")
    return from_dict(RecipeConfig, meta["recipe"])


def checkpoint_pipeline(path: str | Path) -> Pipeline:
    """A training checkpoint's model (LoRA adapters attached, as in training) and processor, rebuilt
    the way resuming rebuilds them."""
    ck = load_checkpoint(Path(path))
    cfg = _recipe_of(ck.meta, ck.path / STATE_FILE)
    built = build_pipeline(cfg, Accelerator(cpu=True))
    apply_stages(built.model, cfg.train)
    ck.load_model(built.model)
    return built.eval()


def train(cfg: RecipeConfig, score: Scorer | None = None) -> TrainResult:
    """Train ``cfg`` to completion (resuming from ``<out_dir>/checkpoints`` when asked) and export the
    model. The main process holds the run folder's lock throughout; SIGTERM/SIGINT end the run early
    with a checkpoint (``TrainResult.stopped_by``). ``score``: what scores a task on its validation
    split when ``train.best_metric`` names a task's metric (``omni train`` passes
    :func:`omni.eval.score_split`)."""
    trainer = Trainer(cfg, score)
    with trainer.run_folder():
        trainer.setup()
        return trainer.train()


@dataclass
class StepOutput:
    """What one optimizer step reports: the loss (mean over processes), the gradient norm before
    clipping, the lr it ran at, and the per-process auxiliary and per-part losses (reduced when logged)."""

    loss: float
    grad_norm: float
    lr: float
    aux_loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Trainer:
    """One run of a recipe. ``Trainer(cfg)`` makes the accelerator and checks what needs no writing
    (batch split, corpora); :meth:`run_folder` holds the folder's lock and the stop signals;
    :meth:`setup` builds the tokenizer, model, data, optimizer and the state a resumed checkpoint
    holds; :meth:`train` runs :meth:`step` until the schedule ends, with :meth:`evaluate` and
    :meth:`save` on their periods, and exports the model."""

    def __init__(self, cfg: RecipeConfig, score: Scorer | None = None):
        self.cfg, self.tc, self.score = cfg, cfg.train, score
        # accelerate keeps one AcceleratorState per process and refuses another mixed precision: a
        # run's is its own (a notebook that trains an fp32 recipe, then a bf16 one). The process
        # group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        # cpu=True off-GPU lets accelerate run multi-process CPU (gloo) under torchrun / accelerate launch.
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(self.tc.mixed_precision),
                                       cpu=not torch.cuda.is_available())
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("launched with accelerate's FSDP (--use_fsdp or an fsdp_config): omni shards "
                             "the model itself; launch it as for DDP and set train.parallel=fsdp "
                             "(docs/distributed.md)")
        # FSDP2 over several processes; on one there is nothing to shard and the model trains whole
        self.sharded = self.tc.parallel == "fsdp" and self.world > 1
        if self.tc.batch_size % self.world:
            raise ValueError(f"train.batch_size ({self.tc.batch_size}) must be divisible by the number of "
                             f"processes ({self.world})")
        _check_data(cfg)
        if self.tc.best_metric != "val_loss":
            if score is None:
                raise ValueError(f"train.best_metric={self.tc.best_metric} scores generated outputs: train "
                                 "with `omni train`, or pass score=omni.eval.score_split")
            if self.sharded:
                raise ValueError("train.best_metric names a task metric, which one process generates for; "
                                 "a sharded model (train.parallel=fsdp) is scored by val_loss only")
        self.out_dir = Path(self.tc.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.accelerator.is_main_process)
        self.schedule = Schedule.of(self.tc)
        self.guard = UpdateGuard(self.tc.max_skipped_steps)
        self.signals = StopSignals()
        self.window = Throughput()
        self.first_loss = self.last_loss = self.val_loss = None
        self.checkpoint: Path | None = None  # the newest checkpoint this run wrote
        self.batches = None  # this process's micro-batches (batches()), made at the first step

    @contextlib.contextmanager
    def run_folder(self):
        """Hold the run folder's lock (main process) and turn SIGTERM/SIGINT into a stop request."""
        with contextlib.ExitStack() as stack:
            if self.accelerator.is_main_process:
                stack.enter_context(exclusive(self.out_dir, "run"))
            self.signals = stack.enter_context(StopSignals())
            yield self

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        """Decide resume or start (under the lock), then build everything the loop needs, in an
        order that keeps the random streams of a run the same."""
        cfg, tc, acc = self.cfg, self.tc, self.accelerator
        resume_path, run_id = _decide(cfg, acc)
        built = build_pipeline(cfg, acc)
        model, self.processor = built.model, built.processor
        self.n_trainable = apply_stages(model, tc)
        model.backbone.set_activation_checkpointing(tc.activation_checkpointing)
        model.loss_chunk = tc.loss_chunk
        if tc.compile:
            compile_blocks(model)
        bars = None if tc.progress and acc.is_main_process else False  # on a terminal: rows as rendered
        with acc.main_process_first():  # the main process builds missing sample caches, the others read them
            self.train_set, self.val_set = (dataset_for(cfg.data, split, self.processor, tc.seed,
                                                        progress=bars) for split in ("train", "val"))
        # pairs train through their objective's module, so DDP's (FSDP's root) forward is the one that runs
        trained = PairObjective(model) if TASKS[cfg.data.task].pairs and not cfg.data.mixture else model
        model.every_tower = self.world > 1  # no process skips a tower another one runs (a collective)
        model.aux_only = tc.loss == "aux"
        if self.sharded:  # before the optimizer, which then holds this process's shards
            shard_model(model, trained, acc.mixed_precision, acc.device)
        elif tc.parallel == "fsdp":
            log.info("train.parallel=fsdp on one process: nothing to shard, the model trains whole")
        optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay, tc.lr_scale), lr=tc.lr,
                                      betas=tuple(tc.betas), foreach=True)
        self.state, scaler_state = self._resume(resume_path, run_id, model, optimizer)
        self.resumed_from = resume_path
        if self.sharded:
            self.model, self.optimizer = trained, acc.prepare(optimizer)
        else:
            if model.encoders:  # a tower's unused part (SigLIP's pooling head) gets no gradient anywhere
                acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
            self.model, self.optimizer = acc.prepare(trained, optimizer)
        if scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)
        self.inner = acc.unwrap_model(self.model)
        if isinstance(self.inner, PairObjective):
            self.inner = self.inner.model
        self.inner.backbone.set_attn_backend(cfg.model.attn_backend, acc.device)
        self.stream = RowStream(len(self.train_set), tc.seed, getattr(self.train_set, "row_buckets", None),
                                tc.batch_size)
        self.n_params = self.inner.num_params()
        self.peak_flops = _peak_flops(acc.device)
        if acc.is_main_process:
            self._open_run_files()
        return self

    def _resume(self, path: Path | None, run_id: str, model, optimizer) -> tuple[TrainState, dict | None]:
        """The train state (and fp16 grad scaler state) to start from; loads a checkpoint's weights,
        optimizer and this process's RNG states when resuming."""
        if path is None:
            return TrainState(run_id=run_id), None
        ck = load_checkpoint(path)
        if self.sharded != bool(ck.sharded):
            raise ValueError(f"{path}: a checkpoint of a {'sharded' if ck.sharded else 'whole'} model cannot "
                             f"resume {'a sharded' if self.sharded else 'an unsharded'} run; resume it with "
                             f"train.parallel={'fsdp' if ck.sharded else 'ddp'} on "
                             f"{ck.meta.get('world_size', 1)} processes, or export it (omni export)")
        if self.sharded:
            load_shards(ck.sharded, model, optimizer)
        else:
            ck.load_model(model)
            optimizer.load_state_dict(ck.optimizer_state)
        ck.state.run_id = run_id
        ck.restore_rng(self.rank % len(ck.rng))  # another number of processes needed train.resume_changed
        return ck.state, ck.meta.get("scaler")

    def _open_run_files(self) -> None:
        cfg, state, resumed_from = self.cfg, self.state, self.resumed_from
        self.out_dir.mkdir(parents=True, exist_ok=True)
        recipe = yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode()
        atomic_write_bytes(self.out_dir / "recipe.yaml", recipe)
        self.metrics.truncate(state.step if resumed_from else -1)
        self.metrics.write({"event": "start", "step": state.step, "world_size": self.world,
                            "params": self.n_params, "trainable_params": self.n_trainable,
                            "resumed_from": str(resumed_from) if resumed_from else None,
                            "run_id": state.run_id})
        log.info("model: %.2fM parameters (%.2fM trainable); train rows: %d x %d tokens (%d docs, "
                 "%d skipped); processes: %d%s", self.n_params / 1e6, self.n_trainable / 1e6,
                 len(self.train_set), cfg.data.seq_len, self.train_set.num_docs, self.train_set.num_bad,
                 self.world,
                 f"; resumed from {resumed_from}" if resumed_from else "")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Step until the schedule ends (or a signal stops every process); log, evaluate and save
        on their periods and at the end; export the model unless stopped early."""
        tc, state = self.tc, self.state
        # on a terminal a bar; in a log a line every ~10% of the steps; both with loss, tokens/s and ETA
        self.bar = progress(total=tc.steps, initial=state.step, desc=f"train {self.cfg.name}", unit="step",
                            enabled=None if tc.progress and self.accelerator.is_main_process else False)
        self.model.train()
        self.window.reset()
        if self.accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
        stop, save_due = False, False
        last = self.schedule.finished(state.step, state.train_seconds)
        if tc.eval_at_start and state.step == 0:  # the starting weights: a candidate for export=best
            self._note_eval()
            self.window.reset()
        while not last:
            out = self.step()
            seconds, stop = self._agree(state.train_seconds, self.signals.received is not None)
            if stop:
                self.checkpoint = self.save("stopped by signal")
                break
            out_of_time = self.schedule.out_of_time(seconds)
            last = state.step >= tc.steps or out_of_time
            if out_of_time and self.accelerator.is_main_process:
                log.info("train.max_minutes=%g reached at step %d of %d", tc.max_minutes, state.step,
                         tc.steps)
                self.metrics.write({"event": "time_budget", "step": state.step,
                                    "train_seconds": round(state.train_seconds, 1)})
            if state.step % tc.log_every == 0 or last:
                self.log_metrics(out)
            if state.step % tc.eval_every == 0 or last:
                self._note_eval()
            # a periodic checkpoint waits while updates are being skipped: it would only save a bad state
            save_due = save_due or state.step % tc.save_every == 0
            if save_due and not self.guard.in_a_row or last:
                self.checkpoint, save_due = self.save("final" if last else "periodic"), False
            if state.step % tc.eval_every == 0 or state.step % tc.save_every == 0:
                self.window.reset()  # keep eval/saving out of tokens/s
        self.bar.close()
        return self._finish(stop)

    def step(self) -> StepOutput:
        """One optimizer step: the schedule's lr, ``grad_accum`` micro-batches (gradients synchronised
        on the last), clipping, and the update unless its loss or gradient is NaN/inf."""
        tc, acc, state = self.tc, self.accelerator, self.state
        start = time.perf_counter()
        lr = self.schedule.lr_at(state.step, state.train_seconds)
        set_lr(self.optimizer, lr)
        if self.batches is None:
            self.batches = batches(self.train_set, self.stream, state.cursor, tc.batch_size, self.rank,
                                   self.world, tc.num_workers, self.cfg.model.mrope)
        step_loss = torch.zeros((), device=acc.device)
        step_aux, has_aux = torch.zeros((), device=acc.device), False
        parts: dict[str, torch.Tensor] = {}
        present: set[str] = set()  # the modalities this process's micro-batches hold
        for micro in range(tc.grad_accum):
            batch = _to_device(next(self.batches), acc.device)
            present |= {slot.modality for _, slot in batch.get("media") or []}
            state.cursor += tc.batch_size
            with self._accumulating(micro < tc.grad_accum - 1):
                with acc.autocast():
                    out = _forward(self.model, batch)
                # each process's means as their shares of the global micro-batch's
                loss = share_of_global_mean(out.loss, out.loss_mass, self.world)
                aux = (None if out.aux_loss is None
                       else share_of_global_mean(out.aux_loss, out.aux_mass, self.world))
                acc.backward((loss if aux is None else loss + aux) / tc.grad_accum)
            step_loss += loss.detach() / tc.grad_accum
            if aux is not None:
                step_aux, has_aux = step_aux + aux.detach() / tc.grad_accum, True
            for name, value in (out.parts or {}).items():
                parts[name] = parts.get(name, 0) + value / tc.grad_accum
            self.window.tokens += int((batch["doc_ids"] >= 0).sum()) * self.world
        if self.inner.every_tower:
            self._drop_idle_gradients(present)
        loss = float(acc.reduce(step_loss, "mean"))
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        # the same numbers on every process (reduced loss, synchronised gradients), so all skip alike
        if self.guard.update(self.optimizer, loss, grad_norm, scaled=acc.scaler is not None):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        else:
            self._skipped(loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.window.steps += 1
        state.tokens += int(batch["doc_ids"].numel()) * self.world * tc.grad_accum
        self.bar.update(1)
        # training time, without evaluations and checkpoints
        state.train_seconds += time.perf_counter() - start
        return StepOutput(loss, grad_norm, lr, step_aux if has_aux else None, parts)

    def _drop_idle_gradients(self, present: set[str]) -> None:
        """The towers (and cross-attention) of modalities no process had this step ran on dummy
        inputs for zero gradients; set those to None, as one process's backward leaves them, so
        that AdamW skips them as it would there (OmniModel.idle_parameters)."""
        modalities = sorted(self.inner.encoders)
        held = torch.tensor([float(m in present) for m in modalities], device=self.accelerator.device)
        held = self.accelerator.reduce(held, "sum")
        for p in self.inner.idle_parameters({m for m, n in zip(modalities, held.tolist()) if n == 0}):
            p.grad = None

    def _accumulating(self, skip_sync: bool):
        """No gradient reduction in this backward (a micro-batch before the step's last)."""
        if not skip_sync:
            return contextlib.nullcontext()
        if self.sharded:
            return no_gradient_sync(self.model)
        return self.accelerator.no_sync(self.model)

    def _skipped(self, loss: float, grad_norm: float) -> None:
        state = self.state
        state.skipped_steps += 1
        self.metrics.write({"event": "skipped_step", "step": state.step + 1, "loss": str(loss),
                            "grad_norm": str(grad_norm)})
        log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)",
                    state.step + 1, loss, grad_norm, self.guard.in_a_row)
        if self.guard.exhausted:
            raise TrainingError(
                f"loss is {loss}, gradient norm {grad_norm} at step {state.step + 1}: {self.guard.in_a_row} "
                f"updates in a row skipped (train.max_skipped_steps); stopped without saving. Last good "
                f"checkpoint: {latest_checkpoint(self.ckpt_root) or 'none'}. Lower train.lr or check the "
                "data.")

    def _agree(self, seconds: float, stop: bool) -> tuple[float, bool]:
        """The training time and stop request, the largest over processes: every process stops at the
        same step, whether for the time budget or because one of them was sent SIGTERM."""
        if self.world > 1:
            both = torch.tensor([seconds, float(stop)], device=self.accelerator.device)
            seconds, stop = self.accelerator.reduce(both, "max").tolist()
        return seconds, bool(stop)

    def log_metrics(self, out: StepOutput) -> None:
        """A metrics row for the steps since the last one (and the progress bar's loss and tokens/s)."""
        acc, state = self.accelerator, self.state
        tok_per_s, s_per_step = self.window.measure()
        row = {"step": state.step, "loss": round(out.loss, 5), "lr": out.lr,
               "grad_norm": round(out.grad_norm, 4), "tokens_per_s": round(tok_per_s, 1),
               "s_per_step": round(s_per_step, 4), "tokens": state.tokens}
        if acc.device.type == "cuda":  # peak since the start of training, this process
            row["max_mem_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**30, 2)
        else:  # this process's peak resident memory so far (mapped pages of a sample cache included)
            row["max_rss_gib"] = round(peak_rss_bytes() / 2**30, 2)
        if state.skipped_steps:
            row["skipped_steps"] = state.skipped_steps
        if out.aux_loss is not None:  # the processes' shares, averaged: the global batch's mean
            row["aux_loss"] = round(float(acc.reduce(out.aux_loss, "mean")), 5)
        for name, value in out.parts.items():  # each loss of a multi-loss objective (BLIP-2), unweighted
            row[f"{name}_loss"] = round(float(acc.reduce(value, "mean")), 5)
        if self.peak_flops:
            row["mfu"] = round(6 * self.n_params * tok_per_s / self.world / self.peak_flops, 4)
        self.metrics.write(row)
        postfix = dict(loss=f"{out.loss:.3f}", tok_s=f"{tok_per_s:,.0f}")
        if self.tc.max_minutes:  # the bar's own ETA counts steps; the time budget may end the run first
            eta = self.schedule.eta(state.step, state.train_seconds, s_per_step)
            postfix["eta"] = time.strftime("%H:%M:%S", time.gmtime(eta))
        self.bar.set_postfix(**postfix)
        self.window.reset()

    def evaluate(self) -> float:
        """Mean loss per token over the first ``train.eval_batches`` batches of the validation split."""
        tc, acc = self.tc, self.accelerator
        self.model.eval()
        total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        n_rows = min(len(self.val_set), tc.eval_batches * tc.batch_size)
        with torch.no_grad():
            for start in range(0, n_rows, tc.batch_size):
                idx = list(range(start, min(start + tc.batch_size, n_rows)))[self.rank::self.world]
                # every process runs every batch (a sharded forward is a collective): one without a
                # row of it runs the batch's first at zero weight
                weight = 1 if idx else 0
                batch = _to_device(self.val_set.collate([self.val_set[i] for i in idx or [start]],
                                                        self.cfg.model.mrope), acc.device)
                with acc.autocast():
                    out = _forward(self.model, batch)
                total += out.loss.float() * out.num_tokens * weight
                count += out.num_tokens * weight
        self.model.train()
        total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
        return float(total / count.clamp(min=1))

    def _note_eval(self) -> None:
        """Record the validation loss and ``train.best_metric``; with ``train.export=best`` an
        improvement of the latter is exported at once."""
        state, metric = self.state, self.tc.best_metric
        self.val_loss = value = self.evaluate()
        row = {"step": state.step, "val_loss": round(self.val_loss, 5),
               "val_ppl": round(math.exp(min(self.val_loss, 50)), 3)}
        if metric != "val_loss":
            value = self.task_metric()
            row[f"val_{metric}"] = round(value, 5)
        best = state.best if state.best and state.best.get("metric") == metric else None
        if best is None or (value < best["value"] if lower_is_better(metric) else value > best["value"]):
            state.best = {"metric": metric, "value": value, "step": state.step}
            if self.tc.export == "best":
                self.export()  # the best weights so far are the exported model
        self.metrics.write(row)
        if self.accelerator.is_main_process:
            also = f", {metric} {value:.4f}" if metric != "val_loss" else ""
            self.bar.write(f"step {state.step}: val loss {self.val_loss:.4f}{also}")

    def task_metric(self) -> float:
        """``train.best_metric``'s task scored on its validation split (the first ``eval_batches x
        batch_size`` rows) by the main process, generating with the unwrapped model; every process
        gets the number (or the error)."""
        label, _, key = self.tc.best_metric.rpartition(".")
        box: list = [None]
        if self.accelerator.is_main_process:
            self.model.eval()
            with torch.no_grad(), self.accelerator.autocast():
                metrics = self.score(Pipeline(self.inner, self.processor), self.cfg, label,
                                     self.tc.eval_batches * self.tc.batch_size)
            self.model.train()
            box = [float(metrics[key]) if isinstance(metrics.get(key), (int, float)) else
                   f"train.best_metric={self.tc.best_metric}: task {label} reports no number {key!r}; "
                   f"it reports {', '.join(k for k, v in metrics.items() if isinstance(v, (int, float)))}"]
        if self.world > 1:
            broadcast_object_list(box)
        if isinstance(box[0], str):
            raise ValueError(box[0])
        return box[0]

    def export(self) -> None:
        """The model and its processor's files (tokenizer, codec) into the run folder, by the main
        process; called on every process (a sharded model's weights are gathered first)."""
        model = self.inner
        if self.sharded:
            full = full_state_dict(self.inner)
            if not self.accelerator.is_main_process:
                return
            model = whole_copy(self.inner.config, self.tc.lora, full)
        if self.accelerator.is_main_process:
            Pipeline(model, self.processor).save_pretrained(self.out_dir)

    def save(self, reason: str) -> Path | None:
        """A checkpoint of this step (written by the main process, with every process's RNG states);
        NaN/inf weights or optimizer state end the run on every process instead."""
        acc, state = self.accelerator, self.state
        acc.wait_for_everyone()
        # every rank's RNG states, in rank order
        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        error, path, shards = None, None, None
        if self.sharded:  # every process writes its shards, to be moved into the checkpoint whole
            shards = self._save_shards()
        if acc.is_main_process:
            extra = {"recipe": self.cfg.to_dict(), "reason": reason,
                     "model_config": self.inner.config.to_dict(), "world_size": self.world,
                     "parallel": self.tc.parallel}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            weights, optimizer = ({}, {"state": {}, "param_groups": []}) if self.sharded else (
                self.inner.export_state_dict(merge_lora=False), self.optimizer.state_dict())
            try:
                if isinstance(shards, str):
                    raise NonFiniteError(shards)
                path = save_checkpoint(self.ckpt_root, weights, optimizer, state, extra,
                                       self.tc.keep_checkpoints, rng=rngs, scaler=scaler, shards=shards)
                log.info("checkpoint: %s", path)
            except NonFiniteError as e:
                error = (f"{e} at step {state.step}: the weights or optimizer state went NaN/inf. Last "
                         f"good checkpoint: {latest_checkpoint(self.ckpt_root) or 'none'}. Lower train.lr "
                         "or check the data.")
        if self.world > 1:
            error = _any_error(acc, error)
        if error:
            raise TrainingError(error)
        acc.wait_for_everyone()
        return path

    def _save_shards(self) -> Path | str:
        """Every process's shards of the model and optimizer state into one staging folder (a
        ``.step_*`` name, which a resume cleans up if a kill left it); the folder, or the NaN/inf
        problem any process found, as a message."""
        staging = self.ckpt_root / f".step_{self.state.step:08d}.shards"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper's
        tensors = save_shards(staging, self.inner, optimizer)
        bad = non_finite(tensors)
        flag = torch.tensor(float(len(bad)), device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, "sum")):
            if self.accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            return f"tensors hold NaN/inf{f' (first here: {bad[0]})' if bad else ''}; checkpoint not written"
        return staging

    def _finish(self, stop: bool) -> TrainResult:
        """End the run: stopped by a signal, it only says so (its checkpoint resumes it); else the
        main process exports the model, the loss plot and the model card."""
        acc, state, received = self.accelerator, self.state, self.signals.received
        self.batches = None  # ends the loader's workers
        result = (self.out_dir, state.step, self.first_loss, self.last_loss, self.val_loss,
                  self.window.tokens_per_s)
        if received is not None or (self.world > 1 and stop):
            if acc.is_main_process:
                self.metrics.write({"event": "stopped", "step": state.step, "signal": received or "peer"})
            acc.wait_for_everyone()
            acc.end_training()
            return TrainResult(*result, stopped_by=received or "a signal to another process",
                               checkpoint=self.checkpoint)
        if self.tc.export == "last":
            self.export()
        elif acc.is_main_process and state.best:
            log.info("exported the weights of step %s: %s %.4f", state.best.get("step"), state.best["metric"],
                     state.best["value"])
            self.metrics.write({"event": "exported", **state.best})
        if acc.is_main_process:
            plot_losses(self.metrics.path, self.out_dir / "loss.png", title=self.cfg.name)
            write_model_card(self.out_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(*result, checkpoint=self.checkpoint or latest_checkpoint(self.ckpt_root))


def _decide(cfg: RecipeConfig, accelerator) -> tuple[Path | None, str]:
    """The main process decides (under the lock) whether to resume and under which run id; every
    process gets the same answer, or the same error."""
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [open_run(Path(cfg.train.out_dir), cfg.train, cfg.to_dict(), accelerator.num_processes)]
        except ValueError as e:
            answer = [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    if isinstance(answer[0], str):
        raise ValueError(answer[0])
    return answer[0]


def _any_error(accelerator, error: str | None) -> str | None:
    """The main process's error, on every process (so all raise together instead of one hanging)."""
    box = [error]
    broadcast_object_list(box)
    return box[0]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows the killed run wrote after its last checkpoint (``step`` -1: a
    new run, drop them all). A line cut short by a crash mid-write is dropped with a warning."""
    if not path.is_file():
        return
    keep = [json.dumps(row) for row in read_metrics(path) if row.get("step", 0) <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON object (cut short by a crash
    mid-write) is dropped with a warning naming it, so it cannot block a resume or a report."""
    rows = []
    for n, ln in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s:%d: dropped an unreadable metrics line (a crash mid-write?): %.60r", path, n, ln)
    return rows


def plot_losses(metrics: Path, png: Path, title: str = "") -> Path | None:
    """Train loss (and validation loss) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if metrics.is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png

