"""A speech LLM composed of pretrained parts (recipes/speechllm/*, SLAM-ASR / Qwen2-Audio style):
an imported language model (``model.pretrained``) reads a frozen imported Whisper encoder
(``model.media.audio.encoder.path``) through a new connector; only the connector and LoRA adapters
on the language model train, and the frozen encoder's features are computed once per clip."""

import json
import math

import pytest
import torch

import omni
from omni.config import load_recipe
from omni.media.audio import Audio
from omni.train.loop import Trainer, train

WORDS = ("turn on the light", "open the door", "play some music", "what time is it")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, write_gguf, hf_whisper_dir):
    """(language model, Whisper) omni checkpoint folders: a tiny random llama GGUF and a tiny random
    Whisper, each imported and saved as ``omni import`` would."""
    root = tmp_path_factory.mktemp("parts")
    omni.import_hf(write_gguf(root / "lm.gguf")).save_pretrained(root / "lm")
    omni.import_hf(hf_whisper_dir).save_pretrained(root / "whisper")
    return root / "lm", root / "whisper"


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Four tones of different pitch, each 'saying' one transcript."""
    root = tmp_path_factory.mktemp("speech")
    rows = []
    for i, text in enumerate(WORDS):
        t = torch.arange(8000) / 16000
        Audio(0.3 * torch.sin(2 * math.pi * (200 + 150 * i) * t), sample_rate=16000).save(root / f"{i}.wav")
        rows.append({"id": f"u{i}", "audio": f"{i}.wav", "text": text})
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _recipe(tmp_path, parts, data):
    lm, whisper = parts
    f = tmp_path / "recipe.yaml"
    f.write_text(f"""
model:
  pretrained: {lm}
  media:
    audio:
      encoder: {{kind: whisper_style, path: {whisper}, freeze: true, input_mode: slice}}
      precompute: true
      stack: 2
      connector: {{kind: mlp}}
data: {{task: caption, media: audio, target: text, prompt: Transcribe., path: {data}, seq_len: 96}}
train: {{out_dir: {tmp_path / 'run'}, steps: 8, batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 8,
        eval_batches: 1, save_every: 8, log_every: 1, progress: false, trainable: [connector],
        lora: {{r: 4, alpha: 8}}}}
""")
    return f


def test_only_the_connector_and_lora_train_over_frozen_pretrained_parts(tmp_path, parts, speech):
    cfg = load_recipe(str(_recipe(tmp_path, parts, speech)), [])
    trainer = Trainer(cfg)
    with trainer.run_folder():
        trainer.setup()
    model = trainer.inner
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or ".connector." in n for n in trained)
    assert any(".connector." in n for n in trained) and any(n.startswith("backbone.") for n in trained)
    lm = omni.load(parts[0]).model.state_dict()  # the language model's weights came from its import
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lm.items() if k in model.state_dict())
    whisper = omni.load(parts[1]).model.state_dict()
    enc = [k for k in whisper if k.startswith("encoders.audio.encoder.")]
    assert enc and all(torch.equal(model.state_dict()[k], whisper[k]) for k in enc)


def test_speech_llm_trains_saves_and_transcribes(tmp_path, parts, speech):
    result = train(load_recipe(str(_recipe(tmp_path, parts, speech)), []))
    assert result.final_loss < result.first_loss
    pipe = omni.load(result.out_dir)
    assert pipe.tokenizer.family == "BPE"  # the language model's own tokenizer
    assert isinstance(pipe.generate([Audio(speech / "0.wav"), "Transcribe."], max_new_tokens=6), str)
