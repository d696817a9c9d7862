"""Equal-compute configs for a mixture recipe: one single-task config per mixture entry (the same
model, parts, trainable set and hyperparameters, its data that one task alone) trained ``S`` steps,
and the mixture itself trained ``S`` x the number of tasks, so the mixture spends exactly the steps
(rows x tokens) the single-task models spend together. It tells "too few steps" from "the tasks
interfere" with nothing else changed. Writes the configs and prints the commands; trains nothing.

    python benchmarks/equal_compute.py any2any/small --steps-per-task 80 --out runs/eq [key=value ...]

Warm-up is a tenth of each run's steps (the recipe's share where it is lower; one step at least);
each run evaluates and saves once, at its end. Runs are named by their task's label. Then ``omni
eval`` each run and compare them with ``benchmarks/mixture_vs_single.py --mixture runs/eq/mixture
--single asr=runs/eq/asr ...``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from omni.config import RecipeConfig, apply_overrides, find_recipe, load_recipe, read_yaml


def configs(raw: dict, recipe: RecipeConfig, steps_per_task: int, out: Path) -> dict[str, dict]:
    """``{name: raw config}``: ``mixture`` and one per task of the mixture recipe ``raw`` (``recipe``
    is it validated), named by the task's label."""
    mixture = raw.get("data", {}).get("mixture")
    if not mixture or len(mixture) < 2:
        raise SystemExit("equal compute needs a recipe whose data.mixture has two tasks or more")
    warmup = min(0.1, recipe.train.warmup_steps / recipe.train.steps)

    def run(name: str, entries: list[dict], steps: int) -> dict:
        cfg = copy.deepcopy(raw)
        cfg["data"]["mixture"] = entries
        cfg["train"].update(steps=steps, warmup_steps=max(1, round(steps * warmup)), max_minutes=0,
                            eval_every=steps, save_every=steps, out_dir=str(out / name))
        return cfg

    out_cfgs = {"mixture": run("mixture", mixture, steps_per_task * len(mixture))}
    for name, entry in zip((t.label for t in recipe.data.mixture), mixture):
        alone = {k: v for k, v in entry.items() if k not in ("weight", "loss_weight")}
        out_cfgs[name] = run(name, [alone], steps_per_task)
    return out_cfgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value, applied to the recipe first")
    p.add_argument("--steps-per-task", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    raw = apply_overrides(read_yaml(find_recipe(args.recipe)), args.overrides)
    raw.setdefault("name", args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, args.overrides)
    for name, cfg in configs(raw, recipe, args.steps_per_task, args.out).items():
        path = args.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        load_recipe(str(path))  # validates it
        print(f"omni train {path} && omni eval --ckpt {cfg['train']['out_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
