"""The ``omni`` command end to end (in-process): help, data build, tokenizer train, generate, demo."""

from __future__ import annotations

import re

import pytest

from omni.cli import build_parser, main
from omni.data.text import wiki_documents
from omni.demo import headline
from omni.io import write_jsonl
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small saved checkpoint with a real tokenizer (untrained weights are enough for the CLI)."""
    root = tmp_path_factory.mktemp("cli")
    tok = TextTokenizer.train([d["text"] for d in wiki_documents()[:200]], vocab_size=800)
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=48), tok.vocab, seed=0), tokenizer=tok)
    return model.save_pretrained(root / "ckpt")


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_every_option_has_help(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "train" in capsys.readouterr().out
    names = []
    for name, sub in _subparsers(parser):
        names.append(name)
        for action in sub._actions:
            assert action.help, f"`omni ... {name}` option {action.dest} has no help"
    assert {"train", "generate", "data", "build", "tokenizer", "demo"} <= set(names)


def test_data_build_from_text_file(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"Paragraph number {i} about things." for i in range(50)), encoding="utf-8")
    assert main(["data", "build", "text", "--out", str(tmp_path / "d"), "--source", str(src)]) == 0
    out = capsys.readouterr().out
    n = sum(int(m) for m in re.findall(r"(\d+) docs", out))
    assert n == 50
    assert (tmp_path / "d" / "train.jsonl").is_file()


@pytest.mark.parametrize("content, needle", [(b"\xff\xfe\x00bad", "not UTF-8"), (b"  \n\n ", "empty")])
def test_data_build_bad_file_is_one_line_error(tmp_path, capsys, content, needle):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    assert main(["data", "build", "text", "--out", str(tmp_path / "d"), "--source", str(src)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and needle in err
    assert not (tmp_path / "d").exists()


def test_tokenizer_train_from_spec(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, wiki_documents()[:150])
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "text_spm", f"corpus={corpus}", f"out={out}", "vocab_size=600"]) == 0
    tok = TextTokenizer.load(out)
    assert tok.vocab.text_size == 600
    assert main(["tokenizer", "train", "text_spm", f"corpus={tmp_path / 'missing.jsonl'}", f"out={out}"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_generate_prints_and_writes(ckpt, tmp_path, capsys):
    out_file = tmp_path / "out.txt"
    assert main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "6", "-o", str(out_file),
                 "The", "history"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert out_file.read_text(encoding="utf-8").rstrip("\n") == printed
    assert main(["generate", "--ckpt", str(ckpt), "--max-new-tokens", "6", "--stream", "The", "history"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == printed


def test_generate_bad_input(ckpt, tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "nope"), "hi"]) == 1
    assert "checkpoint directory not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    assert main(["generate", "--ckpt", str(broken), "hi"]) == 1
    assert "model.safetensors is missing" in capsys.readouterr().err
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:1000])
    assert main(["generate", "--ckpt", str(broken), "hi"]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "model.safetensors" in err
    assert main(["generate", "--ckpt", str(ckpt), "word " * 200]) == 1
    err = capsys.readouterr().err.strip()
    assert "context is 48" in err and len(err.splitlines()) == 1


def test_unknown_recipe_lists_available(capsys):
    assert main(["train", "no/such_recipe"]) == 1
    err = capsys.readouterr().err
    assert "no/such_recipe" in err and "text/tiny" in err


def test_demo_end_to_end_small(tmp_path, capsys, caplog):
    """The demo's real path on small corpora: build them, train a codec and any2any/tiny, score
    every task, show every direction (counted by a progress line), write a report whose links all
    resolve."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="omni.progress")

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--max-docs", "30", "--codec-minutes", "0.02", "--eval-rows", "2",
               "model.size=debug", "train.steps=4", "train.warmup_steps=1", "train.batch_size=4",
               "train.eval_batches=1", "train.progress=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for direction in ("speech -> text", "audio -> audio", "image -> text", "sound -> text", "video -> text",
                      "text -> audio", "text -> text"):
        assert direction in report and direction in printed
    assert any("each direction on a held-out file" in m and "7/7 direction" in m for m in caplog.messages)
    for label in ("asr", "continue", "speak", "image_caption", "sound_caption", "video_caption", "text"):
        assert f"| {label} |" in report
    assert (out / "any2any_tiny" / "model.safetensors").is_file() and "loss.png" in report
    for wav in ("continue_output.wav", "speak_output.wav"):
        assert (out / "media" / wav).stat().st_size > 44
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert len(links) >= 8 and all((out / link).exists() for link in links)


