"""The speed switches on a GPU (issue 29): tokens/s, MFU and peak memory of ``text/base`` and a
multimodal base recipe (``llava/caption_base``: images as tokens, M-RoPE) with each switch off and
on, one JSON line per configuration.

Configurations: ``recipe`` is the recipe as shipped (its switches are recorded in the row);
the others first turn every switch off, so that what the recipe ships does not leak in:

    recipe      as shipped (text/base: flex, compile, chunked loss; llava/caption_base: flex, compile)
    baseline    sdpa with the dense document mask, eager, no checkpointing, the loss in one piece
    flex        model.attn_backend=flex (FlexAttention on a block mask)
    compile     train.compile=true (each block compiled)
    ac          train.activation_checkpointing=selective
    chunked_ce  train.loss_chunk=4096
    all         every switch on (the recipe's and selective checkpointing)

Each configuration is one run of ``benchmarks/recipe_steps.py`` in its own process (a clean
peak-memory count; an out-of-memory error or a hang ends that configuration only) for
``--steps`` optimizer steps of one micro-batch (``train.grad_accum=1``: the recipe's batch and
sequence length, fewer tokens per step) on the small corpora ``gpu_check.sh prepare`` carries.
tokens/s, MFU and peak memory are read back from the run's metrics.jsonl (the last logging window,
after compilation). A row is written as soon as its configuration ends, so a loan cut short keeps
what it measured; configurations that no longer fit in ``--budget`` seconds are written as skipped.

    python benchmarks/gpu_check.py --data .gpu --out $OUT/gpu_check.jsonl          # on the GPU
    python benchmarks/gpu_check.py --data DIR --out rows.jsonl --dry-run           # CPU, tiny sizes

``--dry-run`` runs the same driver on a CPU with debug-sized models, 3 steps and tiny batches
(tests/test_benchmarks.py runs it), so the script is known to work before a GPU is borrowed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWITCHES = {"model.attn_backend": "attn_backend", "train.compile": "compile",
            "train.activation_checkpointing": "activation_checkpointing", "train.loss_chunk": "loss_chunk"}
SWITCHES_OFF = {"model.attn_backend": "sdpa", "train.compile": "false",
                "train.activation_checkpointing": "none", "train.loss_chunk": "0"}
CONFIGS = {
    "recipe": None,
    "baseline": {},
    "flex": {"model.attn_backend": "flex"},
    "compile": {"train.compile": "true"},
    "ac": {"train.activation_checkpointing": "selective"},
    "chunked_ce": {"train.loss_chunk": "4096"},
    "all": {"model.attn_backend": "flex", "train.compile": "true",
            "train.activation_checkpointing": "selective", "train.loss_chunk": "4096"},
}
# (recipe, configuration) in the order they run: the most telling first, should the loan run out
PLAN = [("text/base", "recipe"), ("text/base", "baseline"), ("llava/caption_base", "recipe"),
        ("llava/caption_base", "baseline"), ("text/base", "flex"), ("text/base", "compile"),
        ("text/base", "chunked_ce"), ("text/base", "ac"), ("text/base", "all"),
        ("llava/caption_base", "flex")]
RECIPES = list(dict.fromkeys(r for r, _ in PLAN))


def switches(recipe: str, overrides: dict[str, str]) -> dict:
    """The four switches a configuration trains with: the recipe's, then the overrides."""
    from omni.config import load_recipe

    cfg = load_recipe(recipe)
    found = {key: str(getattr(cfg.model if key.startswith("model.") else cfg.train, name)).lower()
             for key, name in SWITCHES.items()}
    return {name: overrides.get(key, found[key]) for key, name in SWITCHES.items()}


def recipe_data(recipe: str, data: Path) -> dict[str, str]:
    """The recipe's corpus and tokenizer in the carried folder (``gpu_check.sh prepare``)."""
    if recipe == "text/base":
        return {"data.path": str(data / "data" / "text"),
                "tokenizer.path": str(data / "tok" / "text_spm_32k")}
    if recipe == "llava/caption_base":
        return {"data.path": str(data / "data" / "images"),
                "tokenizer.path": str(data / "tok" / "text_spm")}
    raise ValueError(f"no carried corpus for {recipe}; choose from {', '.join(RECIPES)}")


def dry_run_overrides(recipe: str) -> dict[str, str]:
    """Debug sizes for a CPU: the same code paths in seconds."""
    tiny = {"model.size": "debug", "model.max_seq_len": "64", "data.seq_len": "64", "train.batch_size": "2",
            "train.mixed_precision": "auto"}  # no on a CPU
    if recipe == "llava/caption_base":
        tiny.update({"model.media.image.tokenizer.size": "debug",
                     "model.media.image.tokenizer.image_size": "32"})
    return tiny


def run_config(recipe: str, name: str, overrides: dict[str, str], steps: int, timeout: float,
               out_root: Path) -> dict:
    """One configuration through recipe_steps.py in a process of its own: its RESULT row."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe_steps.py"), recipe, "--steps", str(steps),
           "--out", str(out_root / name)]
    for key, value in overrides.items():
        cmd += ["--set", f"{recipe}:{key}={value}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:  # text/base's checkpoint and export: 3.5 GB a configuration on the loan's disk
        shutil.rmtree(out_root / name, ignore_errors=True)
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    if not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}",
                "wall_s": round(time.perf_counter() - t0, 1)}
    row = rows[0]
    row.pop("recipe", None)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(".gpu"),
                   help="the carried folder: data/text, data/images, tok/text_spm_32k, tok/text_spm")
    p.add_argument("--out", type=Path, required=True, help="the JSON lines file (appended to)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help="comma-separated, from: " + ", ".join(RECIPES))
    p.add_argument("--configs", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--steps", type=int, default=9,
                   help="optimizer steps per configuration (metrics: the last third)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all configurations together")
    p.add_argument("--timeout", type=float, default=150, help="seconds for one configuration at most")
    p.add_argument("--dry-run", action="store_true", help="CPU, debug sizes, 3 steps: the script end to end")
    args = p.parse_args(argv)
    if args.dry_run:
        args.steps = 3
    wanted = [c for c in args.configs.split(",") if c]
    recipes = args.recipes.split(",")
    unknown = [c for c in wanted if c not in CONFIGS] + [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown configuration or recipe {unknown[0]!r}")

    import torch

    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()})")
    stamp = {"device": device, "torch": torch.__version__,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "steps": args.steps, "dry_run": args.dry_run}
    deadline = time.monotonic() + args.budget
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out_root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    failed = 0
    for recipe, name in PLAN:
        if recipe not in recipes or (wanted and name not in wanted):
            continue
        overrides = {**recipe_data(recipe, args.data.resolve()), "train.grad_accum": "1"}
        if CONFIGS[name] is not None:
            overrides.update({**SWITCHES_OFF, **CONFIGS[name]})
        if args.dry_run:
            overrides.update(dry_run_overrides(recipe))
            if switches(recipe, overrides)["loss_chunk"] != "0":
                overrides["train.loss_chunk"] = "32"  # rows of a chunk: a few chunks of the tiny batch
        left = deadline - time.monotonic()
        if left < 20:
            row = {"skipped": f"out of time (--budget {args.budget:.0f} s)"}
        else:
            row = run_config(recipe, name, overrides, args.steps, min(args.timeout, left),
                             out_root / recipe.replace("/", "_"))
        failed += "error" in row
        row = {"recipe": recipe, "config": name, "switches": switches(recipe, overrides), **row, **stamp}
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
