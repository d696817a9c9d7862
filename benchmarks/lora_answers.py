"""Answers to held-out prompts before and after LoRA (issue 24): every len/5-th prompt of
``data/chat/test.jsonl``, greedy, through the imported SmolLM2 and the ``text/smollm_lora`` run.

    python benchmarks/lora_answers.py            # after omni import smollm2 / omni train text/smollm_lora

Ends with one JSON line holding the prompts, references and both answers.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import omni  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/chat/test.jsonl")
    p.add_argument("--base", default="weights/smollm2-135m")
    p.add_argument("--tuned", default="runs/smollm_lora")
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    picks = rows[::max(1, len(rows) // args.prompts)][:args.prompts]
    models = {"base": omni.load(args.base), "tuned": omni.load(args.tuned)}
    results = []
    for row in picks:
        question, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        chat = [{"role": "user", "content": question}]
        answers = {name: m.generate(chat, max_new_tokens=args.max_new_tokens, temperature=0.0).strip()
                   for name, m in models.items()}
        print(f"Q: {question}\nREF: {reference[:300]}")
        for name, answer in answers.items():
            print(f"{name.upper()}: {answer}")
        results.append({"prompt": question, "reference": reference, **answers})
    return json_line("lora_answers", args.threads, vars(args), {"answers": results})


if __name__ == "__main__":
    main()
