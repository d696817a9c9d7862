"""AudioCodec vs the bare ``encodec`` package model on the same weights: encode/decode real-time factor.

    python benchmarks/codec_rtf.py                          # presets encodec_24khz and tiny, 10 s of audio
    python benchmarks/codec_rtf.py --seconds 4 --repeats 3  # a quick check

"Bare" is ``EncodecModel.encode(x)`` / ``.decode(frames)`` (the 24 kHz model from
``EncodecModel.encodec_model_24khz(pretrained=False)`` with omni's weights loaded; other presets use
the same module omni wraps) at the bandwidth giving omni's ``num_codebooks``; codes are checked
equal. RTF = compute seconds / audio seconds (lower is faster). Goal: omni's overhead <= 5%.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import cpu_model, interleaved  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="encodec_24khz,tiny")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def bare_model(codec):
    """The encodec package's own model with the codec's weights, set to the codec's bandwidth."""
    from encodec import EncodecModel

    from omni.tokenizers.audio import build_encodec

    if codec.config == codec.config.__class__():  # the encodec_24khz architecture
        bare = EncodecModel.encodec_model_24khz(pretrained=False)
    else:  # an encodec.EncodecModel of the same architecture (deepcopy fails on weight_norm modules)
        bare = build_encodec(codec.config)
    bare.load_state_dict(codec.model.state_dict())
    bw = codec.num_codebooks * math.log2(codec.cardinality) * bare.frame_rate / 1000
    bare.target_bandwidths = [bw]
    bare.set_target_bandwidth(bw)
    return bare.eval()


def measure(preset: str, args) -> dict:
    """Encode and decode RTF of omni's codec and the bare model for one preset, interleaved."""
    from omni.tokenizers.audio import AudioCodec

    torch.manual_seed(args.seed)
    codec = AudioCodec(preset)
    with torch.no_grad():  # untrained codebooks are zeros: give them random entries so codes vary
        for layer in codec.model.quantizer.vq.layers:
            layer._codebook.embed.normal_()
    bare = bare_model(codec)
    g = torch.Generator().manual_seed(args.seed)
    wave = 0.1 * torch.randn(int(args.seconds * codec.sample_rate), generator=g)
    x = wave[None, None]
    with torch.no_grad():
        ((bare_codes, _),) = bare.encode(x)
    codes = codec.encode(wave)

    def bare_encode():
        with torch.no_grad():
            return bare.encode(x)

    def bare_decode():
        with torch.no_grad():
            return bare.decode([(bare_codes, None)])

    res = {"codes_equal": bool(torch.equal(codes, bare_codes[0])), "num_codebooks": codec.num_codebooks,
           "params": sum(p.numel() for p in codec.model.parameters()), "frame_rate": codec.frame_rate}
    fns = {"encode": {"omni": lambda: codec.encode(wave), "bare": bare_encode},
           "decode": {"omni": lambda: codec.decode(codes), "bare": bare_decode}}
    for op, pair in fns.items():
        t = interleaved(pair, args.repeats, args.warmup)
        o, b = statistics.median(t["omni"]), statistics.median(t["bare"])
        res[op] = {"omni_rtf": o / args.seconds, "bare_rtf": b / args.seconds, "overhead": o / b - 1,
                   "omni_rtf_best": min(t["omni"]) / args.seconds,
                   "bare_rtf_best": min(t["bare"]) / args.seconds,
                   "overhead_best": min(t["omni"]) / min(t["bare"]) - 1}
    return res


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs skew CPU timings
    import encodec

    import omni

    results, rows = {}, []
    for preset in args.presets.split(","):
        results[preset] = measure(preset, args)
        for op in ("encode", "decode"):
            r = results[preset][op]
            rows.append((preset, op, r["omni_rtf"], r["bare_rtf"], r["overhead"], r["overhead_best"],
                         results[preset]["codes_equal"]))

    print(f"\nAudioCodec vs encodec {getattr(encodec, '__version__', '?')} (same weights) | {cpu_model()} | "
          f"{args.threads} threads | {args.seconds:g} s of audio | median of {args.repeats}")
    print(f"{'preset':<15}{'op':<8}{'omni RTF':>10}{'bare RTF':>10}{'overhead':>10}{'(best)':>9}"
          "  codes equal")
    for preset, op, o, b, ov, ovb, same in rows:
        print(f"{preset:<15}{op:<8}{o:>10.4f}{b:>10.4f}{100 * ov:>9.1f}%{100 * ovb:>8.1f}%  {same}")
    record = {
        "benchmark": "codec_rtf",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "threads": args.threads, "logical_cpus": os.cpu_count(),
                     "device": "cpu", "loadavg_1m_at_start": load_before},
        "versions": {"torch": torch.__version__, "encodec": getattr(encodec, "__version__", "?"),
                     "omni": omni.__version__, "python": platform.python_version()},
        "config": {"presets": args.presets, "seconds": args.seconds, "repeats": args.repeats,
                   "warmup": args.warmup},
        "goals": {"overhead_max": 0.05},
        "results": results,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
