"""fp32 against bf16 autocast on a recipe's own packed rows: the same micro-batches, forward +
backward, the two sides interleaved (alternating which goes first) in one process, so a loaded
machine slows both alike; the loss of each side on each batch shows whether bf16 trains the same.

    python benchmarks/bf16_step.py runs/small_cut.yaml --batches 4     # any2any/small on cut corpora
    python benchmarks/bf16_step.py videollama/smollm_dino_tiny data.path=data/video40 \
        model.media.video.tokenizer.merge=2 data.seq_len=224         # the video recipe as first written

Recipe overrides (``key=value``, as ``omni train`` takes them) follow the recipe. The first batch of
each side is the warm-up (left out of the mean). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import json_line, set_up_trainer  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bf16_step")
    args = p.parse_args(argv)
    from omni.train.loop import _forward, _to_device, batches

    torch.set_num_threads(args.threads)
    cfg, trainer = set_up_trainer(args.recipe, args.overrides, args.out)
    model = trainer.inner.train()
    rows = batches(trainer.train_set, trainer.stream, 0, cfg.train.batch_size, mrope=model.uses_mrope)
    runs: dict[str, list] = {"fp32": [], "bf16": []}
    for i in range(args.batches):
        batch = _to_device(next(rows), "cpu")
        for side in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side == "bf16"):
                out = _forward(model, batch)
            out.loss.backward()
            seconds = round(time.perf_counter() - t, 2)
            runs[side].append({"seconds": seconds, "loss": round(out.loss.item(), 4),
                               "load": round(os.getloadavg()[0], 1)})
            print(side, i, runs[side][-1], flush=True)
    results = {side: {"steps": r, "mean_s": sum(x["seconds"] for x in r[1:]) / max(1, len(r) - 1)}
               for side, r in runs.items()}
    return json_line("bf16_step", args.threads, {"recipe": args.recipe, "overrides": args.overrides,
                                                 "batches": args.batches,
                                                 "batch_size": cfg.train.batch_size,
                                                 "seq_len": cfg.data.seq_len}, results)


if __name__ == "__main__":
    main()
