"""Transcription speed: real-time factor (processing seconds per second of audio, lower is
faster) of a trained omni ASR checkpoint through ``omni.api.describe`` (what ``omni transcribe``
runs: load, log-mel, encoder, greedy decoding in batches), against transformers'
``WhisperForConditionalGeneration`` with an encoder of the same shape (random weights: speed
only) decoding the same number of tokens greedily, in the same run.

    python benchmarks/transcribe_rtf.py --ckpt runs/whisper_asr_tiny --data data/speech --split test

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import cpu_model, interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", default="data/speech")
    p.add_argument("--split", default="test")
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    import omni
    from omni.api import describe
    from omni.io import read_jsonl

    model = omni.load(args.ckpt)
    prompt = ""
    recipe = Path(args.ckpt) / "recipe.yaml"
    if recipe.is_file():
        from omni.eval import run_recipe

        prompt = run_recipe(Path(args.ckpt)).data.prompt
    rows = list(read_jsonl(Path(args.data) / f"{args.split}.jsonl"))[:args.files]
    paths = [Path(args.data) / r["audio"] for r in rows]
    audio_s = sum(omni.Audio(p).duration for p in paths)
    texts = describe(model, paths, prompt=prompt, batch_size=args.batch_size, window_s=None, progress=False)
    new_tokens = max(1, round(statistics.mean(len(model.tokenizer.encode(t)) for t in texts)) + 1)

    enc = model.encoders["audio"].encoder
    hf_cfg = WhisperConfig(num_mel_bins=80, d_model=enc.out_dim, encoder_layers=len(enc.layers.layers),
                           decoder_layers=model.config.backbone.num_layers,
                           encoder_attention_heads=enc.layers.layers[0].self_attn.num_heads,
                           decoder_attention_heads=enc.layers.layers[0].self_attn.num_heads,
                           encoder_ffn_dim=enc.layers.layers[0].linear1.out_features,
                           decoder_ffn_dim=enc.layers.layers[0].linear1.out_features,
                           vocab_size=model.vocab.text_size + 8, max_target_positions=128,
                           decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    peer = WhisperForConditionalGeneration(hf_cfg).eval()
    fe = WhisperFeatureExtractor(feature_size=80)
    waves = [omni.Audio(p).resample(16000).waveform.numpy() for p in paths]

    def run_omni():
        describe(model, paths, prompt=prompt, batch_size=args.batch_size, window_s=None, progress=False)

    @torch.no_grad()
    def run_peer():
        for i in range(0, len(waves), args.batch_size):
            feats = fe(waves[i:i + args.batch_size], sampling_rate=16000, return_tensors="pt").input_features
            peer.generate(feats, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          num_beams=1)

    times = interleaved({"omni": run_omni, "transformers": run_peer}, repeats=args.repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"omni_rtf": round(med["omni"] / audio_s, 4),
              "transformers_rtf": round(med["transformers"] / audio_s, 4),
              "speedup": round(med["transformers"] / med["omni"], 2), "audio_s": round(audio_s, 2),
              "omni_params": model.num_params(),
              "transformers_params": sum(p.numel() for p in peer.parameters()),
              "tokens_per_clip": new_tokens}
    print(f"{len(paths)} clips, {audio_s:.1f} s of audio, batch {args.batch_size}, {args.threads} threads, "
          f"{cpu_model()}")
    print("| model | params | real-time factor | x real time |\n|---|---|---|---|")
    for name in ("omni", "transformers"):
        rtf = result[f"{name}_rtf"]
        print(f"| {name} | {result[f'{name}_params'] / 1e6:.1f}M | {rtf:.4f} | {1 / rtf:.0f}x |")
    config = {"ckpt": args.ckpt, "split": args.split, "files": len(paths), "batch_size": args.batch_size,
              "repeats": args.repeats}
    return json_line("transcribe_rtf", args.threads, config, result)


if __name__ == "__main__":
    main()