def test_transcribe_caption_and_audio_generation(tmp_path, capsys):
    import json

    import numpy as np
    import soundfile as sf
    import torch

    from omni.tokenizers.audio import AudioCodec
    from omni.vocab import Vocab

    tok = TextTokenizer.train([d["text"] for d in wiki_documents()[:200]], vocab_size=800)
    torch.manual_seed(0)
    codec = AudioCodec("debug")
    vocab = Vocab(tok.vocab.text_size, tok.vocab.specials, codec.num_codebooks, codec.cardinality)
    media = {"audio": {"encoder": {"kind": "whisper_style", "size": "debug"}, "connector": {"kind": "mlp"}}}
    ckpt = Pipeline(build_model(backbone_config("debug", max_seq_len=256), vocab, seed=0, media=media),
                    tokenizer=tok, codec=codec).save_pretrained(tmp_path / "ckpt")
    wav = tmp_path / "speech.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(16000)).astype("float32"), 16000)
    rows = tmp_path / "out.jsonl"
    assert main(["transcribe", "--ckpt", str(ckpt), "--window", "0.5", "--max-new-tokens", "3",
                 "-o", str(rows), str(wav), str(wav)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{wav}\t")
    assert [json.loads(x)["file"] for x in rows.read_text().splitlines()] == [str(wav)] * 2
    assert main(["caption", "--ckpt", str(ckpt), "--max-new-tokens", "3", str(wav)]) == 0
    assert capsys.readouterr().out.startswith(f"{wav}\t")
    assert main(["transcribe", "--ckpt", str(ckpt), "--num-beams", "2", "--max-new-tokens", "3",
                 str(wav)]) == 0
    assert capsys.readouterr().out.startswith(f"{wav}\t")
    assert main(["transcribe", "--ckpt", str(ckpt), "--num-beams", "2", "--ctc-weight", "0.5", str(wav)]) == 1
    assert "CTC head" in capsys.readouterr().err  # this checkpoint has none
    assert main(["transcribe", "--ckpt", str(ckpt), str(tmp_path / "photo.png")]) == 1
    assert "not an audio file" in capsys.readouterr().err
    out, clip = tmp_path / "cont.wav", tmp_path / "clip.ogg"
    # 50 codec frames
    sf.write(clip, (0.1 * np.random.default_rng(1).standard_normal(800)).astype("float32"), 16000)
    assert main(["generate", "--ckpt", str(ckpt), "--output", "audio", "--max-seconds", "0.01",
                 "--temperature", "0.9", "--seed", "0", "-o", str(out), "Continue:", str(clip)]) == 0
    assert "wrote" in capsys.readouterr().out and sf.info(str(out)).samplerate == 16000
    assert main(["generate", "--ckpt", str(ckpt), "--output", "audio", "Continue:", str(wav)]) == 1
    assert "needs -o FILE.wav" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(ckpt), "Describe:", str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav" in capsys.readouterr().err


def test_the_demo_report_leads_a_transcript_with_wer_and_a_caption_with_cider():
    assert headline("caption", {"wer": 0.25, "cider_d": 4.0}) == "WER 0.250"
    assert headline("caption", {"cider_d": 0.5, "bleu4": 0.1}) == "CIDEr-D 0.500"
    assert headline("continue", {"code_accuracy": 0.2, "unigram_code_accuracy": 0.1}) == \
        "next-code accuracy 0.200 (unigram 0.100)"


def test_transcribe_reports_each_bad_file_and_transcribes_the_rest(tmp_path, capsys):
    import json
    import struct

    import numpy as np
    import soundfile as sf

    tok = TextTokenizer.train([d["text"] for d in wiki_documents()[:200]], vocab_size=800)
    media = {"audio": {"encoder": {"kind": "whisper_style", "size": "debug"}, "connector": {"kind": "mlp"}}}
    ckpt = Pipeline(build_model(backbone_config("debug", max_seq_len=128), tok.vocab, seed=0,
                       media=media), tokenizer=tok).save_pretrained(tmp_path / "ckpt")
    good = tmp_path / "good.wav"
    sf.write(good, (0.1 * np.random.default_rng(0).standard_normal(8000)).astype("float32"), 16000)
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC but nothing else" * 10)
    odd_rate = tmp_path / "odd_rate.wav"
    data = bytearray(good.read_bytes())
    data[24:32] = struct.pack("<II", 9_999_991, 2 * 9_999_991)
    odd_rate.write_bytes(bytes(data))
    missing = tmp_path / "missing.wav"
    rows = tmp_path / "out.jsonl"
    files = [good, missing, corrupt, odd_rate, good]
    assert main(["transcribe", "--ckpt", str(ckpt), "--max-new-tokens", "2", "-o", str(rows),
                 *map(str, files)]) == 1
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good), str(good)]
    errors = [line for line in err.splitlines() if "\tERROR: " in line]
    assert errors == [f"{missing}\tERROR: file not found",
                      f"{corrupt}\tERROR: " + errors[1].split("ERROR: ")[1],
                      f"{odd_rate}\tERROR: sample rate 9999991 Hz is outside the supported 1000-384000 Hz"]
    assert "not a readable audio file" in errors[1]
    assert "3 of 5 files failed" in err
    written = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [r["file"] for r in written] == list(map(str, files))
    assert ["error" in r for r in written] == [False, True, True, True, False]
    assert (written[1] == {"file": str(missing), "error": "file not found"}
            and isinstance(written[0]["text"], str))
    assert main(["transcribe", "--ckpt", str(ckpt), "--max-new-tokens", "2", str(good)]) == 0  # all good: 0


