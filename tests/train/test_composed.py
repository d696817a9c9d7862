"""Models composed of pretrained parts (issue 27): an imported language model (``model.pretrained``)
reads a frozen pretrained tower through a new connector, and only the connector and LoRA adapters
on the language model train; the tower's features are computed once per sample.

- recipes/speechllm/* (SLAM-ASR / Qwen2-Audio): a Whisper encoder (``encoder.path``).
- recipes/llava/smollm_dino_* (LLaVA-1.5's two stages): a DINOv2 tower (``tokenizer.path``); stage
  1 trains the projector, stage 2 starts from it and adds LoRA."""


import pytest
import torch

import omni
from omni.config import load_recipe
from omni.eval import score_split
from omni.media.audio import Audio
from omni.train.loop import Trainer, read_metrics, train


@pytest.fixture(scope="module")
def parts(tmp_path_factory, write_gguf, whisper_ckpt):
    """(language model, Whisper) omni checkpoint folders: a tiny random llama GGUF and a tiny random
    Whisper, each imported and saved as ``omni import`` would."""
    root = tmp_path_factory.mktemp("parts")
    omni.import_hf(write_gguf(root / "lm.gguf")).save_pretrained(root / "lm")
    return root / "lm", whisper_ckpt


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


def test_only_the_connector_and_lora_train_over_frozen_pretrained_parts(tmp_path, parts, tone_speech):
    cfg = load_recipe(str(_recipe(tmp_path, parts, tone_speech)), [])
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


def test_speech_llm_trains_saves_and_transcribes(tmp_path, parts, tone_speech):
    result = train(load_recipe(str(_recipe(tmp_path, parts, tone_speech)), []))
    assert result.final_loss < result.first_loss
    pipe = omni.load(result.out_dir)
    assert pipe.tokenizer.family == "BPE"  # the language model's own tokenizer
    assert isinstance(pipe.generate([Audio(tone_speech / "0.wav"), "Transcribe."], max_new_tokens=6), str)


def test_speech_llm_ctc_stage_trains_the_connector_alone_then_the_joint_stage_starts_from_it(
        tmp_path, parts, tone_speech):
    """recipes/speechllm/smollm_whisper_ctc_tiny then smollm_whisper_tiny: ``train.loss=aux`` trains the
    connector (and CTC scale) on CTC against the LM's embeddings, the LM untouched and never run; its
    loss and validation loss are the CTC's. Stage 2 takes its connector (``train.init_from``)."""
    ctc = ["model.media.audio.ctc_weight=1.0", "model.media.audio.ctc_on=connector"]
    recipe = str(_recipe(tmp_path, parts, tone_speech))
    stage1 = tmp_path / "ctc"
    with pytest.raises(ValueError, match="train.loss=aux"):
        train(load_recipe(recipe, ["train.loss=aux", f"train.out_dir={tmp_path / 'none'}"]))
    one = train(load_recipe(recipe, [*ctc, "train.loss=aux", "train.lora=null", "train.steps=12",
                                     "train.eval_every=12", "train.trainable=[connector,ctc_scale]",
                                     f"train.out_dir={stage1}"]))
    assert one.final_loss < one.first_loss
    metrics = read_metrics(stage1 / "metrics.jsonl")
    assert [r["val_loss"] for r in metrics if "val_loss" in r] and not any("aux_loss" in r for r in metrics)
    weights = omni.load(stage1).model.state_dict()
    base = omni.load(parts[0]).model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in base.items())  # the LM did not move
    trainer = Trainer(load_recipe(recipe, [*ctc, f"train.init_from={stage1}"]))
    with trainer.run_folder():
        trainer.setup()
    connector = [k for k in weights if ".connector." in k or k.endswith("ctc_scale")]
    state = trainer.inner.state_dict()
    assert len(connector) > 1 and all(torch.equal(state[k], weights[k]) for k in connector)
    assert not trainer.inner.aux_only


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny random transformers DINOv2 folder, as ``omni import dinov2`` writes one."""
    from transformers import Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=28, patch_size=14)).save_pretrained(out)
    return out


def _llava(tmp_path, lm, dino, images, stage, overrides=()):
    f = tmp_path / f"stage{stage}.yaml"
    extra = (f"init_from: {tmp_path / 'stage1'}, lora: {{r: 4, alpha: 8}}," if stage == 2 else "")
    f.write_text(f"""
model:
  pretrained: {lm}
  media:
    image:
      tokenizer: {{kind: dinov2, path: {dino}, freeze: true, precompute: true, image_size: 28, merge: 2}}
      connector: {{kind: mlp}}
data: {{task: caption, media: image, target: caption, prompt: Describe it., path: {images}, seq_len: 96}}
train: {{out_dir: {tmp_path / f'stage{stage}'}, steps: 6, batch_size: 2, lr: 3.0e-3, warmup_steps: 1,
        eval_every: 6, eval_batches: 1, save_every: 6, log_every: 1, progress: false,
        trainable: [connector], {extra}}}
