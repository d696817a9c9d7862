"""The one training loop, on accelerate: single CPU, one GPU, or DDP/FSDP under
``accelerate launch`` / ``torchrun``.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows (the global micro-batch,
split evenly over processes), mixed precision (bf16 on GPU by default), gradient clipping,
warmup + cosine learning rate. Periodic eval on the validation split, metrics as JSONL, a
progress bar with tokens/s, atomic checkpoints with exact resume, and a loss-curve PNG.

What a run promises (docs/reliability.md): one process writes a run folder at a time
(``omni.io.exclusive``); a folder holding another run is never trained over (``omni.train.run``);
an update whose loss or gradient is NaN/inf is skipped, and ``train.max_skipped_steps`` of them
in a row stop the run; a checkpoint never holds NaN/inf; SIGTERM/SIGINT stop after the current
step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from omni.config import RecipeConfig
from omni.io import atomic_write_bytes, exclusive
from omni.train.checkpoint import (
    NonFiniteError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from omni.train.run import StopSignals, open_run

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU. Anything not listed reports MFU as unknown.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


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


def lr_at(step: int, cfg, train_seconds: float = 0.0) -> float:
    """``cfg.lr`` on the schedule: cosine over the steps after warmup or, with ``max_minutes`` set,
    over the time budget, whichever is further along (so a slow machine still ends at the low lr)."""
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_minutes:
        progress = max(progress, train_seconds / (cfg.max_minutes * 60))
    return cfg.lr * lr_factor(step, cfg.warmup_steps, progress, cfg.min_lr_ratio)


class RowStream:
    """Deterministic, resumable order over dataset rows: a fresh seeded permutation per epoch.

    ``cursor`` counts rows consumed so far; it is the data position saved in checkpoints.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self._epoch, self._perm = -1, None

    def take(self, cursor: int, n: int) -> list[int]:
        out = []
        for c in range(cursor, cursor + n):
            epoch, i = divmod(c, self.num_rows)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._perm, self._epoch = torch.randperm(self.num_rows, generator=g).tolist(), epoch
            out.append(self._perm[i])
        return out


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _param_groups(model, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: matrices decay, vectors do not; ``lr_scale`` (``train.lr_scale``) gives the
    parameters its globs select their own multiple of the scheduled lr."""
    from omni.train.stages import select

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scales: dict[str, float] = {}
    for pattern, scale in (lr_scale or {}).items():
        for name in select(params, [pattern], "train.lr_scale"):
            scales.setdefault(name, scale)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in params.items():
        groups.setdefault((p.dim() >= 2, scales.get(name, 1.0)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1]))]


def _to_device(batch: dict, device) -> dict:
    # media slots stay where they are: the model's encoders move their inputs
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward(model, batch: dict):
    if batch.get("contrastive"):
        return model(batch["input_ids"], key_padding=batch["key_padding"], media=batch["media"], contrastive=True)
    return model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                 doc_ids=batch["doc_ids"], streams=batch.get("streams"), stream_targets=batch.get("stream_targets"),
                 media=batch.get("media"), loss_weights=batch.get("loss_weights"))


def prepare_tokenizer(cfg: RecipeConfig, accelerator):
    """Load the recipe's tokenizer; train it from ``tokenizer.spec`` on the training data if missing."""
    from omni.config import load_tokenizer_spec
    from omni.data.tasks import TaskSpec
    from omni.tokenizers.text import MODEL_FILE, TextTokenizer, corpus_texts

    path = Path(cfg.tokenizer.path)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (path / MODEL_FILE).is_file():
            spec = load_tokenizer_spec(cfg.tokenizer.spec)
            corpora = [(Path(p.path) / "train.jsonl", TaskSpec.of(p).text_field) for p in cfg.data.tasks()]
            log.info("training tokenizer %s on %s -> %s", cfg.tokenizer.spec, ", ".join(str(c) for c, _ in corpora), path)
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
    return TextTokenizer.load(path)


def _tokenizer_first(cfg: RecipeConfig, spec) -> str:
    """What to run before a recipe whose tokenizer could not be trained on its own data."""
    corpus = Path(spec.corpus)
    build = ""
    if not corpus.is_file() and corpus.parent.name in ("text", "speech", "sounds", "images", "video"):
        build = f"`omni data build {corpus.parent.name} --out {corpus.parent}`, then "
    return (f"Train the tokenizer on its own corpus ({spec.corpus}) first: {build}`omni tokenizer train "
            f"{cfg.tokenizer.spec} out={cfg.tokenizer.path}` (vocab_size=N for fewer pieces), or set "
            "tokenizer.path to a trained tokenizer")


def model_from_recipe(cfg: RecipeConfig, tokenizer):
    """A freshly initialised model for a recipe: backbone, media encoders, and the codec's codes
    in the vocabulary when the recipe names one (``codec.path``)."""
    from omni.model.backbone import backbone_config, default_mrope_section
    from omni.model.omni_model import build_model
    from omni.vocab import Vocab

    codec, vocab = None, tokenizer.vocab
    if cfg.codec.path:
        from omni.tokenizers.audio import AudioCodec

        codec = AudioCodec.load(cfg.codec.path)
        vocab = Vocab(vocab.text_size, vocab.specials, codec.num_codebooks, codec.cardinality)
    mc = cfg.model
    bcfg = backbone_config(mc.size, dim=mc.dim, num_layers=mc.num_layers, num_heads=mc.num_heads,
                           num_kv_heads=mc.num_kv_heads, ffn_dim=mc.ffn_dim, max_seq_len=mc.max_seq_len,
                           rope_theta=mc.rope_theta, attn_backend=mc.attn_backend,
                           cross_attention=mc.cross_attention)
    if mc.mrope:
        bcfg.mrope_section = default_mrope_section(bcfg.head_dim)
    return build_model(bcfg, vocab, tokenizer, tie_embeddings=mc.tie_embeddings, seed=cfg.train.seed,
                       media=mc.media, audio_pattern=mc.audio_pattern, codec=codec, contrastive=mc.contrastive,
                       blip2=mc.blip2)


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
    for part in cfg.data.tasks():
        for split in ("train", "val"):
            f = Path(part.path) / f"{split}.jsonl"
            if not f.is_file():
                raise ValueError(f"{f}: manifest not found; build the corpus with {_build_command(part)} "
                                 "(kinds: `omni data build --help`)")


def train(cfg: RecipeConfig) -> TrainResult:
    """Train ``cfg`` to completion (resuming from ``<out_dir>/checkpoints`` when asked) and export the
    model. The main process holds the run folder's lock throughout; SIGTERM/SIGINT end the run early
    with a checkpoint (``TrainResult.stopped_by``)."""
    from accelerate import Accelerator

    tc = cfg.train
    # cpu=True off-GPU lets accelerate run multi-process CPU (gloo) under torchrun / accelerate launch.
    accelerator = Accelerator(mixed_precision=_mixed_precision(tc.mixed_precision), cpu=not torch.cuda.is_available())
    if tc.batch_size % accelerator.num_processes:
        raise ValueError(f"train.batch_size ({tc.batch_size}) must be divisible by the number of processes "
                         f"({accelerator.num_processes})")
    _check_data(cfg)
    out_dir = Path(tc.out_dir)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(exclusive(out_dir, "run"))
        signals = stack.enter_context(StopSignals())
        return _train(cfg, accelerator, signals)


def _decide(cfg: RecipeConfig, accelerator) -> tuple[Path | None, str]:
    """The main process decides (under the lock) whether to resume and under which run id; every
    process gets the same answer, or the same error."""
    from accelerate.utils import broadcast_object_list

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


def _train(cfg: RecipeConfig, accelerator, signals: StopSignals) -> TrainResult:
    from accelerate.utils import gather_object, set_seed

    from omni.data.tasks import dataset_for

    tc = cfg.train
    world, rank = accelerator.num_processes, accelerator.process_index
    local_bs = tc.batch_size // world
    out_dir = Path(tc.out_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_path, run_id = _decide(cfg, accelerator)
    set_seed(tc.seed)

    tokenizer = prepare_tokenizer(cfg, accelerator)
    model = model_from_recipe(cfg, tokenizer)
    from omni.train.stages import apply_stages

    n_trainable = apply_stages(model, tc)
    mc = cfg.model
    bars = None if tc.progress and accelerator.is_main_process else False  # on a terminal: rows as rendered
    train_set, val_set = (dataset_for(cfg.data, split, model, tokenizer, tc.seed, progress=bars)
                          for split in ("train", "val"))
    optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay, tc.lr_scale), lr=tc.lr,
                                  betas=tuple(tc.betas), foreach=True)

    state, scaler_state = TrainState(run_id=run_id), None
    if resume_path is not None:
        ck = load_checkpoint(resume_path)
        model.load_weights(ck.model_state, str(resume_path / "model.safetensors"))
        optimizer.load_state_dict(ck.optimizer_state)
        state, scaler_state = ck.state, ck.meta.get("scaler")
        state.run_id = run_id
        ck.restore_rng(rank % len(ck.rng))  # another number of processes needed train.resume_changed
    resumed_from = resume_path

    model, optimizer = accelerator.prepare(model, optimizer)
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    inner = accelerator.unwrap_model(model)
    inner.backbone.set_attn_backend(mc.attn_backend, accelerator.device)
    stream = RowStream(len(train_set), tc.seed)
    n_params = inner.num_params()
    peak = _peak_flops(accelerator.device)

    metrics_file = out_dir / "metrics.jsonl"

    def record(row: dict):
        if accelerator.is_main_process:
            with open(metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "recipe.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        _truncate_metrics(metrics_file, state.step if resumed_from else -1)
        record({"event": "start", "step": state.step, "world_size": world, "params": n_params,
                "trainable_params": n_trainable, "resumed_from": str(resumed_from) if resumed_from else None,
                "run_id": run_id})
        log.info("model: %.2fM parameters (%.2fM trainable); train rows: %d x %d tokens (%d docs, %d skipped); processes: %d%s",
                 n_params / 1e6, n_trainable / 1e6, len(train_set), cfg.data.seq_len, train_set.num_docs, train_set.num_bad, world,
                 f"; resumed from {resumed_from}" if resumed_from else "")

    def save(reason: str) -> Path | None:
        accelerator.wait_for_everyone()
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]  # every rank's, in rank order
        error, path = None, None
        if accelerator.is_main_process:
            extra = {"recipe": cfg.to_dict(), "reason": reason, "model_config": inner.config.to_dict(),
                     "world_size": world}
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            try:
                path = save_checkpoint(ckpt_root, inner.export_state_dict(merge_lora=False), optimizer.state_dict(),
                                       state, extra, tc.keep_checkpoints, rng=rngs, scaler=scaler)
                log.info("checkpoint: %s", path)
            except NonFiniteError as e:
                error = (f"{e} at step {state.step}: the weights or optimizer state went NaN/inf. "
                         f"Last good checkpoint: {latest_checkpoint(ckpt_root) or 'none'}. Lower train.lr or check the data.")
        if world > 1:
            error = _any_error(accelerator, error)
        if error:
            raise TrainingError(error)
        accelerator.wait_for_everyone()
        return path

    def evaluate() -> float:
        model.eval()
        total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        n_rows = min(len(val_set), tc.eval_batches * tc.batch_size)
        with torch.no_grad():
            for start in range(0, n_rows, tc.batch_size):
                idx = list(range(start, min(start + tc.batch_size, n_rows)))[rank::world]
                if not idx:
                    continue
                batch = _to_device(val_set.collate([val_set[i] for i in idx], mc.mrope), accelerator.device)
                with accelerator.autocast():
                    out = _forward(model, batch)
                total += out.loss.float() * out.num_tokens
                count += out.num_tokens
        model.train()
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
        return float(total / count.clamp(min=1))

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=state.step, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True,
               disable=not (tc.progress and accelerator.is_main_process))
    model.train()
    first_loss = last_loss = val_loss = None
    window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
    tok_per_s = 0.0
    on_cuda = accelerator.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    budget = tc.max_minutes * 60
    skipped_in_a_row, stop, save_due = 0, 0.0, False
    checkpoint = None
    last = state.step >= tc.steps or bool(budget) and state.train_seconds >= budget
    while not last:
        step_start = time.perf_counter()
        lr = lr_at(state.step, tc, state.train_seconds)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # a checkpoint from before lr_scale has none
        step_loss = torch.zeros((), device=accelerator.device)
        step_aux, has_aux = torch.zeros((), device=accelerator.device), False
        step_parts: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            rows = stream.take(state.cursor, tc.batch_size)[rank * local_bs:(rank + 1) * local_bs]
            state.cursor += tc.batch_size
            batch = _to_device(train_set.collate([train_set[i] for i in rows], mc.mrope), accelerator.device)
            sync = micro == tc.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    out = _forward(model, batch)
                accelerator.backward(out.objective / tc.grad_accum)
            step_loss += out.loss.detach() / tc.grad_accum
            if out.aux_loss is not None:
                step_aux, has_aux = step_aux + out.aux_loss.detach() / tc.grad_accum, True
            for name, value in (out.parts or {}).items():
                step_parts[name] = step_parts.get(name, 0) + value / tc.grad_accum
            window_tokens += int((batch["doc_ids"] >= 0).sum()) * world
        loss = float(accelerator.reduce(step_loss, "mean"))
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip))
        # the same numbers on every process (reduced loss, synchronised gradients), so all skip alike;
        # under fp16 the grad scaler skips inf gradients itself and lowers its scale
        if math.isfinite(loss) and (math.isfinite(grad_norm) or accelerator.scaler is not None):
            optimizer.step()
            skipped_in_a_row = 0
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
        else:
            skipped_in_a_row += 1
            state.skipped_steps += 1
            record({"event": "skipped_step", "step": state.step + 1, "loss": str(loss), "grad_norm": str(grad_norm)})
            log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row)",
                        state.step + 1, loss, grad_norm, skipped_in_a_row)
            if skipped_in_a_row >= tc.max_skipped_steps:
                raise TrainingError(
                    f"loss is {loss}, gradient norm {grad_norm} at step {state.step + 1}: {skipped_in_a_row} updates "
                    f"in a row skipped (train.max_skipped_steps); stopped without saving. Last good checkpoint: "
                    f"{latest_checkpoint(ckpt_root) or 'none'}. Lower train.lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window_steps += 1
        state.tokens += int(batch["doc_ids"].numel()) * world * tc.grad_accum
        bar.update(1)
        # training time, without evaluations and checkpoints; every process stops at the same step,
        # whether for the time budget or because one of them was sent SIGTERM
        state.train_seconds += time.perf_counter() - step_start
        seconds, stop = state.train_seconds, float(signals.received is not None)
        if world > 1:
            seconds, stop = accelerator.reduce(torch.tensor([seconds, stop], device=accelerator.device), "max").tolist()
        out_of_time = bool(budget) and seconds >= budget
        if stop:
            checkpoint = save("stopped by signal")
            break
        last = state.step >= tc.steps or out_of_time
        if out_of_time and accelerator.is_main_process:
            log.info("train.max_minutes=%g reached at step %d of %d", tc.max_minutes, state.step, tc.steps)
            record({"event": "time_budget", "step": state.step, "train_seconds": round(state.train_seconds, 1)})

        if state.step % tc.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            tok_per_s = window_tokens / max(elapsed, 1e-9)
            row = {"step": state.step, "loss": round(loss, 5), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "tokens_per_s": round(tok_per_s, 1), "s_per_step": round(elapsed / max(window_steps, 1), 4),
                   "tokens": state.tokens}
            if on_cuda:  # peak since the start of training, this process
                row["max_mem_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
            if state.skipped_steps:
                row["skipped_steps"] = state.skipped_steps
            if has_aux:  # the same on every process: it follows from the recipe
                row["aux_loss"] = round(float(accelerator.reduce(step_aux, "mean")), 5)
            for name, value in step_parts.items():  # each loss of a multi-loss objective (BLIP-2), unweighted
                row[f"{name}_loss"] = round(float(accelerator.reduce(value, "mean")), 5)
            if peak:
                row["mfu"] = round(6 * n_params * tok_per_s / world / peak, 4)
            record(row)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_s:,.0f}")
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
        if state.step % tc.eval_every == 0 or last:
            val_loss = evaluate()
            improved = state.best_val_loss is None or val_loss < state.best_val_loss
            state.best_val_loss = min(val_loss, state.best_val_loss or val_loss)
            if improved and tc.export == "best" and accelerator.is_main_process:
                inner.save_pretrained(out_dir)  # the best weights so far are the exported model
            record({"step": state.step, "val_loss": round(val_loss, 5), "val_ppl": round(math.exp(min(val_loss, 50)), 3)})
            if accelerator.is_main_process:
                bar.write(f"step {state.step}: val loss {val_loss:.4f}")
        # a periodic checkpoint waits while updates are being skipped: it would only save a bad state
        save_due = save_due or state.step % tc.save_every == 0
        if save_due and not skipped_in_a_row or last:
            checkpoint, save_due = save("final" if last else "periodic"), False
        if state.step % tc.eval_every == 0 or state.step % tc.save_every == 0:
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()  # keep eval/saving out of tokens/s
    bar.close()
    if signals.received is not None or (world > 1 and stop):
        if accelerator.is_main_process:
            record({"event": "stopped", "step": state.step, "signal": signals.received or "peer"})
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainResult(out_dir, state.step, first_loss, last_loss, val_loss, tok_per_s,
                           stopped_by=signals.received or "a signal to another process", checkpoint=checkpoint)

    if accelerator.is_main_process:
        if tc.export == "last":
            inner.save_pretrained(out_dir)
        plot_losses(metrics_file, out_dir / "loss.png", title=cfg.name)
        from omni.model_card import write_model_card

        write_model_card(out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out_dir, state.step, first_loss, last_loss, val_loss, tok_per_s,
                       checkpoint=checkpoint or latest_checkpoint(ckpt_root))


def _any_error(accelerator, error: str | None) -> str | None:
    """The main process's error, on every process (so all raise together instead of one hanging)."""
    from accelerate.utils import broadcast_object_list

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

