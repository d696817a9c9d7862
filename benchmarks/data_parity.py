"""Same recipe, same seed: today's in-memory data path (the code at ``--old-rev``) against
prepared-sample caches (issue 26), compared loss by loss.

    python benchmarks/data_parity.py                                  # text/tiny, llava/caption_tiny
    python benchmarks/data_parity.py --recipes llava/caption_tiny --warmup-steps 10   # warmup <= steps
    python benchmarks/data_parity.py --recipes whisper/asr_tiny videollama/caption_tiny \
        audiolm/continue_tiny --steps 8 --warmup-steps 4 --rows 600    # the first 600 rows of each
    python benchmarks/data_parity.py --recipes any2any/tiny --steps 6 --warmup-steps 3 --rows 200

Each recipe trains ``--steps`` steps twice through ``omni train`` on the built corpora (``data/``),
once with the code at ``--old-rev`` (``git archive``) and once with this tree (its cache built on
the way), logging every step, then once more with this tree reading the cache it built, with 2
DataLoader workers, and once from the same manifests cut into Parquet shards (``data.files:
{split}/*.parquet``, media paths made absolute). ``--rows N``: every run reads a copy of the
corpus (of each task's corpus, for a mixture) cut to its first N training rows and N/4 held-out
rows (media paths made absolute), so that recipes whose samples are slow to prepare (codec codes,
video frames) stay quick. Every run reads the recipe file as it was at ``--old-rev``, as that code
rejects keys added since (``any2any/tiny`` and ``videollama/caption_tiny`` have since gained
``model.media.video.video.positions_per_second``); the keys that differ from today's recipe are
printed. The lr follows the steps alone (``train.max_minutes=0``: with a time budget it also
follows the wall clock, which differs between runs). Reports every logged training loss and the
held-out loss of each run, and whether they are identical. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import corpus_overrides, cut_corpora, json_line, manifest_rows, old_tree  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="*", default=["text/tiny", "llava/caption_tiny"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, help="train.warmup_steps (default: the recipe's)")
    p.add_argument("--rows", type=int, help="training rows read (held out: a quarter as many)")
    p.add_argument("--old-rev", default="218c701")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def losses(out: Path) -> tuple[list[float], float | None]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return [r["loss"] for r in rows if "loss" in r], (val[-1] if val else None)


def parquet_shards(recipe: str, out: Path, overrides: list[str], shards: int = 3) -> list[str]:
    """The train and val manifests of each of the recipe's corpora (after ``overrides``) cut into
    ``shards`` Parquet files each under ``out`` (media paths made absolute, as a shard's folder is
    not the manifest's); the overrides that read them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def shard(k: int, path: str) -> dict:
        folder = out / f"{k}_{Path(path).name}"
        for split in ("train", "val"):
            rows = manifest_rows(ROOT / path / f"{split}.jsonl")
            (folder / split).mkdir(parents=True, exist_ok=True)
            size = -(-len(rows) // shards)
            for i in range(shards):
                part = pa.Table.from_pylist(rows[i * size:(i + 1) * size])
                pq.write_table(part, folder / split / f"{i:05d}.parquet")
        return {"path": str(folder), "files": "{split}/*.parquet"}

    return corpus_overrides(recipe, shard, overrides)


def recipe_changes(old: Path, recipe: str) -> list[str]:
    """How ``recipe`` today differs from the file ``old`` (both read by today's code): the keys that
    both sides' runs leave at the old values by reading ``old``."""
    from dataclasses import asdict

    sys.path.insert(0, str(ROOT))
    from omni.config import load_recipe

    def flat(d, key=""):
        if not isinstance(d, dict):
            return {key.rstrip("."): d}
        return {k: v for name, sub in d.items() for k, v in flat(sub, f"{key}{name}.").items()}

    then, now = flat(asdict(load_recipe(str(old)))), flat(asdict(load_recipe(recipe)))
    return [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(then.keys() | now.keys())
            if then.get(k) != now.get(k)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="omni_data_parity."))
    old = old_tree(args.old_rev, tmp / "old")
    results = {}
    for recipe in args.recipes:
        runs, name = {}, recipe.replace("/", "_")
        # every side reads the recipe as it was at --old-rev: keys added since are unknown to that code
        recipe_file = old / "recipes" / f"{recipe}.yaml"
        changes = recipe_changes(recipe_file, recipe)
        if changes:
            print(f"{recipe}: read as at {args.old_rev}; since changed: {'; '.join(changes)}", flush=True)
        cut = cut_corpora(str(recipe_file), tmp / "corpora" / name, args.rows) if args.rows else []
        sharded = parquet_shards(str(recipe_file), tmp / "shards" / name, cut)
        cache = f"data.cache_dir={tmp / 'cache'}"
        for side, src, extra in (("old", old, cut), ("cached", ROOT, [*cut, cache]),
                                 ("cached_warm_2_workers", ROOT, [*cut, cache, "train.num_workers=2"]),
                                 ("parquet_shards", ROOT, [*sharded, cache])):
            out = tmp / "runs" / f"{recipe.replace('/', '_')}_{side}"
            # train.max_minutes=0: with a time budget the cosine follows the wall clock where it is
            # further along than the steps (the first step after warmup, always), so the lr, and
            # every loss after it, would vary with the machine's load from run to run
            cmd = [sys.executable, "-m", "omni.cli", "train", str(recipe_file), f"train.out_dir={out}",
                   f"train.steps={args.steps}", "train.log_every=1", f"train.eval_every={args.steps}",
                   f"train.save_every={args.steps}", "train.progress=false", "train.max_minutes=0", *extra]
            if args.warmup_steps is not None:
                cmd.append(f"train.warmup_steps={args.warmup_steps}")
            env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"{recipe} {side} failed:\n{p.stderr[-3000:]}")
            train, val = losses(out)
            runs[side] = {"losses": train, "val_loss": val}
            print(f"{recipe} {side:>22}: first {train[0]:.5f} last {train[-1]:.5f} val {val}", flush=True)
        same = all(r == runs["old"] for r in runs.values())
        results[recipe] = {**runs, "identical": same, "recipe_changed_since_old_rev": changes}
        print(f"{recipe}: identical losses in all runs: {same}", flush=True)
    config = {"steps": args.steps, "warmup_steps": args.warmup_steps, "rows": args.rows,
              "old_rev": args.old_rev}
    return json_line("data_parity", args.threads, config, results)


if __name__ == "__main__":
    main()
