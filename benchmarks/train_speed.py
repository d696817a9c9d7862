"""Training step time of omni against transformers on the same weights (issue 24): SmolLM2-135M's
shape (``decode_speed.SHAPE``), random weights, fp32, full fine-tuning and LoRA (omni's
``add_lora`` against peft's ``get_peft_model``, the same rank, scale and projections; omni's
q/k/v and gate/up are fused, so one adapter each); omni eager and with its blocks compiled
(``omni.model.compiled.compile_blocks``; the compile is the untimed warm-up).

    python benchmarks/train_speed.py                        # batch 4 x 256 tokens, 2 threads
    python benchmarks/train_speed.py --repeats 2 --seq 64   # a quick check

A step is forward, next-token loss, backward (no optimizer: both sides would run the same AdamW).
Interleaved, best of ``--repeats`` after a warm-up; the losses of both sides on the same batch
are reported too. Goal: omni <= 0.9x transformers' time. Also each side's achieved FLOP/s (the
step's matmul FLOPs: 6 x parameters read per token x tokens for full fine-tuning, 4x the frozen
ones with LoRA, plus attention) against the peak of an fp32 GEMM of the layers' size measured in
the same run. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
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
    return p.parse_args(argv)


def step_fns(hf, ours, compiled, x: torch.Tensor, losses: dict) -> dict:
    inp = x[:, :-1]
    tgt = torch.cat([inp[:, 1:], torch.full_like(inp[:, :1], -100)], dim=1)  # transformers' targets

    def hf_step():
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=inp, labels=inp).loss  # transformers shifts the labels itself
        loss.backward()
        losses["hf"] = loss.item()

    def omni_step(name, model):
        def step():
            model.zero_grad(set_to_none=True)
            loss = model(inp, targets=tgt).loss
            loss.backward()
            losses[name] = loss.item()
        return step

    return {"omni": omni_step("omni", ours), "omni_compiled": omni_step("omni_compiled", compiled),
            "hf": hf_step}


def gemm_peak(repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` (1024 x 576) @ (576 x 1536) fp32 products (an MLP layer's
    shape at batch 4 x 256 tokens), repeated 20 times each."""
    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
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
    results: dict = {}
    for mode in args.modes.split(","):
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
        times = interleaved(step_fns(hf, ours, compiled, x, losses), args.repeats, warmup=1)
        best = {k: min(v) for k, v in times.items()}
        ratio = {k: best[k] / best["hf"] for k in ("omni", "omni_compiled")}
        flops = step_flops(args.batch * args.seq, args.seq, mode == "lora")
        peak = gemm_peak()
        achieved = {k: flops / v / 1e9 for k, v in best.items()}
        results[mode] = {"step_s": best, "ratio": ratio, "loss": losses, "step_gflop": flops / 1e9,
                         "gemm_peak_gflop_s": peak, "achieved_gflop_s": achieved,
                         "fraction_of_gemm_peak": {k: v / peak for k, v in achieved.items()},
                         "trainable": {"omni": sum(p.numel() for p in ours.parameters() if p.requires_grad),
                                       "hf": sum(p.numel() for p in hf.parameters() if p.requires_grad)}}
        print(f"{mode:<6} step (s): omni {best['omni']:.3f}, compiled {best['omni_compiled']:.3f}, "
              f"transformers {best['hf']:.3f}: {best['omni'] / best['hf']:.2f}x / "
              f"{best['omni_compiled'] / best['hf']:.2f}x time; loss {losses}")
        print(f"       {flops / 1e9:.0f} GFLOP a step; GEMM peak {peak:.0f} GFLOP/s; achieved: "
              + ", ".join(f"{k} {v:.0f} ({v / peak:.0%})" for k, v in achieved.items()))
    config = {"shape": SHAPE, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
              "dtype": "float32", "goal_ratio_max": 0.9}
    return json_line("train_speed", args.threads, config, results)


if __name__ == "__main__":
    main()
