"""A speech LLM's connector trained alone on CTC before the language model sees it: a stage 1 for
``speechllm/smollm_whisper_tiny`` with ``model.media.audio.ctc_on: connector``. The connector's
tokens are scored against SmolLM2's own input embeddings (``AudioEncoder.encode``), so no language
model forward runs: a step costs the connector and a 49k-way CTC. Writes ``OUT/model.safetensors``
(the audio encoder's trained tensors) for ``train.init_from``, and the greedy CTC transcripts'
WER on validation clips.

    python benchmarks/speechllm_ctc_stage.py speechllm/smollm_whisper_tiny data.path=data/speech_wiki_1k \\
        model.media.audio.ctc_weight=1.0 model.media.audio.ctc_on=connector --steps 600 --out runs/ctc1
    omni train speechllm/smollm_whisper_tiny ... train.init_from=runs/ctc1

Recipe overrides (``key=value``, as ``omni train`` takes them) follow the recipe. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import json_line, set_up_trainer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--val-clips", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/speechllm_ctc_stage")
    args = p.parse_args(argv)
    import jiwer
    from safetensors.torch import save_file
    from whisper_parity import normalize

    from omni.train.loop import batches

    torch.set_num_threads(args.threads)
    cfg, trainer = set_up_trainer(args.recipe, [*args.overrides, "train.lora=null"], args.out)
    if not cfg.model.media.get("audio", {}).get("ctc_on") == "connector":
        raise SystemExit("give model.media.audio.ctc_weight=W model.media.audio.ctc_on=connector")
    model = trainer.inner.train()
    enc, embed = model.encoders["audio"], model.embed.weight.detach()
    params = [*enc.connector.parameters(), enc.ctc_scale]
    for t in params:  # the recipe's train.trainable may leave the scale out
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / args.warmup) * 0.5
                                              * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    rows = batches(trainer.train_set, trainer.stream, 0, cfg.train.batch_size, mrope=model.uses_mrope)
    log, t0, window = [], time.perf_counter(), []
    for step in range(1, args.steps + 1):
        media = [slot for _, slot in next(rows)["media"] if slot.labels is not None]
        _, loss = enc.encode([s.data for s in media], [s.labels for s in media], embed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % 25 == 0 or step == args.steps:
            log.append({"step": step, "ctc": round(sum(window) / len(window), 4),
                        "s_per_step": round((time.perf_counter() - t0) / step, 3),
                        "scale": round(enc.ctc_scale.item(), 3)})
            print(log[-1], flush=True)
            window = []
    enc.eval()
    tok = trainer.processor.tokenizer
    refs, hyps = [], []
    for i in range(len(trainer.val_set)):
        for _, slot in trainer.val_set.collate([trainer.val_set[i]])["media"]:
            if slot.labels is not None and len(refs) < args.val_clips:
                refs.append(tok.decode(slot.labels.tolist()))
                hyps.append(tok.decode(enc.ctc_decode([slot.data], embed)[0]))
    wer = jiwer.wer([normalize(r) for r in refs], [normalize(h) or "-" for h in hyps]) if refs else None
    for r, h in list(zip(refs, hyps))[:5]:
        print(f"REF {r}\nCTC {h}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoders.audio.{k}": v.detach().contiguous() for k, v in enc.state_dict().items()
               if k.startswith("connector.") or k == "ctc_scale"}
    save_file(tensors, out / "model.safetensors")
    return json_line("speechllm_ctc_stage", args.threads,
                     {"recipe": args.recipe, "overrides": args.overrides, "steps": args.steps, "lr": args.lr,
                      "batch_size": cfg.train.batch_size},
                     {"log": log, "val_clips": len(refs), "ctc_greedy_wer": wer,
                      "examples": [{"ref": r, "ctc": h} for r, h in list(zip(refs, hyps))[:10]]})


if __name__ == "__main__":
    main()
