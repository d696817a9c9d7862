"""Training step time of omni against transformers on the same weights (issue 24): SmolLM2-135M's
shape (``decode_speed.SHAPE``), random weights, fp32, full fine-tuning and LoRA (omni's
``add_lora`` against peft's ``get_peft_model``, the same rank, scale and projections; omni's
q/k/v and gate/up are fused, so one adapter each); omni eager and with its blocks compiled
(``omni.model.compiled.compile_blocks``; the compile is the untimed warm-up).

    python benchmarks/train_speed.py                        # batch 4 x 256 tokens, 2 threads
    python benchmarks/train_speed.py --repeats 2 --seq 64   # a quick check

A step is forward, next-token loss, backward (no optimizer: both sides would run the same AdamW).
Interleaved, best of ``--repeats`` after a warm-up; the losses of both sides on the same batch
are reported too. Goal: omni <= 0.9x transformers' time. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import os

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
        results[mode] = {"step_s": best, "ratio": ratio, "loss": losses,
                         "trainable": {"omni": sum(p.numel() for p in ours.parameters() if p.requires_grad),
                                       "hf": sum(p.numel() for p in hf.parameters() if p.requires_grad)}}
        print(f"{mode:<6} step (s): omni {best['omni']:.3f}, compiled {best['omni_compiled']:.3f}, "
              f"transformers {best['hf']:.3f}: {best['omni'] / best['hf']:.2f}x / "
              f"{best['omni_compiled'] / best['hf']:.2f}x time; loss {losses}")
    config = {"shape": SHAPE, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
              "dtype": "float32", "goal_ratio_max": 0.9}
    return json_line("train_speed", args.threads, config, results)


if __name__ == "__main__":
    main()
