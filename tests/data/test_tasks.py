"""Task datasets with media: image/video/audio captioning rows through encoders, slots and collate,
bad rows skipped and counted, and a captioning recipe trained through the CLI and used through
the API after loading."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import omni
from omni.data.images import build_images_corpus
from omni.data.tasks import TaskDataset, TaskSpec, collate
from omni.data.video import build_video_corpus
from omni.io import write_jsonl
from omni.model.backbone import backbone_config, default_mrope_section
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline

IMAGE_MEDIA = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                         "connector": {"kind": "mlp"}}}


def _model(tok, media, mrope=True):
    cfg = backbone_config("debug", max_seq_len=128)
    if mrope:
        cfg.mrope_section = default_mrope_section(cfg.head_dim)
    return Pipeline(build_model(cfg, tok.vocab, seed=0, media=media), tokenizer=tok)


@pytest.fixture
def images(fake_stamps, tmp_path):
    build_images_corpus(tmp_path / "images", stamps_dir=fake_stamps, max_size=48, val_fraction=0.0,
                        test_fraction=0.0)
    return tmp_path / "images"


def test_caption_rows_render_with_image_slots(images, text_tokenizer):
    model = _model(text_tokenizer, IMAGE_MEDIA)
    ds = TaskDataset(images / "train.jsonl", TaskSpec("caption", "image", "caption", "Caption:"),
                     model, seq_len=64)
    assert ds.num_bad == 0 and ds.num_docs >= 4
    batch = collate([ds[i] for i in range(len(ds))], mrope=True)
    assert batch["positions"].shape == (3, len(ds), 64)
    feat = text_tokenizer.vocab.id("<|feat|>")
    for row, slot in batch["media"]:
        assert slot.length == 4 and (batch["input_ids"][row, slot.start:slot.start + 4] == feat).all()
        # a 2x2 grid: time constant, height/width vary (M-RoPE)
        p = batch["positions"][:, row, slot.start:slot.start + 4]
        assert p[0].unique().numel() == 1 and p[1].unique().numel() == 2 and p[2].unique().numel() == 2
    assert (batch["input_ids"] == feat).sum() == 4 * len(batch["media"])
    out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                doc_ids=batch["doc_ids"], media=batch["media"])
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()  # gradients reach the vision tower through the connector
    assert model.encoders["image"].tokenizer.tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_bad_media_rows_are_skipped_and_counted(images, tmp_path, text_tokenizer):
    rows = [json.loads(x) for x in (images / "train.jsonl").read_text().splitlines()][:2]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [{"image": str(tmp_path / "broken.png"), "caption": "x"}, {"image": str(tmp_path / "missing.png"),
                                                                      "caption": "y"},
           {"image": str(images / rows[0]["image"]), "caption": ""}]
    m = tmp_path / "train.jsonl"
    write_jsonl(m, [{**r, "image": str(images / r["image"])} for r in rows] + bad)
    model = _model(text_tokenizer, IMAGE_MEDIA)
    ds = TaskDataset(m, TaskSpec("caption", "image", "caption"), model, seq_len=64)
    assert ds.num_docs == 2 and ds.num_bad == 3
    with pytest.raises(ValueError, match=r"row 3: .*broken.png"):
        TaskDataset(m, TaskSpec("caption", "image", "caption"), model, seq_len=64,
                    on_bad_sample="error")


def test_video_and_audio_rows(fake_stamps, tmp_path, text_tokenizer):
    build_video_corpus(tmp_path / "video", stamps_dir=fake_stamps, size=32, fps=4.0,
                       duration=1.0, with_audio=False)
    media = {"video": {"tokenizer": {"kind": "patchify", "size": "debug", "image_size": 32, "patch_size": 16},
                       "video": {"num_frames": 4}, "connector": {"kind": "linear"}},
             "audio": {"encoder": {"kind": "whisper_style", "size": "tiny"}, "connector": {"kind": "mlp"}}}
    model = _model(text_tokenizer, media)
    ds = TaskDataset(tmp_path / "video" / "train.jsonl", TaskSpec("caption", "video", "caption"),
                     model, seq_len=64)
    (row, slot) = collate([ds[0]], mrope=True)["media"][0]
    assert slot.data.shape[0] == 4 and slot.length == 4 * 2 * 2
    # a window: the data section's start, a row's own end (which wins over the section's)
    rows = [json.loads(line) for line in (tmp_path / "video" / "train.jsonl").read_text().splitlines()][:1]
    write_jsonl(tmp_path / "video" / "cut.jsonl", [{**rows[0], "end": 0.75}])
    spec = TaskSpec("caption", "video", "caption", start=0.25, end=0.5)
    ds = TaskDataset(tmp_path / "video" / "cut.jsonl", spec,
                     model, seq_len=64)
    (row, slot) = collate([ds[0]], mrope=True)["media"][0]
    assert slot.data.shape[0] == 2  # frames at 0.25 and 0.5 s of the 4-fps clip (the section alone: 1)
    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 8000)  # 1 s at 8 kHz
    write_jsonl(tmp_path / "asr.jsonl", [{"audio": "a.wav", "text": "turn on the light"}])
    ds = TaskDataset(tmp_path / "asr.jsonl", TaskSpec("caption", "audio", "text", "Transcribe."),
                     model, seq_len=128)
    batch = collate([ds[0]], mrope=True)
    (_, slot), = batch["media"]
    assert slot.data.shape == (80, 100) and slot.length == 50  # 16 kHz log-mel, conv stride 2
    out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                media=batch["media"])
    assert torch.isfinite(out.loss)


def test_caption_recipe_trains_through_the_cli_and_answers_through_the_api(images, text_tokenizer, tmp_path):
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())  # 6 stamps: validate on train
    tok_dir = tmp_path / "tok"
    text_tokenizer.save(tok_dir)
    out = tmp_path / "run"
    args = ["model.size=debug", "model.max_seq_len=64", "data.seq_len=64", f"data.path={images}",
            f"tokenizer.path={tok_dir}", f"train.out_dir={out}", "train.steps=25", "train.warmup_steps=2",
            "train.batch_size=4", "train.eval_every=25", "train.eval_batches=1", "train.log_every=1",
            "train.progress=false", "model.media.image.tokenizer.size=debug",
            "model.media.image.tokenizer.image_size=32"]
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "llava/caption_tiny", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0] - 1.0
    model = omni.load(out)
    assert set(model.encoders) == {"image"}
    rows = [json.loads(x) for x in (images / "train.jsonl").read_text().splitlines()]
    img = omni.Image(images / rows[0]["image"])
    one = model.generate([img, "Caption:"], max_new_tokens=6)
    both = model.generate([[img, "Caption:"], [omni.Image(images / rows[1]["image"]), "Caption:"]],
                          max_new_tokens=6)
    assert isinstance(one, str) and both[0] == one  # a batch (left padded, 3-D positions) matches one prompt
    with pytest.raises(ValueError, match="cannot read audio; it reads: text, image"):
        model.generate([omni.Audio(torch.zeros(1600), sample_rate=16000), "Caption:"])
    r = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--ckpt", str(out), "--split", "train"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "eval_train.json").read_text())
    assert metrics["rows"] == len(rows) and 0 <= metrics["bleu4"] <= 1 and metrics["cider_d"] >= 0


def test_continuation_recipe_trains_and_evaluates_against_a_unigram_model(tmp_path, text_tokenizer):
    from omni.eval import evaluate
    from omni.tokenizers.audio import AudioCodec

    torch.manual_seed(0)
    AudioCodec("debug").save(tmp_path / "codec")  # 1 kHz frames x 2 codebooks of 32
    rng = np.random.default_rng(0)
    t = np.arange(960) / 16000
    rows = []
    for i in range(6):
        sf.write(tmp_path / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)
                                         + 0.01 * rng.standard_normal(960)).astype(np.float32), 16000)
        rows.append({"audio": f"{i}.wav"})
    write_jsonl(tmp_path / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "val.jsonl", rows[4:])
    text_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "run"
    args = ["model.size=debug", "model.max_seq_len=96", "data.seq_len=96", f"data.path={tmp_path}",
            "data.max_audio_s=0.05", f"tokenizer.path={tmp_path / 'tok'}", f"codec.path={tmp_path / 'codec'}",
            f"train.out_dir={out}", "train.steps=30", "train.warmup_steps=2", "train.batch_size=4",
            "train.lr=3e-3", "train.eval_every=30", "train.eval_batches=1", "train.log_every=1",
            "train.progress=false"]
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "audiolm/continue_tiny", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    m = evaluate(out, split="val", examples=1)
    assert m["codes"] == 2 * 2 * 50 and 0 <= m["code_accuracy"] <= 1 and m["unigram_code_loss"] > 0
    assert len(m["code_accuracy_per_codebook"]) == 2
    assert m["code_loss"] < m["unigram_code_loss"]  # 30 steps on pure tones already beat code frequencies
    (example,) = m["examples"]
    cont = omni.Audio(example)
    assert cont.sample_rate == 16000 and cont.duration > omni.Audio(tmp_path / "4.wav").duration


def test_multi_image_multi_turn_dialogue_renders_trains_and_generates(text_tokenizer):
    """GLM-4V-style dialogue: several images over several user/assistant turns in one sample."""
    from omni.sequence import IGNORE, Message, Sample, Segment, pack, render

    def solid(rgb):
        return omni.Image(torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).clone())

    red, blue, green = solid([255, 0, 0]), solid([0, 0, 255]), solid([0, 255, 0])
    model = _model(text_tokenizer, IMAGE_MEDIA)
    conversation = [{"role": "user", "content": [red, blue, "Which one is red?"]},
                    {"role": "assistant", "content": "The first one."},
                    {"role": "user", "content": [green, "And this one?"]},
                    {"role": "assistant", "content": "It is green."}]
    prompt = model.processor.sample(conversation[:3])
    assert [m.role for m in prompt.messages] == ["user", "assistant", "user"]
    sample = Sample(prompt.messages + [Message("assistant", [Segment(text="It is green.")])])
    full = render(sample, text_tokenizer, vocab=model.vocab, mrope=True)
    assert [s.length for s in full.media] == [4, 4, 4]
    scored = text_tokenizer.decode(full.targets[full.targets != IGNORE].tolist())
    # assistant turns only
    assert "The first one." in scored and "It is green." in scored and "Which" not in scored
    batch = collate([pack([full], 128, model.vocab.pad_id)[0]], mrope=True)
    assert len(batch["media"]) == 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                    doc_ids=batch["doc_ids"], media=batch["media"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.05 * losses[0]
    answer = model.eval().generate(conversation[:3], max_new_tokens=8)
    assert answer.strip() == "It is green."
    with pytest.raises(ValueError, match="must end with a user turn"):
        model.generate(conversation, max_new_tokens=2)


def test_fewshot_episodes_bind_made_up_names_and_train_only_the_answer(images, text_tokenizer, tmp_path):
    from omni.data.tasks import episode_names, episodes, prepare_rows

    model = _model(text_tokenizer, IMAGE_MEDIA)
    spec = TaskSpec("fewshot", "image", prompt="What is this?", ways=2, episodes=5)
    ds = TaskDataset(images / "train.jsonl", spec, model, seq_len=128)
    # two named images and the query each
    assert ds.num_docs == 5 and sum(len(r.media) for r in ds) == 15
    # training and held-out splits draw their names from disjoint halves
    assert not set(episode_names(False)) & set(episode_names(True))
    media, _ = prepare_rows(images / "train.jsonl", spec, model)
    ep = episodes(media, spec, held_out=True)[0]
    assert ep.answer in ep.names and set(ep.names) <= set(episode_names(True))
    shown = [m.segments[0].data for m in ep.examples]
    assert any(torch.equal(ep.query.segments[0].data, d.flip(-1)) for d in shown)  # the query: mirrored
    from omni.sequence import render

    r = render(ep.sample(), text_tokenizer, **model.render_options())
    trained = text_tokenizer.decode([int(t) for t in r.targets[r.targets >= 0]])
    assert trained.strip() == f"This is a {ep.answer}."  # the loss is on the answer only
    zero = ep.sample(shots=False, answer=False)
    assert len(zero.messages) == 1 and zero.messages[0] is ep.query
    with pytest.raises(ValueError, match="3-way episode needs at least 3 usable rows"):
        episodes(media[:2], TaskSpec("fewshot", "image", ways=3), held_out=False)


@pytest.mark.parametrize("build", ["caption", "pairs", "fewshot"])
def test_a_runtime_or_memory_error_preparing_a_row_skips_that_row(images, tmp_path, text_tokenizer,
                                                                  monkeypatch, caplog, build):
    """A decoder's RuntimeError or a MemoryError on one file is that row being bad, like a MediaError:
    skipped and logged with the file's name, or an error naming it with on_bad_sample=error."""
    import logging
    import shutil

    from omni.data.tasks import PairDataset, prepare_rows

    rows = [json.loads(x) for x in (images / "train.jsonl").read_text().splitlines()][:3]
    for name in ("decoder_bug.png", "huge.png"):
        shutil.copy(images / rows[0]["image"], tmp_path / name)
    m = tmp_path / "train.jsonl"
    write_jsonl(m, [{**r, "image": str(images / r["image"])} for r in rows]
                + [{"image": str(tmp_path / "decoder_bug.png"), "caption": "a bug"},
                   {"image": str(tmp_path / "huge.png"), "caption": "too big"}])
    model = _model(text_tokenizer, IMAGE_MEDIA)
    encoder = model.encoders["image"]
    real = encoder.prepare

    def prepare(path):
        if "decoder_bug" in str(path):
            raise RuntimeError("decoder crashed")
        if "huge" in str(path):
            raise MemoryError()
        return real(path)

    monkeypatch.setattr(encoder, "prepare", prepare)
    spec = TaskSpec("fewshot" if build == "fewshot" else "caption", "image", "caption")

    def run(on_bad_sample):
        if build == "caption":
            return TaskDataset(m, spec, model, seq_len=64,
                               on_bad_sample=on_bad_sample).num_bad
        if build == "pairs":
            return PairDataset(m, spec, model, seq_len=64,
                               on_bad_sample=on_bad_sample).num_bad
        return prepare_rows(m, spec, model, on_bad_sample)[1]

    with caplog.at_level(logging.WARNING, logger="omni.data.tasks"):
        assert run("skip") == 2
    assert "decoder_bug.png" in caplog.text and "RuntimeError: decoder crashed" in caplog.text
    assert "huge.png" in caplog.text and "MemoryError" in caplog.text
    with pytest.raises(ValueError, match=r"row 4: .*decoder_bug.png: RuntimeError: decoder crashed"):
        run("error")


