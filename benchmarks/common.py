"""Shared by the benchmarks: the CPU's name and interleaved timing (so both sides see the same load)."""

from __future__ import annotations

import platform
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, alternating which goes first, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def json_line(benchmark: str, threads: int, config: dict, results: dict) -> dict:
    """Print and return the one JSON line a benchmark ends with: what ran, where, and its results."""
    import datetime
    import json

    import torch

    line = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
            "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "config": config, "results": results}
    print(json.dumps(line, default=lambda x: x.item()))  # numpy / torch scalars as Python numbers
    return line


def old_tree(rev: str, dest):
    """omni's code, recipes and tokenizer specs at git revision ``rev`` extracted into ``dest``
    (created): "today's path" for benchmarks that compare against an earlier commit."""
    import subprocess
    from pathlib import Path

    root, dest = Path(__file__).resolve().parents[1], Path(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "omni", "recipes", "tokenizers"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def manifest_rows(manifest, limit: int | None = None) -> list[dict]:
    """A JSONL manifest's first ``limit`` rows, their media paths made absolute (for a manifest
    written elsewhere)."""
    import json
    from pathlib import Path

    manifest = Path(manifest)
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()][:limit]
    for row in rows:
        for key in ("image", "audio", "video"):
            if isinstance(row.get(key), str) and not Path(row[key]).is_absolute():
                row[key] = str(manifest.parent.resolve() / row[key])
    return rows


def cut_corpus(recipe: str, out, rows: int, data: str | None = None):
    """The recipe's corpus (or ``data``) cut to its first ``rows`` training rows and ``rows // 4``
    held-out ones, written to ``out``: what a benchmark reads when the whole corpus would take too
    long to prepare. Returns ``out``."""
    import json
    import sys
    from pathlib import Path

    root, out = Path(__file__).resolve().parents[1], Path(out)
    sys.path.insert(0, str(root))
    from omni.config import load_recipe

    src = root / (data or load_recipe(recipe).data.path)
    out.mkdir(parents=True)
    for split, n in (("train", rows), ("val", max(1, rows // 4))):
        lines = "".join(json.dumps(r) + "\n" for r in manifest_rows(src / f"{split}.jsonl", n))
        (out / f"{split}.jsonl").write_text(lines)
    return out


def corpus_overrides(recipe: str, make, overrides: list[str] | None = None) -> list[str]:
    """Overrides that move each task of ``recipe`` (a name or a file, after ``overrides``) onto
    another copy of its corpus. ``make(k, path)`` returns the task keys to set (e.g. ``{"path":
    ...}``) for the corpus folder ``path`` that a task reads; it is called once per folder (``k``
    counts them), so the tasks of a mixture that share a corpus share its copy. A one-task recipe
    gets ``data.KEY=value`` overrides, a mixture one ``data.mixture=[...]``: its entries as the
    recipe file writes them with only those keys replaced, so the code of an earlier revision
    reads them too."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from omni.config import apply_overrides, find_recipe, load_recipe, read_yaml

    data, made = load_recipe(recipe, overrides).data, {}

    def keys(path: str) -> dict:
        if path not in made:
            made[path] = make(len(made), path)
        return made[path]

    if not data.mixture:
        return [f"data.{k}={v}" for k, v in keys(data.path).items()]
    entries = apply_overrides(read_yaml(find_recipe(recipe)), overrides or [])["data"]["mixture"]
    parts = [{**entry, **keys(part.path)} for entry, part in zip(entries, data.mixture)]
    return ["data.mixture=" + json.dumps(parts)]


def cut_corpora(recipe: str, out, rows: int) -> list[str]:
    """Overrides that read every corpus of ``recipe`` (each task's, for a mixture) cut by
    :func:`cut_corpus` to its first ``rows`` training rows, the copies written under ``out``."""
    from pathlib import Path

    return corpus_overrides(recipe, lambda k, path: {
        "path": str(cut_corpus(recipe, Path(out) / f"{k}_{Path(path).name}", rows, path))})


def set_up_trainer(recipe: str, overrides: list[str], out: str):
    """``(cfg, trainer)``: a recipe's trainer with its model, datasets and sample caches built, not
    trained; the caller's ``overrides``, then a fresh ``train.out_dir=out`` in fp32 without a bar."""
    from omni.config import load_recipe
    from omni.train.loop import Trainer

    fixed = [f"train.out_dir={out}", "train.resume=false", "train.overwrite=true", "train.progress=false",
             'train.mixed_precision="no"']
    cfg = load_recipe(recipe, [*overrides, *fixed])
    trainer = Trainer(cfg)
    with trainer.run_folder():
        trainer.setup()
    return cfg, trainer

