"""Silero VAD speed: omni's batched torch forward (omni/media/vad.py) against the silero-vad
package's own TorchScript model called frame by frame (what ``get_speech_timestamps`` does),
interleaved, on the same audio, with the largest probability difference.

    python benchmarks/whisper_longform.py --out /tmp/w/longform.wav   # or any speech file
    python benchmarks/vad_speed.py --wav /tmp/w/longform.wav --start 40 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import json_line  # (benchmarks/ is on sys.path when run as a script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wav", default="/tmp/w/longform.wav")
    p.add_argument("--start", type=float, default=40.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import silero_vad

    from omni.media.audio import load_audio
    from omni.media.vad import SileroVAD

    torch.set_num_threads(args.threads)  # (importing silero_vad set 1)
    vad, ref = SileroVAD(), silero_vad.load_silero_vad()
    lo = round(args.start * 16000)
    wave = load_audio(args.wav, 16000)[0][lo:lo + round(args.seconds * 16000)]
    times: dict[str, list[float]] = {"package_per_frame": [], "omni_batched": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref.reset_states()
        with torch.no_grad():
            a = [ref(wave[i:i + 512], 16000).item() for i in range(0, len(wave) - 511, 512)]
        times["package_per_frame"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = vad.probs(wave.split(30 * 16000))
        times["omni_batched"].append(time.perf_counter() - t0)
    results = {k: [round(t, 3) for t in v] for k, v in times.items()}
    results.update(speedup=round(min(times["package_per_frame"]) / min(times["omni_batched"]), 1),
                   max_abs_diff=max(abs(x - y) for x, y in zip(a, b)), load_average=os.getloadavg()[0])
    return json_line("vad_speed", args.threads, vars(args), results)


if __name__ == "__main__":
    main()
