"""The one training loop, on accelerate: single CPU, one GPU, or DDP/FSDP under
``accelerate launch`` / ``torchrun``.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` rows (the global micro-batch,
split evenly over processes), mixed precision (bf16 on GPU by default), gradient clipping,
warmup + cosine learning rate. Periodic eval on the validation split, metrics as JSONL, a
progress bar with tokens/s, atomic checkpoints with exact resume, and a loss-curve PNG.
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
from omni.io import atomic_write_bytes
from omni.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU. Anything not listed reports MFU as unknown.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None
    tokens_per_s: float


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
            tok = TextTokenizer.train(texts, vocab_size=spec.vocab_size, model_type=spec.model_type,
                                      character_coverage=spec.character_coverage,
                                      max_sentences=spec.max_sentences, seed=spec.seed)
            tok.save(path)
    return TextTokenizer.load(path)


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


def _check_data(cfg: RecipeConfig) -> None:
    for part in cfg.data.tasks():
        for split in ("train", "val"):
            f = Path(part.path) / f"{split}.jsonl"
            if not f.is_file():
                kind = {"text": "text", "image": "images", "video": "video"}.get(
                    part.task if part.task == "text" else part.media if part.task in ("caption", "fewshot") else "", "<kind>")
                raise ValueError(f"{f}: manifest not found; build the corpus with "
                                 f"`omni data build {kind} --out {part.path}` (kinds: `omni data build --help`)")


def train(cfg: RecipeConfig) -> TrainResult:
    """Train ``cfg`` to completion (resuming from ``<out_dir>/checkpoints`` when asked) and export the model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from omni.data.tasks import dataset_for

    tc = cfg.train
    # cpu=True off-GPU lets accelerate run multi-process CPU (gloo) under torchrun / accelerate launch.
    accelerator = Accelerator(mixed_precision=_mixed_precision(tc.mixed_precision), cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size ({tc.batch_size}) must be divisible by the number of processes ({world})")
    local_bs = tc.batch_size // world
    out_dir = Path(tc.out_dir)
    ckpt_root = out_dir / "checkpoints"
    _check_data(cfg)
    set_seed(tc.seed)

    tokenizer = prepare_tokenizer(cfg, accelerator)
    model = model_from_recipe(cfg, tokenizer)
    from omni.train.stages import apply_stages

    n_trainable = apply_stages(model, tc)
    mc = cfg.model
    train_set, val_set = (dataset_for(cfg.data, split, model, tokenizer, tc.seed) for split in ("train", "val"))
    optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay, tc.lr_scale), lr=tc.lr,
                                  betas=tuple(tc.betas), foreach=True)

    state = TrainState()
    resumed_from = None
    ck_path = latest_checkpoint(ckpt_root) if tc.resume else None
    if ck_path is not None:
        ck = load_checkpoint(ck_path)
        model.load_weights(ck.model_state, str(ck_path / "model.safetensors"))
        optimizer.load_state_dict(ck.optimizer_state)
        state = ck.state
        ck.restore_rng()
        resumed_from = ck_path
    elif accelerator.is_main_process and ckpt_root.exists() and any(ckpt_root.glob("step_*")):
        log.warning("%s holds checkpoints but train.resume=false: starting over", ckpt_root)

    model, optimizer = accelerator.prepare(model, optimizer)
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
        _truncate_metrics(metrics_file, state.step)
        record({"event": "start", "step": state.step, "world_size": world, "params": n_params,
                "trainable_params": n_trainable, "resumed_from": str(resumed_from) if resumed_from else None})
        log.info("model: %.2fM parameters (%.2fM trainable); train rows: %d x %d tokens (%d docs, %d skipped); processes: %d%s",
                 n_params / 1e6, n_trainable / 1e6, len(train_set), cfg.data.seq_len, train_set.num_docs, train_set.num_bad, world,
                 f"; resumed from {resumed_from}" if resumed_from else "")

    def save(reason: str):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            extra = {"recipe": cfg.to_dict(), "reason": reason, "model_config": inner.config.to_dict()}
            p = save_checkpoint(ckpt_root, inner.export_state_dict(merge_lora=False), optimizer.state_dict(), state, extra,
                                tc.keep_checkpoints)
            log.info("checkpoint: %s", p)
        accelerator.wait_for_everyone()

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
        if not math.isfinite(loss):
            last = latest_checkpoint(ckpt_root)
            raise TrainingError(f"loss is {loss} at step {state.step + 1}; stopped without saving. "
                                f"Last good checkpoint: {last or 'none'}. Lower train.lr or check the data.")
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        window_steps += 1
        state.tokens += int(batch["doc_ids"].numel()) * world * tc.grad_accum
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        bar.update(1)
        # training time, without evaluations and checkpoints; every process stops at the same step
        state.train_seconds += time.perf_counter() - step_start
        out_of_time = bool(budget) and float(accelerator.reduce(
            torch.tensor(state.train_seconds, device=accelerator.device), "max")) >= budget
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
        if state.step % tc.save_every == 0 or last:
            save("final" if last else "periodic")
        if state.step % tc.eval_every == 0 or state.step % tc.save_every == 0:
            window_tokens, window_steps, window_start = 0, 0, time.perf_counter()  # keep eval/saving out of tokens/s
    bar.close()

    if accelerator.is_main_process:
        if tc.export == "last":
            inner.save_pretrained(out_dir)
        plot_losses(metrics_file, out_dir / "loss.png", title=cfg.name)
        from omni.model_card import write_model_card

        write_model_card(out_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out_dir, state.step, first_loss, last_loss, val_loss, tok_per_s)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows the killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()
            and json.loads(ln).get("step", 0) <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


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

