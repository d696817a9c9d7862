"""Training step time of omni against transformers on the same weights (issue 24): SmolLM2-135M's
shape (``decode_speed.SHAPE``), random weights, fp32, full fine-tuning and LoRA (omni's
``add_lora`` against peft's ``get_peft_model``, the same rank, scale and projections; omni's
q/k/v and gate/up are fused, so one adapter each); omni eager and with its blocks compiled
(``omni.model.compiled.compile_blocks``; the compile is the untimed warm-up).

    python benchmarks/train_speed.py                        # batch 4 x 256 tokens, 2 threads
    python benchmarks/train_speed.py --repeats 2 --seq 64   # a quick check

    python benchmarks/train_speed.py --sft text/smollm_lora  # also the recipe's own SFT rows
    python benchmarks/train_speed.py --modes full --repeats 1 --memory 256   # and the step's memory

A step is forward, next-token loss, backward (no optimizer: both sides would run the same AdamW).
The default rows are random tokens with a target at every position (pre-training). ``--sft
RECIPE`` adds the first ``--batch`` packed rows of that recipe's training set (it needs the
recipe's weights and data: ``omni import smollm2``, ``omni data build chat``), where only the
assistant turns carry targets: omni runs its head at those positions only, transformers over
every position (its loss ignores the rest); both read the same ids and targets.
Interleaved, best of ``--repeats`` after a warm-up; the losses of both sides on the same batch
are reported too. Goal: omni <= 0.9x transformers' time. Also each side's achieved FLOP/s (the
step's matmul FLOPs: 6 x parameters read per token x tokens for full fine-tuning, 4x the frozen
ones with LoRA, plus attention) against the peak of an fp32 GEMM of the layers' size measured in
the same run. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from decode_speed import SHAPE, build  # noqa: E402

from common import interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="fp32",
                   help="fp32 and/or bf16 (autocast: bf16 matmuls over fp32 weights, what "
                        "train.mixed_precision=bf16 runs), comma-separated")
    p.add_argument("--sft", metavar="RECIPE", help="also time the first --batch rows of this SFT recipe")
    p.add_argument("--memory", type=int, metavar="CHUNK", default=None,
                   help="also the live tensors' peak of one full fp32 step on the random rows: the head "
                        "unfused, fused, and fused CHUNK rows at a time (train.loss_chunk); and of a "
                        "validation pass without and with CHUNK")
    return p.parse_args(argv)


def sft_rows(recipe: str, batch: int, seq: int) -> dict:
    """The first ``batch`` packed training rows of ``recipe`` (ids, targets, doc ids, positions)."""
    import omni
    from omni.config import load_recipe
    from omni.data.tasks import collate, dataset_for

    cfg = load_recipe(recipe, [f"data.seq_len={seq}"])
    rows = dataset_for(cfg.data, "train", omni.load(cfg.model.pretrained).processor, cfg.train.seed)
    b = collate([rows[i] for i in range(batch)])
    if int(b["input_ids"].max()) >= SHAPE["vocab_size"]:
        raise ValueError(f"{recipe}: its rows use ids past the benchmark's {SHAPE['vocab_size']} ids")
    return {"inp": b["input_ids"], "tgt": b["targets"], "doc_ids": b["doc_ids"], "positions": b["positions"]}


def dense_rows(x: torch.Tensor) -> dict:
    """Random tokens ``x`` (B, T+1) as rows with a target at every position but the last."""
    inp = x[:, :-1]
    return {"inp": inp, "tgt": torch.cat([inp[:, 1:], torch.full_like(inp[:, :1], -100)], dim=1)}


def step_fns(hf, ours, compiled, rows: dict, losses: dict, precision: str = "fp32") -> dict:
    inp, tgt = rows["inp"], rows["tgt"]
    kw = {k: rows[k] for k in ("doc_ids", "positions") if k in rows}

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=inp).logits  # what its loss_function does with labels: fp32, -100 ignored
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
        loss.backward()
        losses["hf"] = loss.item()

    def omni_step(name, model):
        def step():
            model.zero_grad(set_to_none=True)
            loss = model(inp, targets=tgt, **kw).loss
            loss.backward()
            losses[name] = loss.item()
        return step

    def autocast(step):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()
        return run

    fns = {"omni": omni_step("omni", ours), "omni_compiled": omni_step("omni_compiled", compiled),
           "hf": hf_step}
    return {k: autocast(f) for k, f in fns.items()} if precision == "bf16" else fns


def live_peak(model, rows: dict, chunk: int = 0, fused: bool = True, validation: bool = False) -> float:
    """GB: the peak of the live tensors over one training step of ``model`` (forward, loss,
    backward; the profiler's memory timeline), after a warm-up step. ``fused=False`` runs the head
    unfused (logits kept for the backward pass), as evaluation does. ``validation``: a trainer's
    validation pass instead (evaluation mode, no gradient: the loss alone)."""
    import numpy as np
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    head = type(model.lm_head)
    model.zero_grad(set_to_none=True)  # no gradients left from an earlier measurement
    model.lm_head._workspace = None  # a CPU's kept logits buffer, sized by this step
    model.loss_chunk = chunk
    if not fused:
        model.lm_head.__class__ = torch.nn.Linear  # OmniModel fuses only an LMHead
    try:
        if validation:
            def step():
                with torch.no_grad():
                    model.eval()(rows["inp"], targets=rows["tgt"]).loss.item()
                model.train()
        else:
            step = step_fns(None, model, None, rows, {})["omni"]
        step()
        with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
    finally:
        model.lm_head.__class__ = head
        model.loss_chunk = 0
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return float(np.array(sizes).sum(1).max()) / 1e9


def gemm_peak(dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` (1024 x 576) @ (576 x 1536) products in ``dtype`` (an MLP
    layer's shape at batch 4 x 256 tokens), repeated 20 times each."""
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: [a @ b for _ in range(20)]) for _ in range(repeats))
    return 20 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(tokens: int, seq: int, lora: bool) -> float:
    """Matmul FLOPs of a forward + backward step: the backbone's linear layers and the head
    (2 per weight and token forward, 2 backward for the input's gradient, 2 for the weight's
    unless frozen), and attention's scores and values (causal: half, x3 for backward)."""
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    layers = SHAPE["num_hidden_layers"]
    kv = d * SHAPE["num_key_value_heads"] // SHAPE["num_attention_heads"]
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    weights = layers * per_layer + d * v
    linear = (4 if lora else 6) * weights * tokens
    attention = 3 * layers * 2 * 2 * seq * d * tokens / 2
    return linear + attention


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from omni.model.compiled import compile_blocks
    from omni.model.lora import LoraSpec, add_lora

    x = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq + 1),
                      generator=torch.Generator().manual_seed(args.seed + 1))
    workloads = {"dense": dense_rows(x)}
    if args.sft:
        workloads["sft"] = sft_rows(args.sft, args.batch, args.seq)
    results: dict = {}
    cases = itertools.product(args.precisions.split(","), args.modes.split(","), workloads.items())
    for precision, mode, (workload, rows) in cases:
        hf, ours = build(torch.float32, args.seed)
        ours = ours.model
        if mode == "lora":
            spec = LoraSpec()
            add_lora(ours, spec)
            hf = get_peft_model(hf, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                               target_modules=HF_LORA_TARGETS))
        compiled = copy.deepcopy(ours)
        compile_blocks(compiled)
        for m in (hf, ours, compiled):
            m.train()
        losses: dict = {}
        times = interleaved(step_fns(hf, ours, compiled, rows, losses, precision), args.repeats, warmup=1)
        best = {k: min(v) for k, v in times.items()}
        ratio = {k: best[k] / best["hf"] for k in ("omni", "omni_compiled")}
        flops = step_flops(args.batch * args.seq, args.seq, mode == "lora")
        peak = gemm_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        achieved = {k: flops / v / 1e9 for k, v in best.items()}
        name = "/".join([mode] + [workload] * (workload != "dense") + [precision] * (precision != "fp32"))
        results[name] = {"step_s": best, "ratio": ratio, "loss": losses, "step_gflop": flops / 1e9,
                         "gemm_peak_gflop_s": peak, "achieved_gflop_s": achieved,
                         "fraction_of_gemm_peak": {k: v / peak for k, v in achieved.items()},
                         "trainable": {"omni": sum(p.numel() for p in ours.parameters() if p.requires_grad),
                                       "hf": sum(p.numel() for p in hf.parameters() if p.requires_grad)}}
        print(f"{name:<8} step (s): omni {best['omni']:.3f}, compiled {best['omni_compiled']:.3f}, "
              f"transformers {best['hf']:.3f}: {best['omni'] / best['hf']:.2f}x / "
              f"{best['omni_compiled'] / best['hf']:.2f}x time; loss {losses}")
        print(f"         {flops / 1e9:.0f} GFLOP a step; GEMM peak {peak:.0f} GFLOP/s; achieved: "
              + ", ".join(f"{k} {v:.0f} ({v / peak:.0%})" for k, v in achieved.items()))
    if args.memory is not None:
        _, ours = build(torch.float32, args.seed)
        model = ours.model.train()
        peaks = {"unfused": live_peak(model, workloads["dense"], fused=False),
                 "fused": live_peak(model, workloads["dense"]),
                 f"fused_chunk_{args.memory}": live_peak(model, workloads["dense"], args.memory),
                 # a validation pass at the same batch: unfused without loss_chunk, fused with it
                 "validation": live_peak(model, workloads["dense"], validation=True),
                 f"validation_chunk_{args.memory}": live_peak(model, workloads["dense"], args.memory,
                                                              validation=True)}
        results["memory_gb"] = peaks
        print(f"live tensors' peak of a full fp32 step ({args.batch} x {args.seq}): "
              + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items()))
    config = {"shape": SHAPE, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
              "precisions": args.precisions, "sft": args.sft, "goal_ratio_max": 0.9}
    return json_line("train_speed", args.threads, config, results)


if __name__ == "__main__":
    main()
