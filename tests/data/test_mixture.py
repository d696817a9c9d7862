"""A mixture of tasks in one recipe: samples drawn by weight and packed across tasks, one
checkpoint trained through the CLI, scored per task, with a model card; text-to-speech as codes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import omni
from omni.config import load_recipe
from omni.data.tasks import MixtureDataset, TaskSpec, collate
from omni.io import write_jsonl
from omni.pipeline import pipeline_from_recipe

WORDS = ["turn on the light", "what time is it", "open the door", "play some music", "stop", "go left"]


@pytest.fixture
def corpora(tmp_path, tiny_corpus, text_tokenizer):
    """A speech-like corpus (tones with transcripts), the tiny text corpus, a debug codec and a tokenizer."""
    from omni.tokenizers.audio import AudioCodec

    speech = tmp_path / "speech"
    speech.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(1600) / 16000
    rows = []
    for i, text in enumerate(WORDS):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 60 * i) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(speech / f"{i}.wav", wave.astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": f"{i}.wav", "text": text})
    for split in ("train", "val", "test"):
        write_jsonl(speech / f"{split}.jsonl", rows)
    torch.manual_seed(0)
    AudioCodec("debug").save(tmp_path / "codec")
    text_tokenizer.save(tmp_path / "tok")
    recipe = {
        "description": "test mixture",
        "model": {"size": "debug", "max_seq_len": 256, "cross_attention": {"every": 1},
                  "media": {"audio": {"encoder": {"kind": "whisper_style", "size": "debug"},
                                      "connector": {"kind": "mlp"}}}},
        "tokenizer": {"path": str(tmp_path / "tok")},
        "codec": {"path": str(tmp_path / "codec")},
        "data": {"seq_len": 256, "mixture": [
            {"task": "text", "path": str(tiny_corpus), "weight": 1},
            {"task": "caption", "media": "audio", "target": "text", "path": str(speech), "name": "asr",
             "weight": 2, "loss_weight": 3},
            {"task": "speak", "path": str(speech), "prompt": "Say:", "max_audio_s": 0.05, "weight": 1},
            {"task": "continue", "path": str(speech), "prompt": "Continue:", "max_audio_s": 0.05,
             "weight": 1}]},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 30, "warmup_steps": 2, "batch_size": 4,
                  "lr": 3e-3, "eval_every": 30, "eval_batches": 1, "log_every": 1, "progress": False},
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def test_samples_are_drawn_by_weight_and_packed_across_tasks(corpora, text_tokenizer):
    cfg = load_recipe(str(corpora / "mix.yaml"))
    model = pipeline_from_recipe(cfg, text_tokenizer)
    parts = [(p.label, f"{p.path}/train.jsonl", TaskSpec.of(p), p.weight, 3.0 if p.label == "asr" else 1.0)
             for p in cfg.data.mixture]
    ds = MixtureDataset(parts, model, 256, seed=0)
    total = 280 + 3 * len(WORDS)  # the text corpus' documents and three tasks over six clips
    assert ds.counts == {"text": round(total / 5), "asr": round(2 * total / 5), "speak": round(total / 5),
                         "continue": round(total / 5)}
    # text's share (60 of its 280 documents a cycle) goes on through its own stream: five cycles an epoch
    assert ds.cycles == 5 and ds.num_docs == 5 * sum(ds.counts.values())
    batch = collate(list(ds))
    mixed = [r for r in range(len(ds)) if any(row == r for row, _ in batch["media"])
             and (batch["streams"][r] >= 0).any()]
    assert mixed  # a row holding an utterance to transcribe and audio codes to predict
    # asr's loss_weight 3: its documents' positions weigh 3, every other task's 1
    row = mixed[0]
    asr_docs = {int(batch["doc_ids"][row, slot.start]) for r, slot in batch["media"] if r == row}
    in_asr = torch.isin(batch["doc_ids"][row], torch.tensor(sorted(asr_docs)))
    assert ((batch["loss_weights"][row][in_asr] == 3).all()
            and (batch["loss_weights"][row][~in_asr] == 1).all())
    held_out = MixtureDataset(parts, model, 256, weighted=False)
    assert held_out.counts == {"text": 280, "asr": 6, "speak": 6, "continue": 6}
    assert "loss_weights" not in collate(list(held_out))  # held-out losses stay comparable across recipes


def test_a_mixture_recipe_trains_one_checkpoint_scored_per_task(corpora):
    from omni.eval import evaluate

    out = corpora / "run"
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", str(corpora / "mix.yaml")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    m = evaluate(out, split="val", max_rows=2, examples=1, max_new_tokens=6)
    assert set(m["tasks"]) == {"text", "asr", "speak", "continue"}
    assert 0 <= m["tasks"]["asr"]["wer"] and m["tasks"]["text"]["loss"] > 0
    assert all(t["seconds"] >= 0 for t in m["tasks"].values())  # where the scoring time goes
    assert m["tasks"]["speak"]["codes"] > 0 and omni.Audio(m["tasks"]["speak"]["examples"][0]).duration > 0
    assert (out / "eval_val_asr.jsonl").is_file()
    card = (out / "README.md").read_text()
    assert "| asr |" in card and "wer" in card and "cross-attention" in card and "audio codes" in card
    model = omni.load(out)
    spoken = model.generate("Say: open the door", output="audio", max_seconds=0.02, seed=0)
    assert isinstance(spoken, omni.Audio) and spoken.sample_rate == 16000
    with pytest.raises(ValueError, match="no task 'ocr'"):
        evaluate(out, task="ocr")


def test_mixture_config_errors_name_the_entry(corpora):
    with pytest.raises(ValueError, match=r"data.mixture\[1\].task"):
        load_recipe(str(corpora / "mix.yaml"), ["data.mixture=[{task: text}, {task: ocr}]"])
    with pytest.raises(ValueError, match="two tasks labelled 'text'"):
        load_recipe(str(corpora / "mix.yaml"), ["data.mixture=[{task: text}, {task: text}]"])
    with pytest.raises(ValueError, match=r"weight must be > 0"):
        load_recipe(str(corpora / "mix.yaml"), ["data.mixture=[{task: text, weight: 0}]"])
