"""Memory and start-up against corpus size (issue 26): today's in-memory data path (the code at
``--old-rev``) against prepared-sample caches read memory-mapped.

    python benchmarks/data_scale.py                       # text 1k/10k/100k rows, images 1k/10k
    python benchmarks/data_scale.py --text-sizes 1000 --image-sizes --steps 2   # a quick look

Synthetic manifests reuse real files: text rows cycled from ``data/text/train.jsonl`` (recipe
``text/tiny``), image rows cycled from ``data/images/train.jsonl`` (``llava/caption_tiny``, the
same PNGs again and again, by absolute path). Each case runs in a fresh process, one at a time:

  old    the code at --old-rev (``git archive``): every row rendered in memory, packed, N steps
  cold   this tree, no cache yet: the cache is built (the build's peak RSS is rss_setup), N steps
  warm   this tree again: the cache is opened, N steps

and reports the peak RSS (MiB) after setup and after N training steps, the seconds from process
start to the start of training (``setup_s``) and to the end of the first step, and how many rows
were rendered and media files decoded and preprocessed (``Processor.prepare`` / ``encode_audio``
calls; the warm run's goal is 0). Then the
loader's rows/s from a warm cache with 0 and 2 DataLoader workers against the rows/s the recipe's
training step consumes (``batch_size / s_per_step``, measured in the warm run). Ends with one JSON line.
Needs ``omni data build text --out data/text`` and ``omni data build images --out data/images`` and
the recipes' tokenizer (``omni data prepare text/tiny`` trains it).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"text": "text/tiny", "image": "llava/caption_tiny"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument("--image-sizes", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--steps", type=int, default=3, help="training steps per run (N)")
    p.add_argument("--loader-batches", type=int, default=20, help="micro-batches timed per loader run")
    p.add_argument("--old-rev", default="218c701", help="the git revision of today's in-memory path")
    p.add_argument("--data", default=str(ROOT / "data"), help="holds text/ and images/ corpora")
    p.add_argument("--tokenizer", default=str(ROOT / "runs/tokenizers/text_spm"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(job: dict) -> dict:
    """One case, in this process: set up the recipe's Trainer, run N steps (or time the loader)."""
    import torch

    torch.set_num_threads(job["threads"])
    from tqdm import tqdm

    from omni.config import load_recipe
    from omni.processor import Processor
    from omni.train.loop import Trainer

    counts = {"renders": 0, "media_decodes": 0}

    def counted(name, key):
        fn = getattr(Processor, name)

        def wrapper(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        setattr(Processor, name, wrapper)

    counted("render", "renders")
    counted("prepare", "media_decodes")
    counted("encode_audio", "media_decodes")
    trainer = Trainer(load_recipe(job["recipe"], job["overrides"]))
    out = {}
    with trainer.run_folder():
        trainer.setup()
        out.update(rss_setup_mib=round(_rss_mib()), setup_s=round(time.perf_counter() - START, 2),
                   rows=len(trainer.train_set), samples=trainer.train_set.num_docs, **counts)
        if job.get("loader_workers") is not None:
            from omni.train.loop import batches
            it = batches(trainer.train_set, trainer.stream, 0, trainer.tc.batch_size,
                         num_workers=job["loader_workers"], mrope=trainer.cfg.model.mrope)
            next(it)  # workers started
            t0 = time.perf_counter()
            for _ in range(job["loader_batches"]):
                next(it)
            out["loader_rows_per_s"] = round(job["loader_batches"] * trainer.tc.batch_size
                                             / (time.perf_counter() - t0), 1)
            return out
        trainer.bar = tqdm(disable=True)
        times = []
        for i in range(job["steps"]):
            t0 = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - t0)
            if i == 0:
                out["first_step_s"] = round(time.perf_counter() - START, 2)
        out.update(rss_steps_mib=round(_rss_mib()), s_per_step=round(min(times[1:] or times), 3),
                   batch_size=trainer.tc.batch_size)
    return out


def run_child(src: Path, job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMNI_PROGRESS": "0"}
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, cwd=str(ROOT),
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{job['name']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def manifest(kind: str, n: int, data: Path, out: Path) -> Path:
    """``n`` rows cycled from the real corpus (media paths made absolute), and its real val split."""
    src = data / {"text": "text", "image": "images"}[kind]
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (src / "train.jsonl").read_text().splitlines() if x.strip()]
    with open(out / "train.jsonl", "w") as f:
        for row in itertools.islice(itertools.cycle(rows), n):
            if kind == "image":
                row = {**row, "image": str(src / row["image"])}
            f.write(json.dumps(row) + "\n")
    val = [json.loads(x) for x in (src / "val.jsonl").read_text().splitlines() if x.strip()]
    with open(out / "val.jsonl", "w") as f:
        for row in val:
            f.write(json.dumps({**row, "image": str(src / row["image"])} if kind == "image" else row) + "\n")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    from common import json_line, old_tree  # benchmarks/ is on sys.path when run as a script

    tmp = Path(tempfile.mkdtemp(prefix="omni_data_scale."))
    old = old_tree(args.old_rev, tmp / "old")
    results = []
    cases = [("text", n) for n in args.text_sizes] + [("image", n) for n in args.image_sizes]
    for kind, n in cases:
        data = manifest(kind, n, Path(args.data), tmp / f"{kind}_{n}")
        base = {"recipe": RECIPES[kind], "threads": args.threads, "steps": args.steps,
                "loader_batches": args.loader_batches}
        row = {"kind": kind, "rows": n}

        def job(name, side):
            o = [f"data.path={data}", f"tokenizer.path={args.tokenizer}",
                 f"train.out_dir={tmp / 'runs' / name}", "train.progress=false"]
            return {**base, "name": name, "side": side, "overrides": o}

        for side, src in (("old", old), ("cold", ROOT), ("warm", ROOT)):
            row[side] = run_child(src, job(f"{kind}_{n}_{side}", side))
            print(f"{kind} {n:>6} {side:>4}: {row[side]}", flush=True)
        for w in (0, 2):
            r = run_child(ROOT, {**job(f"{kind}_{n}_loader{w}", "warm"), "loader_workers": w})
            row[f"loader_{w}_workers_rows_per_s"] = r["loader_rows_per_s"]
        row["step_rows_per_s"] = round(row["warm"]["batch_size"] / row["warm"]["s_per_step"], 1)
        for t in ("setup_s", "first_step_s"):  # training starts after setup; its first step ends later
            row[f"{t}_cold_over_warm"] = round(row["cold"][t] / row["warm"][t], 2)
        print(f"{kind} {n:>6}: loader rows/s 0 workers {row['loader_0_workers_rows_per_s']}, 2 workers "
              f"{row['loader_2_workers_rows_per_s']}; the step consumes {row['step_rows_per_s']}", flush=True)
        results.append(row)
        for d in (data, tmp / "runs"):
            subprocess.run(["rm", "-rf", str(d)], check=True)
    config = {"steps": args.steps, "old_rev": args.old_rev, "recipes": RECIPES}
    return json_line("data_scale", args.threads, config, {"cases": results})


if __name__ == "__main__":
    main()