""")
    return load_recipe(str(f), list(overrides))


def test_llava_stages_on_a_pretrained_lm_and_dinov2(tmp_path, parts, dino, fake_stamps):
    from omni.data.images import build_images_corpus

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    lm = parts[0]
    one = train(_llava(tmp_path, lm, dino, images, 1))
    stage1 = omni.load(one.out_dir).model.state_dict()
    base = omni.load(lm).model.state_dict()
    assert all(torch.equal(stage1[k], v) for k, v in base.items())  # stage 1: the LM did not move
    fresh = Trainer(_llava(tmp_path, lm, dino, images, 1, [f"train.out_dir={tmp_path / 'fresh'}"]))
    with fresh.run_folder():
        fresh.setup()  # the same seed: the projector as stage 1 started it
    connector = [k for k in stage1 if ".connector." in k]
    assert connector and not any(torch.equal(fresh.inner.state_dict()[k], stage1[k]) for k in connector)
    trainer = Trainer(_llava(tmp_path, lm, dino, images, 2))
    with trainer.run_folder():
        trainer.setup()
    model = trainer.inner
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".connector." in n for n in trained) and any("lora_" in n for n in trained)
    assert all(torch.equal(model.state_dict()[k], stage1[k]) for k in connector)  # from stage 1
    # stage 2 keeps its best weights by validation CIDEr-D, stage 1's (its start) among them
    metric = "caption:image.cider_d"
    two = train(_llava(tmp_path, lm, dino, images, 2, ["train.export=best", f"train.best_metric={metric}",
                                                       "train.eval_at_start=true"]), score=score_split)
    rows = read_metrics(two.out_dir / "metrics.jsonl")
    assert rows[0]["resumed_from"] is None
    assert [r["step"] for r in rows if f"val_{metric}" in r] == [0, 6]
    assert [r["step"] for r in rows if r.get("event") == "exported"] in ([0], [6])
    pipe = omni.load(two.out_dir)  # multi-image, multi-turn chat over the composed model
    png = sorted(images.rglob("*.png"))
    reply = pipe.generate([{"role": "user", "content": [omni.Image(png[0]), "What is this?"]},
                           {"role": "assistant", "content": "A stamp."},
                           {"role": "user", "content": [omni.Image(png[1]), "And this one?"]}],
                          max_new_tokens=4)
    assert isinstance(reply, str)


def test_any2any_small_trains_its_seven_tasks_on_stand_in_parts(tmp_path, parts, dino, fake_stamps,
                                                                 tone_speech, tiny_corpus):
    """recipes/any2any/small.yaml as shipped, its checkpoints and corpora replaced by tiny stand-ins
    (CI has no real weights): the LM's vocabulary grows by the codec's code ids, the connectors,
    LoRA adapters and the code rows train while the text rows and the towers stay, and every
    task of the mixture is scored."""
    import yaml

    from omni.config import find_recipe, read_yaml
    from omni.data.images import build_images_corpus
    from omni.data.video import build_video_corpus
    from omni.eval import evaluate
    from omni.tokenizers.audio import AudioCodec

    lm, whisper = parts
    raw = read_yaml(find_recipe("any2any/small"))
    media = raw["model"]["media"]
    raw["model"]["pretrained"] = str(lm)
    media["audio"]["encoder"]["path"] = str(whisper)
    for modality in ("image", "video"):
        media[modality]["tokenizer"].update(path=str(dino), image_size=28)
    torch.manual_seed(0)
    codec = AudioCodec("debug")
    raw["codec"]["path"] = str(codec.save(tmp_path / "codec"))
    build_images_corpus(tmp_path / "images", stamps_dir=fake_stamps, max_size=48, val_fraction=0.0,
                        test_fraction=0.0)
    build_video_corpus(tmp_path / "video", stamps_dir=fake_stamps, size=32, fps=4.0, duration=1.0,
                       with_audio=False)
    for corpus in ("images", "video"):
        train_rows = (tmp_path / corpus / "train.jsonl").read_text()
        for split in ("val", "test"):
            (tmp_path / corpus / f"{split}.jsonl").write_text(train_rows)
    (tiny_corpus / "test.jsonl").exists() or (tiny_corpus / "test.jsonl").write_text(
        (tiny_corpus / "val.jsonl").read_text())
    stand_in = {"data/speech": tone_speech, "data/sounds": tone_speech, "data/images": tmp_path / "images",
                "data/video": tmp_path / "video", "data/text": tiny_corpus}
    for part in raw["data"]["mixture"]:
        part["path"] = str(stand_in[part["path"]])
    raw["data"].update(seq_len=128, cache_dir=str(tmp_path / "cache"))
    raw["train"].update(out_dir=str(tmp_path / "run"), steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                        eval_batches=1, save_every=3, log_every=1, progress=False, lr=1.0e-2)
    f = tmp_path / "small.yaml"
    f.write_text(yaml.safe_dump(raw))
    result = train(load_recipe(str(f)))

    model = omni.load(result.out_dir).model
    base = omni.load(lm).model.state_dict()
    text_size = base["embed.weight"].shape[0]
    assert model.vocab.text_size == text_size and model.vocab.num_codebooks == codec.num_codebooks
    embed = model.state_dict()["embed.weight"]
    assert torch.equal(embed[:text_size], base["embed.weight"])  # the text rows did not move
    codes = embed[text_size:]
    assert not torch.allclose(codes, base["embed.weight"].mean(0).expand_as(codes))  # the code rows trained
    tower = omni.load(whisper).model.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tower.items()
               if k.startswith("encoders.audio.encoder."))
    scores = evaluate(result.out_dir, split="test", max_rows=1, max_new_tokens=2, examples=0)["tasks"]
    assert set(scores) == {"asr", "continue", "speak", "image_caption", "sound_caption", "video_caption",
                           "text"}
