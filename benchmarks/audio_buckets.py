"""The audio encoder's training step (forward + backward, SpecAugment and CTC as in the recipes)
on a mixture-like batch of clips, encoded in length buckets (what ``AudioEncoder`` does) against
one call padded to the longest clip (what it did before). Clip lengths are drawn from the built
corpora's manifests (``duration``), so the padding is the real one.

    python benchmarks/audio_buckets.py                      # 20 utterances + 2 sounds per step
    python benchmarks/audio_buckets.py --speech 48 --sounds 0   # whisper/asr_tiny-like

Ends with one JSON line (hardware, versions, config, seconds per step for each way).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch

from common import interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def durations(manifest: Path) -> list[float]:
    return [json.loads(line)["duration"] for line in manifest.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speech", type=int, default=20, help="utterances per step (data/speech)")
    ap.add_argument("--sounds", type=int, default=2, help="sound clips per step (data/sounds)")
    ap.add_argument("--data", default="data", help="the corpora's root")
    ap.add_argument("--steps", type=int, default=6, help="different batches timed, each way")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from omni.model.media_encoder import AudioEncoder, length_buckets

    root = Path(args.data)
    speech, sounds = durations(root / "speech/train.jsonl"), durations(root / "sounds/train.jsonl")
    enc = AudioEncoder({"encoder": {"kind": "whisper_style", "size": "tiny", "subsample": 4},
                        "normalize": "meanvar",
                        "spec_augment": {"freq_masks": 2, "freq_width": 12,
                                         "time_masks": 2, "time_width": 0.08},
                        "ctc_weight": 0.3, "connector": {"kind": "mlp"}}, 256, text_size=1000).train()
    rng = random.Random(0)
    batches = []
    for _ in range(args.steps):
        secs = rng.sample(speech, args.speech) + rng.sample(sounds, args.sounds)
        mels = [torch.randn(80, int(s * 100)) for s in secs]  # 100 log-mel frames a second
        labels = [torch.randint(1, 1000, (8,)) for _ in secs]
        batches.append((mels, labels))

    def step(waste: float):
        def run():
            enc.bucket_waste = waste
            for mels, labels in batches:
                out, ctc = enc.encode(mels, labels)
                (sum(o.sum() for o in out) * 0 + ctc).backward()
        return run

    times = interleaved({"buckets": step(AudioEncoder.bucket_waste), "one_call": step(float("inf"))},
                        repeats=3, warmup=1)
    per_step = {k: statistics.median(v) / args.steps for k, v in times.items()}
    groups = statistics.mean(len(length_buckets([m.shape[-1] for m in b[0]], AudioEncoder.bucket_waste))
                             for b in batches)
    for k, v in per_step.items():
        print(f"{k:>9}: {v * 1000:7.1f} ms per step")
    print(f"speed-up {per_step['one_call'] / per_step['buckets']:.2f}x, {groups:.1f} encoder calls per step")
    json_line("audio_buckets", args.threads,
              {"speech_per_step": args.speech, "sounds_per_step": args.sounds,
               "encoder": "whisper_style tiny",
               "bucket_waste": AudioEncoder.bucket_waste, "calls_per_step": round(groups, 1)},
              {"s_per_step_buckets": round(per_step["buckets"], 4),
               "s_per_step_one_call": round(per_step["one_call"], 4),
               "speedup": round(per_step["one_call"] / per_step["buckets"], 2)})


if __name__ == "__main__":
    main()
