"""Fine-tuning an imported Whisper through ``omni train`` (recipes/whisper/finetune_*.yaml):
``model.pretrained`` takes the encoder, identity connector, 30-s window, cross-attention decoder,
learned positions and WhisperTokenizer from the checkpoint; the recipe's media options add to it;
samples are laid out in Whisper's prompt; the run folder loads and transcribes again."""


import pytest
import torch

import omni
from omni.config import load_recipe
from omni.media.audio import Audio
from omni.tokenizers.whisper import WhisperTokenizer
from omni.train.loop import Trainer, train


def _recipe(tmp_path, ckpt, data, extra=""):
    f = tmp_path / "recipe.yaml"
    f.write_text(f"model:\n  pretrained: {ckpt}\n  media:\n    audio:\n"
                 f"      spec_augment: {{freq_masks: 1, freq_width: 4, time_masks: 1, time_width: 0.02}}\n"
                 f"data: {{task: caption, media: audio, target: text, path: {data}, seq_len: 24}}\n"
                 f"train: {{out_dir: {tmp_path / 'run'}, steps: 6, batch_size: 2, lr: 3.0e-3,"
                 f" warmup_steps: 1, eval_every: 6, eval_batches: 1, save_every: 6, log_every: 1,"
                 f" progress: false{extra}}}\n")
    return f


def test_pretrained_whisper_sets_up_from_its_checkpoint(tmp_path, whisper_ckpt, tone_speech):
    cfg = load_recipe(str(_recipe(tmp_path, whisper_ckpt, tone_speech)), [])
    trainer = Trainer(cfg)
    with trainer.run_folder():
        trainer.setup()
    model, proc = trainer.inner, trainer.processor
    assert isinstance(proc.tokenizer, WhisperTokenizer)
    audio = model.config.media["audio"]
    assert audio["encoder"]["kind"] == "whisper_style" and audio["connector"] == {"kind": "identity"}
    assert audio["pad_to_s"] == 30.0 and audio["spec_augment"]["freq_width"] == 4  # the recipe's, added
    backbone = model.backbone.config
    assert backbone.positions == "learned" and backbone.cross_attention["every"] == 1
    base = omni.load(whisper_ckpt).model.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


@pytest.mark.slow
def test_pretrained_whisper_trains_saves_and_transcribes(tmp_path, whisper_ckpt, tone_speech):
    cfg = load_recipe(str(_recipe(tmp_path, whisper_ckpt, tone_speech, ", trainable: [backbone, embed]")), [])
    result = train(cfg)
    assert result.final_loss < result.first_loss
    before = omni.load(whisper_ckpt).model.state_dict()
    pipe = omni.load(result.out_dir)
    after = pipe.model.state_dict()
    enc = [k for k in before if k.startswith("encoders.audio")]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)  # the encoder was frozen
    qkv = "backbone.layers.0.attn.wqkv.weight"
    assert not torch.equal(before[qkv], after[qkv])  # the decoder trained
    assert isinstance(pipe.tokenizer, WhisperTokenizer)
    assert pipe.model.config.backbone.extra.get("imported_from") == "whisper"  # omni transcribe takes it
    text = pipe.generate([Audio(tone_speech / "0.wav")], max_new_tokens=8)
    assert isinstance(text, str)


def test_pretrained_whisper_with_lora_trains_adapters_of_its_decoder(tmp_path, whisper_ckpt, tone_speech):
    lora = (", lora: {r: 4, alpha: 8, targets: [backbone.layers.*.attn.wqkv, backbone.layers.*.ffn.w1,"
            " backbone.cross.*.attn.wq]}")
    cfg = load_recipe(str(_recipe(tmp_path, whisper_ckpt, tone_speech, lora)), [])
    trainer = Trainer(cfg)
    with trainer.run_folder():
        trainer.setup()
    trained = {n for n, p in trainer.inner.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(".cross." in n for n in trained) and any("ffn.w1" in n for n in trained)


def test_default_lora_targets_take_whispers_gelu_mlp(whisper_ckpt):
    """The default train.lora targets name both MLP layouts (SwiGLU's w13, GELU's w1) and take
    whichever the model has; a pattern a recipe names itself must still match."""
    from omni.model.lora import LoraSpec, add_lora

    model = omni.load(whisper_ckpt).model
    add_lora(model, LoraSpec(r=2))
    trained = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"backbone.layers.0.ffn.w1", "backbone.layers.0.ffn.w2", "backbone.layers.0.attn.wqkv"} <= trained
    with pytest.raises(ValueError, match="'backbone.layers.*.ffn.w13' names no module"):
        add_lora(omni.load(whisper_ckpt).model, LoraSpec(r=2, targets=["backbone.layers.*.ffn.w13"]))