def test_codec_encoding_a_manifest_counts_its_rows_on_a_bar_and_max_rows_keeps_the_first(
        tmp_path, text_tokenizer, capsys):
    """The minutes before an audio recipe's first step are the corpus going through the codec: on a
    terminal they show as a bar of rows, named for that work (issue 30)."""
    from omni.tokenizers.audio import AudioCodec
    from omni.vocab import Vocab

    torch.manual_seed(0)
    codec = AudioCodec("debug")
    v = text_tokenizer.vocab
    vocab = Vocab(v.text_size, v.specials, codec.num_codebooks, codec.cardinality)
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=128), vocab, seed=0),
                     tokenizer=text_tokenizer, codec=codec)
    for i in range(5):
        sf.write(tmp_path / f"{i}.wav", (0.1 * np.sin(np.arange(480) / (3 + i))).astype(np.float32), 16000)
    write_jsonl(tmp_path / "train.jsonl", [{"audio": f"{i}.wav"} for i in range(5)])
    spec = TaskSpec("continue", prompt="Continue:")
    ds = TaskDataset(tmp_path / "train.jsonl", spec, model, seq_len=96, progress=True)
    err = capsys.readouterr().err
    assert ds.num_docs == 5 and f"codec-encoding {tmp_path / 'train.jsonl'}" in err
    assert "5/5" in err and "clip" in err  # what a row of the task is
    first = TaskDataset(tmp_path / "train.jsonl", spec, model, seq_len=96, max_rows=2)
    assert first.num_docs == 2 and capsys.readouterr().err == ""  # no bar unless asked (or on a terminal)