def test_a_second_writer_of_a_folder_gets_a_one_line_error_naming_the_first(tmp_path, capsys,
                                                                            lock_held_elsewhere):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"Paragraph number {i} about things." for i in range(50)), encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, wiki_documents()[:150])
    with lock_held_elsewhere(tmp_path / "d", "text corpus") as pid:
        assert main(["data", "build", "text", "--out", str(tmp_path / "d"), "--source", str(src)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"(pid {pid} " in err and err.startswith("omni data: error:")
    with lock_held_elsewhere(tmp_path / "tok", "tokenizer") as pid:
        assert main(["tokenizer", "train", "text_spm", f"corpus={corpus}", f"out={tmp_path / 'tok'}",
                     "vocab_size=600"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"(pid {pid} " in err
    assert not (tmp_path / "d" / "train.jsonl").exists() and not any((tmp_path / "tok").glob("*.model"))


def test_a_recipe_whose_tokenizer_cannot_be_trained_on_its_data_says_what_to_run_first(tmp_path, capsys,
                                                                                       monkeypatch):
    """A fresh tree (no text corpus, no tokenizer): videollama/caption_tiny would train text_spm's 4,096
    pieces on its 20 captions. One line naming the corpus size and the command to run first."""
    monkeypatch.chdir(tmp_path)
    captions = [f"a red truck moves {d} quickly" for d in ("left", "right", "up", "down")] * 5
    for split in ("train", "val"):
        write_jsonl(tmp_path / "data" / "video" / f"{split}.jsonl",
                    [{"video": f"{i}.mp4", "caption": c} for i, c in enumerate(captions)])
    assert main(["train", "videollama/caption_tiny", "train.steps=2", "train.warmup_steps=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trainer_interface" not in err
    assert "vocab_size=4096 is too large for a corpus of 20 sentences" in err
    assert ("`omni data build text --out data/text`, then `omni tokenizer train text_spm "
            "out=runs/tokenizers/text_spm`") in err


def test_generate_transcribe_caption_and_eval_each_have_their_own_description():
    subs = dict(_subparsers(build_parser()))
    for name in ("generate", "transcribe", "caption", "eval"):
        assert len(subs[name].description or "") > 80, f"omni {name} --help has no description"
    assert subs["transcribe"].description != subs["caption"].description
    assert "audio" in subs["transcribe"].description and "image" in subs["caption"].description


def test_data_build_text_says_wrote_once(tmp_path, capsys, caplog):
    import logging

    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"Paragraph number {i} about things." for i in range(50)), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main(["data", "build", "text", "--out", str(tmp_path / "d"), "--source", str(src)]) == 0
    out, err = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert (out + err + "\n".join(logged)).count("wrote") == 1


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """text/tiny trained for 4 steps through the CLI (debug size), logging every 2nd step."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("text_run")
    docs = wiki_documents()[:120]
    write_jsonl(root / "data" / "train.jsonl", docs[:100])
    write_jsonl(root / "data" / "val.jsonl", docs[100:110])
    write_jsonl(root / "data" / "test.jsonl", docs[110:])
    TextTokenizer.train([d["text"] for d in docs], vocab_size=600).save(root / "tok")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "text/tiny", "model.size=debug", "model.max_seq_len=64", "data.seq_len=64",
                     f"data.path={root / 'data'}", f"tokenizer.path={root / 'tok'}",
                     f"train.out_dir={root / 'run'}",
                     "train.steps=4", "train.warmup_steps=1", "train.batch_size=2", "train.log_every=2",
                     "train.eval_every=4", "train.eval_batches=1", "train.progress=false"]) == 0
    return root / "run", out.getvalue()


def test_the_end_of_run_line_and_the_model_card_give_the_same_logged_losses(text_run):
    run, printed = text_run
    card = (run / "README.md").read_text()
    span = re.search(r"train loss (.+\(step 2\) -> .+\(step 4\))", card)
    assert span, card
    assert f"loss {span[1]}, val loss" in printed


def test_eval_prints_a_headline_per_task_and_the_json_only_when_asked(text_run, capsys):
    import json

    run, _ = text_run
    assert main(["eval", "--ckpt", str(run), "--max-rows", "4"]) == 0
    out, _ = capsys.readouterr()
    assert re.fullmatch(r"text: perplexity [\d.]+ \(4 rows\)\n", out), out
    written = json.loads((run / "eval_test.json").read_text())
    assert written["rows"] == 4 and written["label"] == "text"
    assert main(["eval", "--ckpt", str(run), "--max-rows", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((run / "eval_test.json").read_text()) and "text: perplexity" in err
    assert main(["eval", "--ckpt", str(run)]) == 0
    assert "(10 rows)" in capsys.readouterr().out


def test_data_build_speech_max_docs_is_a_quick_look(tmp_path, capsys):
    assert main(["data", "build", "speech", "--out", str(tmp_path / "speech"), "--max-docs", "8"]) == 0
    assert '{"train": 8, "val": 4, "test": 4, "test_piper": 2}' in capsys.readouterr().out
