"""omni's backbone vs transformers' Llama on the same weights: training step time and greedy
KV-cached generation speed, measured in one process with interleaved repeats.

    python benchmarks/backbone_vs_hf.py                          # default: a ~32M-parameter Llama on CPU
    python benchmarks/backbone_vs_hf.py --new-tokens 32 --repeats 2   # a quick check

A random-init ``LlamaForCausalLM`` (fp32) is saved to a temp dir and imported with
``omni.import_hf``, so both sides have identical dims and weights. Goals: omni's training step
<= 1.0x transformers' time; generation >= 1.5x transformers' tokens/s. Ends with one JSON line
(hardware, versions, date, config, results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import cpu_model, interleaved  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--seq", type=int, default=256, help="training sequence length")
    p.add_argument("--prompt", type=int, default=32, help="generation prompt length")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-batches", type=str, default="1,8", help="comma-separated generation batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn", default="sdpa", help="omni's attention backend (sdpa, xformers)")
    return p.parse_args(argv)


def build(args):
    """A random-init transformers Llama and the same weights imported into omni."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import omni

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.ffn, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, args.prompt + args.new_tokens),
                      tie_word_embeddings=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).float()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = omni.import_hf(tmp, device=args.device, dtype=dtype)
    ours.backbone.set_attn_backend(args.attn, torch.device(args.device))
    return hf.to(args.device, dtype), ours


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_fns(hf, ours, args):
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=inp, labels=inp).loss.backward()  # transformers shifts labels itself

    def omni_step():
        ours.zero_grad(set_to_none=True)
        ours(inp, targets=tgt).loss.backward()

    return {"omni": omni_step, "hf": hf_step}


def gen_fns(hf, ours, args, batch: int, outputs: dict):
    from omni.generation import generate

    g = torch.Generator().manual_seed(args.seed + 2 + batch)
    ids = torch.randint(0, args.vocab, (batch, args.prompt), generator=g).to(args.device)
    n = args.new_tokens

    def hf_gen():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        outputs["hf"] = out[:, ids.shape[1]:].cpu()

    def omni_gen():
        outputs["omni"] = generate(ours, ids, max_new_tokens=n, stop_ids=[]).cpu()

    return {"omni": omni_gen, "hf": hf_gen}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs skew CPU timings
    import transformers

    import omni

    hf, ours = build(args)
    n_params = sum(p.numel() for p in ours.parameters())
    results: dict = {}
    rows = []

    if not args.skip_train:
        hf.train()
        ours.train()
        t = interleaved(train_fns(hf, ours, args), args.repeats, args.warmup)
        o, h = statistics.median(t["omni"]), statistics.median(t["hf"])
        tok = args.batch * args.seq
        results["train_step_s"] = {"omni": o, "hf": h}
        results["train_step_s_min"] = {"omni": min(t["omni"]), "hf": min(t["hf"])}
        results["train_tok_s"] = {"omni": tok / o, "hf": tok / h}
        results["train_step_ratio"] = o / h
        rows.append((f"train step {args.batch}x{args.seq} (s)", o, h, f"{o / h:.2f}x time"))
        hf.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)

    if not args.skip_gen:
        hf.eval()
        ours.eval()
        hf.generation_config.eos_token_id = None  # no early stop; also passed per call
        for b in (int(s) for s in args.gen_batches.split(",") if s):
            outputs: dict = {}
            t = interleaved(gen_fns(hf, ours, args, b, outputs), args.repeats, args.warmup)
            tok = b * args.new_tokens
            o, h = tok / statistics.median(t["omni"]), tok / statistics.median(t["hf"])
            same = (outputs["omni"].shape == outputs["hf"].shape
                    and bool(torch.equal(outputs["omni"], outputs["hf"])))
            results[f"gen_tok_s_b{b}"] = {"omni": o, "hf": h}
            results[f"gen_tok_s_b{b}_best"] = {"omni": tok / min(t["omni"]), "hf": tok / min(t["hf"])}
            results[f"gen_speedup_b{b}"] = o / h
            results[f"gen_same_ids_b{b}"] = same
            rows.append((f"generate b={b}, {args.new_tokens} new (tok/s)", o, h,
                         f"{o / h:.2f}x speed{'' if same else ', ids differ'}"))

    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{cpu_model()} | {args.threads} threads")
    print(f"\nomni vs transformers {transformers.__version__} | {device} | {args.dtype} | attn {args.attn} | "
          f"{n_params / 1e6:.1f}M params | median of {args.repeats}")
    print(f"{'measurement':<36}{'omni':>12}{'transformers':>14}  ratio")
    for name, o, h, ratio in rows:
        print(f"{name:<36}{o:>12.3f}{h:>14.3f}  {ratio}")

    record = {
        "benchmark": "backbone_vs_hf",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "threads": args.threads, "logical_cpus": os.cpu_count(),
                     "device": device, "loadavg_1m_at_start": load_before},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "omni": omni.__version__, "python": platform.python_version()},
        "config": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                   "ffn": args.ffn, "vocab": args.vocab, "params": n_params, "dtype": args.dtype,
                   "attn": args.attn,
                   "train_batch": args.batch, "train_seq": args.seq, "prompt": args.prompt,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup},
        "goals": {"train_step_ratio_max": 1.0, "gen_speedup_min": 1.5},
        "results": results,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
