"""The same captioning task (Tux Paint stamps -> caption) trained with each fusion paradigm on top
of the same pre-trained language model: CIDEr-D / BLEU-4 on the test split, trainable
parameters, seconds per step and peak memory, one run each, same steps and batch.

    omni data build images --out data/images && omni train text/tiny
    python benchmarks/paradigms.py --steps 300          # table + one JSON line

Paradigms (each starts from ``--lm``; see docs/paradigms.md). "LM frozen" keeps the token
embeddings trainable: the language model never saw the chat and media marker tokens, so they need
learned embeddings (Flamingo trains its new tokens' embeddings too).
  linear     LLaVA-1: image tokens through a linear projection, in the sequence; LM frozen
  mlp        LLaVA-1.5: the same with a 2-layer MLP projection; LM frozen
  qformer    BLIP-2's connector: 8 learned queries over the image features, in the sequence; LM frozen
  flamingo   gated cross-attention every 2nd layer over 8 perceiver-resampled tokens; LM frozen
  early      early fusion (Fuyu): raw patches linearly embedded into the sequence; everything trains
  blip2      BLIP-2 in its two stages, the step budget split between them: stage 1 trains the same
             Q-Former over the frozen (here: randomly initialised) image tower with contrastive,
             matching and grounded-generation losses on a copy of the LM; stage 2 loads stage 1's
             image side and the original LM and captions as the qformer row does, tower and LM frozen
  blip2_clip the same two stages over the image tower of a CLIP run (``--tower``, `omni train
             clip/images_tiny`), frozen, as BLIP-2 freezes a pre-trained ViT

A paradigm is one or more stages; each stage gets ``--steps / stages`` steps and starts from
``--lm``, or from what its overrides name (``{lm}``: the LM run, ``{prev}``: the previous stage's
run, ``{tower}``: the CLIP run); wall time and peak memory cover every stage, the other columns
describe the last.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

PARADIGMS = {
    "linear": [("llava/caption_tiny", ["model.media.image.connector.kind=linear",
                                       "train.trainable=[encoders.image, embed]"])],
    "mlp": [("llava/caption_tiny", ["model.media.image.connector.kind=mlp",
                                    "train.trainable=[encoders.image, embed]"])],
    "qformer": [("llava/caption_tiny", ["model.media.image.connector={kind: qformer, num_queries: 8, "
                                        "num_layers: 2}",
                                        "train.trainable=[encoders.image, embed]"])],
    "flamingo": [("flamingo/caption_tiny", [])],
    "early": [("llava/caption_tiny", ["model.media.image.tokenizer={kind: patchify, size: tiny, "
                                      "image_size: 64, patch_size: 16}"])],
    "blip2": [("blip2/stage1_tiny", []), ("blip2/stage2_tiny", ["train.init_from=[{prev},{lm}]"])],
    "blip2_clip": [("blip2/stage1_tiny", ["train.init_from=[{tower},{lm}]"]),
                   ("blip2/stage2_tiny", ["train.init_from=[{prev},{lm}]"])],
}


def _peak_rss(proc: subprocess.Popen, out: list) -> None:
    """Poll the process tree's resident memory until it exits; the peak goes into out[0] (bytes)."""
    peak = 0
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
    finally:
        out.append(peak)


def _train(name: str, recipe: str, overrides: list[str]) -> tuple[float, int]:
    """One training run as a subprocess: (wall seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "omni.cli", "train", recipe, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: list = []
    watcher = threading.Thread(target=_peak_rss, args=(proc, peak))
    watcher.start()
    log, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{name} ({recipe}): training failed:\n{log[-3000:]}")
    return time.perf_counter() - t0, peak[0] if peak else 0


def run(name: str, args, out_root: Path) -> dict:
    stages = PARADIGMS[name]
    steps = args.steps // len(stages)
    wall, peak, prev = 0.0, 0, None
    for i, (recipe, extra) in enumerate(stages):
        out = out_root / name if i == len(stages) - 1 else out_root / f"{name}_stage{i + 1}"
        overrides = [f"train.out_dir={out}", f"train.steps={steps}", f"train.init_from={args.lm}",
                     f"data.path={args.data}", "train.resume=false", "train.overwrite=true",
                     "train.progress=false", f"train.eval_every={steps}", f"train.save_every={steps}",
                     f"train.warmup_steps={min(40, steps // 10)}",
                     *(x.format(lm=args.lm, prev=prev, tower=args.tower) for x in extra)]
        seconds, rss = _train(name, recipe, overrides)
        wall, peak, prev = wall + seconds, max(peak, rss), out
    recipe = " + ".join(r for r, _ in stages)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    start = next(r for r in rows if r.get("event") == "start")
    r = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--ckpt", str(out), "--split", args.split],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name}: eval failed:\n{r.stderr[-3000:]}")
    m = json.loads((out / f"eval_{args.split}.json").read_text())
    tok_s = [x["tokens_per_s"] for x in rows if "tokens_per_s" in x]
    return {"paradigm": name, "recipe": recipe, "cider_d": round(m["cider_d"], 4),
            "bleu4": round(m["bleu4"], 4),
            "trainable_params": start["trainable_params"], "params": start["params"],
            "wall_s": round(wall, 1), "tokens_per_s": round(sum(tok_s) / max(len(tok_s), 1), 1),
            "peak_rss_mb": round(peak / 2**20) if peak else None,
            "val_loss": next((x["val_loss"] for x in reversed(rows) if "val_loss" in x), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lm", default="runs/text_tiny",
                    help="the pre-trained language model run every paradigm starts from")
    ap.add_argument("--data", default="data/images")
    ap.add_argument("--tower", default="runs/clip_images_tiny",
                    help="blip2_clip: the CLIP run whose image tower it freezes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="runs/paradigms")
    ap.add_argument("--only", nargs="*", choices=list(PARADIGMS), default=list(PARADIGMS))
    args = ap.parse_args()
    if not (Path(args.lm) / "model.safetensors").is_file():
        raise SystemExit(f"{args.lm}: no language model; run `omni train text/tiny` first")
    if "blip2_clip" in args.only and not (Path(args.tower) / "model.safetensors").is_file():
        raise SystemExit(f"{args.tower}: no CLIP run for blip2_clip; run `omni train clip/images_tiny` first")
    results = [run(name, args, Path(args.out)) for name in args.only]
    print("| paradigm | CIDEr-D | BLEU-4 | trainable / all params | wall (s) | tokens/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['paradigm']} | {r['cider_d']:.3f} | {r['bleu4']:.3f} | "
              f"{r['trainable_params'] / 1e6:.2f}M / {r['params'] / 1e6:.2f}M | {r['wall_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']} |")
    print(json.dumps({"benchmark": "paradigms", "date": time.strftime("%Y-%m-%d"),
                      "cpu": platform.processor(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__,
                      "config": {"steps": args.steps, "lm": args.lm, "data": args.data, "split": args.split},
                      "results": results}))


if __name__ == "__main__":
    main()
