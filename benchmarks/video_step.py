"""Step time of ``videollama/smollm_dino_tiny`` at two token budgets and two precisions (issue 27):
the recipe as first written (DINOv2 at 112 px merged 2 x 2: 16 tokens a frame, rows of 224) against
the sized one (merged 4 x 4: 4 tokens a frame, rows of 80), each in fp32 and under bf16 autocast.
The two precisions run interleaved; the two budgets one after the other (two SmolLM2 trainers at
once need ~10 GB). A step here is forward, loss and backward on the recipe's first batch of 8 rows
(the optimizer, AdamW on the same 5-8M parameters for every side, is left out).

    python benchmarks/video_step.py --data data/video40 --repeats 2

Needs ``weights/smollm2-135m``, ``weights/dinov2-s14`` and the corpus (``omni data build video``);
the first run builds each side's prepared-sample cache. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SIDES = {"merge4_seq80": ["model.media.video.tokenizer.merge=4", "data.seq_len=80"],
         "merge2_seq224": ["model.media.video.tokenizer.merge=2", "data.seq_len=224"]}


def _step(model, batch: dict, bf16: bool) -> tuple[float, float]:
    """Seconds for forward, loss and backward on ``batch``, and the loss."""
    from omni.train.loop import _forward

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = _forward(model, batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(out.loss)


def main(argv: list[str] | None = None) -> int:
    from omni.config import load_recipe
    from omni.train.loop import Trainer, batches

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/video")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    results: dict[str, dict] = {}
    for name, overrides in SIDES.items():
        cfg = load_recipe("videollama/smollm_dino_tiny", [f"data.path={args.data}", *overrides,
                                                          f"train.out_dir=runs/video_step_{name}"])
        trainer = Trainer(cfg)
        with trainer.run_folder():
            trainer.setup()
            batch = next(batches(trainer.train_set, trainer.stream, 0, cfg.train.batch_size,
                                 mrope=cfg.model.mrope))
            _step(trainer.model, batch, False), _step(trainer.model, batch, True)  # warm-up, untimed
            for _ in range(args.repeats):
                for bf16 in (False, True):
                    seconds, loss = _step(trainer.model, batch, bf16)
                    key = f"{name}_{'bf16' if bf16 else 'fp32'}"
                    r = results.setdefault(key, {"seconds": [], "loss": round(loss, 4), "load": []})
                    r["seconds"].append(round(seconds, 2))
                    r["load"].append(round(os.getloadavg()[0], 1))
                    print(f"{key}: {seconds:.2f} s (loss {loss:.3f}, load {r['load'][-1]})", flush=True)
        del trainer  # its model, before the next side's
    for r in results.values():
        r["best_s"] = min(r["seconds"])
    json_line("video_step", torch.get_num_threads(), {"data": args.data, "repeats": args.repeats}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
