"""Step time and peak memory of whole recipes, through the real training loop.

Each recipe trains for ``--steps`` optimizer steps at its own batch size and sequence length (any
key can be overridden with ``--set RECIPE:key=value``); the numbers are read back from the run's
metrics.jsonl: seconds per step and tokens/s over the last logged window (the first window holds
the warm-up), and peak GPU memory. Each recipe's row is printed as a ``RESULT {...}`` line as soon
as it finishes, so a run cut off by a time limit keeps what it measured. One recipe failing does
not stop the others; its error is reported in its row.

    python benchmarks/recipe_steps.py whisper/asr_base llava/caption_base --steps 30 \\
        --set 'whisper/asr_base:data.path=.gpu/data/speech'

This is how the "Measured on ..." lines in ``recipes/*/*_base.yaml`` are made (see
``benchmarks/gpu_check.sh``). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def measure(recipe: str, overrides: list[str], steps: int, out_root: str) -> dict:
    from omni.config import load_recipe
    from omni.train import train
    from omni.train.loop import read_metrics

    out_dir = os.path.join(out_root, recipe.replace("/", "_"))
    log_every = max(1, steps // 3)
    cfg = load_recipe(recipe, [*overrides, f"train.steps={steps}", f"train.log_every={log_every}",
                               f"train.eval_every={steps}", "train.eval_batches=1",
                               f"train.warmup_steps={steps // 2}", f"train.save_every={steps}",
                               f"train.out_dir={out_dir}", "train.resume=false", "train.overwrite=true",
                               "train.progress=false"])
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    metrics = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    rows = [r for r in metrics if "s_per_step" in r]
    start = next(r for r in metrics if r.get("event") == "start")
    last = rows[-1]
    return {"recipe": recipe, "params_m": round(start["params"] / 1e6, 1),
            "trainable_m": round(start["trainable_params"] / 1e6, 1), "batch": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "s_per_step": last["s_per_step"],
            "tokens_per_s": last["tokens_per_s"],
            "max_mem_gib": last.get("max_mem_gib"), "mfu": last.get("mfu"), "loss_first": rows[0]["loss"],
            "loss_last": last["loss"], "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                   help="an override for one recipe (repeatable); '*:KEY=VALUE' for all")
    p.add_argument("--out", default=None, help="where the runs go (default: a temp dir)")
    args = p.parse_args(argv)

    import omni

    out_root = args.out or tempfile.mkdtemp(prefix="recipe_steps_")
    results = []
    for recipe in args.recipes:
        overrides = [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] in (recipe, "*")]
        try:
            results.append(measure(recipe, overrides, args.steps, out_root))
        except Exception as e:  # noqa: BLE001 - one recipe's failure is a row, not the end of the run
            traceback.print_exc()
            results.append({"recipe": recipe, "error": f"{type(e).__name__}: {e}"[:400]})
        print("RESULT " + json.dumps(results[-1]), flush=True)  # kept even if a later recipe runs out of time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\n{device} | {args.steps} steps per recipe | last logging window")
    print(f"{'recipe':<34}{'params':>8}{'batch x seq':>13}{'s/step':>9}{'tok/s':>11}{'peak GiB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['recipe']:<34}  failed: {r['error'][:80]}")
            continue
        mem = "-" if r["max_mem_gib"] is None else f"{r['max_mem_gib']:.1f}"
        print(f"{r['recipe']:<34}{r['params_m']:>7.1f}M{r['batch']:>7} x {r['seq_len']:<4}"
              f"{r['s_per_step']:>8.3f}{r['tokens_per_s']:>11,.0f}{mem:>10}")
    print(json.dumps({"benchmark": "recipe_steps",
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": device, "versions": {"torch": torch.__version__, "omni": omni.__version__,
                                                     "python": platform.python_version()},
                      "steps": args.steps, "results": results}))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
