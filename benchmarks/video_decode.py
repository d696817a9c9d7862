"""Frame decoding speed, decord vs PyAV, for the sampling the video recipes use: ``num_frames``
frames spread uniformly over each clip (``omni.media.video.Video``, the same code training runs).

    python benchmarks/video_decode.py                        # corpus-style clips + one longer clip
    python benchmarks/video_decode.py --corpus data/video    # clips from a built corpus (train.jsonl)
    python benchmarks/video_decode.py --clips 8 --long-seconds 10 --repeats 1   # a quick check

Sources: (1) short clips like ``omni data build video`` writes (rendered here from the Tux Paint
stamps when installed, else synthetic frames; 64x64, 8 fps, 2 s), (2) one longer clip rendered
here (default 30 s, 256x256, 30 fps, H.264 with x264's default keyframe interval), where decord
seeks and PyAV decodes from the start up to the last wanted frame. Reports frames/s and clips/s
(median of repeats) and ends with one JSON line (hardware, versions, date, config, results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=str, default=None, help="a built video corpus folder (reads train.jsonl)")
    p.add_argument("--clips", type=int, default=32, help="short clips to decode per repeat")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--long-seconds", type=float, default=30.0)
    p.add_argument("--long-size", type=int, default=256)
    p.add_argument("--long-fps", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    return p.parse_args(argv)


def short_clips(args, tmp: Path) -> tuple[list[Path], str]:
    if args.corpus:
        from omni.io import read_jsonl

        rows = list(read_jsonl(Path(args.corpus) / "train.jsonl"))[: args.clips]
        return [Path(args.corpus) / r["video"] for r in rows], f"corpus {args.corpus}"
    from omni.data.images import STAMPS_DIR

    if STAMPS_DIR.is_dir():
        from omni.data.video import build_video_corpus

        build_video_corpus(tmp / "corpus", max_stamps=max(1, (args.clips + 7) // 8))
        paths = sorted((tmp / "corpus" / "videos").glob("*.mp4"))[: args.clips]
        return paths, "Tux Paint stamp clips, 64x64, 8 fps, 2 s, with audio"
    from omni.media.video import write_video

    g = torch.Generator().manual_seed(0)
    paths = [write_video(tmp / f"c{i}.mp4",
                         torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=g), 8)
             for i in range(args.clips)]
    return paths, "synthetic noise clips, 64x64, 8 fps, 2 s (Tux Paint stamps not installed)"


def long_clip(args, tmp: Path) -> Path:
    """A moving gradient with noise, so the encoder produces realistic P-frames."""
    from omni.media.video import write_video

    n, s = int(args.long_seconds * args.long_fps), args.long_size
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, s)
    frames = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for i in range(n):
        shift = (ramp + 4 * i) % 256
        base = torch.stack([shift.expand(s, s), shift.expand(s, s).T, torch.full((s, s), float(i % 256))])
        frames[i] = (base + 20 * torch.rand(3, s, s, generator=g)).clamp(0, 255).to(torch.uint8)
    return write_video(tmp / "long.mp4", frames, args.long_fps)


def measure(paths: list[Path], backend: str, num_frames: int, repeats: int) -> dict:
    from omni.media.video import Video

    times, frames = [], 0
    for r in range(repeats + 1):  # the first pass warms the page cache and the libraries
        t0 = time.perf_counter()
        frames = sum(Video(p, num_frames=num_frames, backend=backend).frames.shape[0] for p in paths)
        if r:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"frames_per_s": frames / t, "clips_per_s": len(paths) / t, "seconds": t, "frames": frames}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import av

    from omni.media.video import import_decord

    decord = import_decord()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips, clip_desc = short_clips(args, tmp)
        t0 = time.perf_counter()
        long = long_clip(args, tmp)
        long_desc = f"{args.long_seconds:g} s, {args.long_size}x{args.long_size}, {args.long_fps:g} fps " \
                    f"(rendered in {time.perf_counter() - t0:.1f} s)"
        for source, paths in (("short", clips), ("long", [long])):
            for backend in ("decord", "pyav"):
                results[f"{source}/{backend}"] = measure(paths, backend, args.num_frames, args.repeats)

    print(f"short clips: {len(clips)} x {clip_desc}\nlong clip: {long_desc}\n"
          f"sampling: {args.num_frames} frames, uniform; median of {args.repeats} repeats\n")
    print("| source | backend | frames/s | clips/s | speed-up vs PyAV |\n|---|---|---:|---:|---:|")
    for key, r in results.items():
        source, backend = key.split("/")
        ratio = r["frames_per_s"] / results[f"{source}/pyav"]["frames_per_s"]
        print(f"| {source} | {backend} | {r['frames_per_s']:.0f} | {r['clips_per_s']:.1f} | {ratio:.2f}x |")
    record = {
        "benchmark": "video_decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "decord": decord.__version__, "av": av.__version__,
                     "libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ())))},
        "config": {"num_frames": args.num_frames, "clips": len(clips), "short": clip_desc, "long": long_desc,
                   "repeats": args.repeats},
        "results": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in results.items()},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
