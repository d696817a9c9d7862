"""Training in stages: what trains (globs over module names), starting from another run's weights,
and LoRA adapters merged into plain weights on save; LLaVA's two stages through the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import omni
from omni.config import LoraSpec, TrainConfig
from omni.io import load_tensors
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.train.stages import add_lora, apply_stages, init_from

IMAGE = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                   "connector": {"kind": "mlp"}}}


def _model(tok, seed=0, **overrides):
    return Pipeline(build_model(backbone_config("debug", max_seq_len=64, **overrides), tok.vocab, seed=seed,
                       media=IMAGE), tokenizer=tok)


def test_trainable_globs_select_modules_at_any_depth(text_tokenizer):
    model = _model(text_tokenizer)
    n = apply_stages(model, TrainConfig(trainable=["connector"]))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("encoders.image.connector.") for name in trained)
    assert n == sum(p.numel() for p in model.encoders["image"].connector.parameters())
    apply_stages(model, TrainConfig(trainable=["backbone.layers.1", "*.attn_norm.weight"]))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert (any(t.startswith("backbone.layers.1.") for t in trained)
            and "backbone.layers.0.attn_norm.weight" in trained)
    assert "backbone.layers.0.attn.wqkv.weight" not in trained
    with pytest.raises(ValueError, match="'projector' matches nothing; module names look like"):
        apply_stages(model, TrainConfig(trainable=["projector"]))


def test_init_from_loads_what_matches_and_names_what_does_not(text_tokenizer, tmp_path):
    src = _model(text_tokenizer, seed=1)
    src.save_pretrained(tmp_path / "src")
    model = _model(text_tokenizer, seed=2)
    report = init_from(model, tmp_path / "src")
    assert report["new"] == 0 and report["unused"] == 0
    for name, t in load_tensors(tmp_path / "src" / "model.safetensors").items():
        assert torch.equal(model.export_state_dict()[name], t)
    # a model with more modules (cross-attention blocks) keeps them new and loads the rest
    bigger = _model(text_tokenizer, cross_attention={"every": 1, "gated": True})
    assert init_from(bigger, tmp_path / "src")["new"] > 0
    with pytest.raises(ValueError, match=r"tensor \S+ has shape .* \(a different size or vocabulary\)"):
        init_from(_model(text_tokenizer, dim=96, num_heads=4, num_kv_heads=2), tmp_path / "src")
    with pytest.raises(ValueError, match="model.safetensors not found"):
        init_from(model, tmp_path / "nowhere")


def test_lora_trains_adapters_only_and_saves_plain_weights(text_tokenizer, tmp_path):
    model = _model(text_tokenizer)
    plain_keys = set(model.export_state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = add_lora(model, LoraSpec(r=4, alpha=8))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained) and n == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.tensor([[text_tokenizer.vocab.bos_id] + text_tokenizer.encode("the cat sat on the mat")])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(ids, targets=targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    merged = model.export_state_dict()
    assert set(merged) == plain_keys  # folded back: the names of a model without adapters
    assert not torch.equal(merged["backbone.layers.0.attn.wqkv.weight"],
                           before["backbone.layers.0.attn.wqkv.weight"])
    assert torch.equal(merged["embed.weight"], before["embed.weight"])  # frozen stays put
    model.eval().save_pretrained(tmp_path / "lora")
    again = omni.load(tmp_path / "lora")
    assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError,
                       match="names backbone.layers.0.attn_norm, a RMSNorm; LoRA wraps nn.Linear"):
        add_lora(_model(text_tokenizer), LoraSpec(targets=["backbone.layers.*.attn_norm"]))
    with pytest.raises(ValueError, match="'wq_proj' names no module"):
        add_lora(_model(text_tokenizer), LoraSpec(targets=["wq_proj"]))


def test_lora_up_projection_gives_the_gradients_of_a_plain_linear():
    """add_lora's B (``_LoraUp``, a faster weight gradient): the output and gradients of the
    nn.Linear peft made, in fp32 and under bf16 autocast."""
    from omni.model.lora import _LoraUp

    torch.manual_seed(0)
    plain = torch.nn.Linear(4, 24, bias=False)
    up = torch.nn.Linear(4, 24, bias=False)
    up.load_state_dict(plain.state_dict())
    up.__class__ = _LoraUp
    x, g = torch.randn(2, 5, 4), torch.randn(2, 5, 24)
    for autocast in (False, True):
        grads = []
        for m in (plain, up):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = m(xi)
            y.backward(g.to(y.dtype))
            grads.append((y.float(), xi.grad, m.weight.grad))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-2 if autocast else 1e-6, rtol=1e-2 if autocast else 1e-6)


def test_llava_two_stages_through_the_cli(tmp_path, text_tokenizer, fake_stamps):
    """Stage 1 trains the image side on a frozen language model; stage 2 starts from stage 1 and
    trains projector and language model. The frozen weights of stage 1 never move."""
    from omni.data.images import build_images_corpus

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    text_tokenizer.save(tmp_path / "tok")
    lm = _model(text_tokenizer, seed=3)
    lm.save_pretrained(tmp_path / "lm")  # stands in for a pre-trained language model run
    common = ["model.size=debug", "model.max_seq_len=64", "data.seq_len=64", f"data.path={images}",
              f"tokenizer.path={tmp_path / 'tok'}", "train.steps=6", "train.warmup_steps=1",
              "train.batch_size=2", "train.eval_every=6", "train.eval_batches=1", "train.progress=false",
              "train.log_every=1", "model.media.image.tokenizer.size=debug",
              "model.media.image.tokenizer.image_size=32"]
    for stage, src in (("stage1", tmp_path / "lm"), ("stage2", tmp_path / "llava_stage1")):
        r = subprocess.run([sys.executable, "-m", "omni.cli", "train", f"llava/{stage}_tiny", *common,
                            f"train.init_from={src}", f"train.out_dir={tmp_path / f'llava_{stage}'}"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    lm_w = load_tensors(tmp_path / "lm" / "model.safetensors")
    s1 = load_tensors(tmp_path / "llava_stage1" / "model.safetensors")
    s2 = load_tensors(tmp_path / "llava_stage2" / "model.safetensors")
    assert all(torch.equal(s1[k], lm_w[k]) for k in lm_w if not k.startswith(("encoders.image.", "embed.")))
    assert not torch.equal(s1["encoders.image.connector.net.0.weight"],
                           lm_w["encoders.image.connector.net.0.weight"])
    assert not torch.equal(s2["backbone.layers.0.attn.wqkv.weight"],
                           s1["backbone.layers.0.attn.wqkv.weight"])


def test_flamingo_starts_as_its_language_model_and_trains_only_the_new_parts(
        tmp_path, text_tokenizer, fake_stamps):
    from omni.config import load_recipe
    from omni.data.images import build_images_corpus
    from omni.pipeline import pipeline_from_recipe

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    text_tokenizer.save(tmp_path / "tok")
    lm = Pipeline(build_model(backbone_config("debug", max_seq_len=64), text_tokenizer.vocab, seed=3),
                  tokenizer=text_tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    args = ["model.size=debug", "model.max_seq_len=64", "data.seq_len=64", f"data.path={images}",
            f"tokenizer.path={tmp_path / 'tok'}", "train.steps=8", "train.warmup_steps=1",
            "train.batch_size=2", "train.eval_every=8", "train.eval_batches=1", "train.progress=false",
            "train.log_every=1", "model.media.image.tokenizer.size=debug",
            "model.media.image.tokenizer.image_size=32",
            f"train.init_from={tmp_path / 'lm'}", f"train.out_dir={tmp_path / 'flamingo'}"]
    # at initialisation: the language model's logits, with or without images in the prompt
    model = pipeline_from_recipe(load_recipe("flamingo/caption_tiny", args), text_tokenizer)
    apply_stages(model.model, load_recipe("flamingo/caption_tiny", args).train)
    img = omni.Image(next(images.rglob("*.png")))
    from omni.api import render_prompts

    rendered, inputs = render_prompts(model, [[img, "Caption:"]])
    ids = rendered[0].ids[None]
    assert torch.equal(model.eval()(ids, media=inputs["media"]).logits, lm.eval()(ids).logits)
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "flamingo/caption_tiny", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lm_w = load_tensors(tmp_path / "lm" / "model.safetensors")
    trained = load_tensors(tmp_path / "flamingo" / "model.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in lm_w.items() if k != "embed.weight")  # the LM is frozen
    assert any(trained[k].abs().sum() > 0 for k in trained if k.endswith("attn_gate"))  # the gates opened
    # interleaved few-shot prompting: each caption reads the image just before it
    flamingo = omni.load(tmp_path / "flamingo")
    shots = [{"role": "user", "content": [img, "Caption:"]}, {"role": "assistant", "content": "A frog."}] * 2
    out = flamingo.generate(shots + [{"role": "user", "content": [img, "Caption:"]}], max_new_tokens=4)
    assert isinstance(out, str)
    from omni.eval import evaluate

    m = evaluate(tmp_path / "flamingo", split="train", shots=2, max_new_tokens=4)
    assert m["shots"] == 2 and m["rows"] == 6 and (tmp_path / "flamingo" / "eval_train_2shot.json").is_file()
    # the held-out fast-binding task: the same model trained on episodes, scored with and without examples
    fb_args = ([a for a in args if not a.startswith("train.out_dir=")]
               + [f"train.out_dir={tmp_path / 'fastbind'}", "data.episodes=6"])
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "flamingo/fastbind_tiny", *fb_args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = evaluate(tmp_path / "fastbind", split="val", max_new_tokens=4)
    assert m["task"] == "fewshot" and m["episodes"] == 6 and m["chance_with_examples"] == 0.5
    assert 0 <= m["zero_shot_accuracy"] <= 1 and 0 <= m["accuracy"] <= 1


def _with_codes(tok, seed=0):
    from dataclasses import replace

    vocab = replace(tok.vocab, num_codebooks=2, codebook_size=8)
    return Pipeline(build_model(backbone_config("debug", max_seq_len=64), vocab, seed=seed, media=IMAGE),
                    tokenizer=tok)


def test_init_from_a_text_only_checkpoint_grows_its_rows_for_the_codec_codes(text_tokenizer, tmp_path):
    _model(text_tokenizer, seed=1).save_pretrained(tmp_path / "lm")
    model = _with_codes(text_tokenizer)
    init_from(model, tmp_path / "lm")
    lm = load_tensors(tmp_path / "lm" / "model.safetensors")["embed.weight"]
    embed = model.embed.weight.detach()
    n = text_tokenizer.vocab.text_size
    assert embed.shape[0] == n + 16 and torch.equal(embed[:n], lm)
    assert torch.allclose(embed[n:], lm.mean(0).expand(16, -1))  # new rows: the mean of its own
    with pytest.raises(ValueError, match=r"tensor embed.weight has shape"):  # codes do not shrink away
        _with_codes(text_tokenizer).save_pretrained(tmp_path / "coded")
        init_from(_model(text_tokenizer), tmp_path / "coded")


def test_trainable_audio_codes_trains_the_code_rows_and_no_text_row(text_tokenizer):
    from omni.train.loop import _param_groups

    model = _with_codes(text_tokenizer)
    n = apply_stages(model, TrainConfig(trainable=["connector", "embed.audio_codes"], lora=LoraSpec(r=2)))
    connector = sum(p.numel() for p in model.encoders["image"].connector.parameters())
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n == connector + lora + 16 * model.embed.weight.shape[1]  # the code rows, not the whole table
    before = model.embed.weight.detach().clone()
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=0.1)  # weight decay too: a text row must not move
    ids = torch.tensor([[5, 6, model.vocab.text_size + 3, model.vocab.text_size + 9]])
    model(ids, targets=torch.tensor([[6, model.vocab.text_size + 3, 7, 8]])).loss.backward()
    opt.step()
    after = model.embed.weight.detach()
    changed = (after != before).any(1)
    assert not changed[:model.vocab.text_size].any() and changed[model.vocab.text_size:].any()
    with pytest.raises(ValueError, match="embed.audio_codes.*no audio code ids.*codec.path"):
        apply_stages(_model(text_tokenizer), TrainConfig(trainable=["embed.audio_codes"]))


def test_lr_scale_gives_the_selected_modules_their_own_learning_rate(text_tokenizer):
    from omni.config import from_dict
    from omni.train.loop import _param_groups

    model = _model(text_tokenizer)
    groups = _param_groups(model, 0.1, {"encoders.image": 0.5, "connector": 3.0})  # the first match wins
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == (0.5 if name.startswith("encoders.image.") else 1.0), name
        assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert len(by_param) == len(list(model.parameters()))
    # without it: the two groups of before, matrices first (resumable optimizer states)
    plain = _param_groups(model, 0.1)
    assert [(g["weight_decay"], g["lr_scale"]) for g in plain] == [(0.1, 1.0), (0.0, 1.0)]
    with pytest.raises(ValueError, match="train.lr_scale pattern 'projector' matches nothing"):
        _param_groups(model, 0.1, {"projector": 0.5})
    cfg = from_dict(TrainConfig, {"lr_scale": {"encoders.audio": "5e-1"}})  # YAML's 5e-1 is a string
    assert cfg.lr_scale == {"encoders.audio": 0.5}
    with pytest.raises(ValueError, match="train.lr_scale.backbone must be > 0"):
        TrainConfig(lr_scale={"backbone": 0.0}).validate()


def test_model_pretrained_starts_from_a_checkpoint_with_its_tokenizer(tmp_path, text_tokenizer, tiny_corpus):
    """``model.pretrained``: the backbone (its context too), vocabulary, tokenizer and weights come
    from the folder; the recipe may not also name a size."""
    from omni.config import load_recipe
    from omni.train.loop import Trainer

    base = Pipeline(build_model(backbone_config("debug", max_seq_len=256), text_tokenizer.vocab, seed=5,
                                tie_embeddings=False), tokenizer=text_tokenizer)
    base.save_pretrained(tmp_path / "lm")
    recipe = tmp_path / "recipe.yaml"  # as recipes/text/smollm_lora.yaml: no backbone keys
    recipe.write_text(f"model: {{pretrained: {tmp_path / 'lm'}}}\n"
                      f"data: {{seq_len: 64, path: {tiny_corpus}}}\n")
    args = [f"train.out_dir={tmp_path / 'run'}", "train.progress=false"]
    trainer = Trainer(load_recipe(str(recipe), args))
    with trainer.run_folder():
        trainer.setup()
    assert trainer.inner.max_seq_len == 256 and not trainer.inner.config.tie_embeddings  # the checkpoint's
    assert trainer.processor.tokenizer.encode("Hello there") == text_tokenizer.encode("Hello there")
    mine = trainer.inner.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in base.model.state_dict().items())
    with pytest.raises(ValueError, match="model.pretrained takes size.*leave model.size out"):
        load_recipe(str(recipe), [*args, "model.size=small"])
    with pytest.raises(ValueError, match="model.pretrained takes max_seq_len"):
        load_recipe(str(recipe), [*args, "model.max_seq_len=128"])
    with pytest.raises(ValueError, match=r"data.seq_len \(512\) exceeds the context of model.pretrained"):
        Trainer(load_recipe(str(recipe), [*args, "data.seq_len=512"])).setup()
    with pytest.raises(ValueError, match="not an omni checkpoint folder.*omni import smollm2"):
        Trainer(load_recipe(str(recipe), [*args, f"model.pretrained={tmp_path}"]))
    compiled = Trainer(load_recipe(str(recipe), ["train.compile=true", f"train.out_dir={tmp_path / 'run2'}",
                                                 "train.progress=false"]))
    with compiled.run_folder():
        compiled.setup()  # train.compile: every block compiled in place (slow test: the same gradients)
    assert all(block._compiled_call_impl is not None for block in compiled.inner.backbone.layers)
    assert compiled.inner.state_dict().keys() == mine.keys()


def test_omni_export_merges_the_lora_adapters_of_a_runs_newest_checkpoint(tmp_path, lora_run, text_tokenizer):
    """``omni export RUN --out DIR``: the newest checkpoint (adapters kept apart to resume) as a model
    folder with them merged: the weights the run itself wrote at its end, and no adapter tensors."""
    from omni.cli import main

    run = lora_run
    newest = run / "checkpoints" / "step_00000002"
    assert any("lora_" in k for k in load_tensors(newest / "model.safetensors"))
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged, final = omni.load(tmp_path / "merged").model.state_dict(), omni.load(run).model.state_dict()
    assert merged.keys() == final.keys() and not any("lora" in k for k in merged)
    assert all(torch.equal(merged[k], final[k]) for k in final)
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "none")]) == 1  # no checkpoints: one line
    assert not (tmp_path / "none").exists()

    # --to hf from the training checkpoint itself: the adapters merged on the way out
    from transformers import AutoModelForCausalLM

    assert main(["export", "--ckpt", str(newest), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.arange(16)[None] * 7 % text_tokenizer.vocab.text_size
    with torch.no_grad():
        assert (hf(ids).logits - omni.load(run).model.logits(ids)).abs().max() < 1e-4


def test_a_frozen_precomputed_tower_trains_to_the_loss_of_running_it(tmp_path, text_tokenizer, fake_stamps):
    """``image_tokenizer: {kind: dinov2, path, freeze: true, precompute: true}`` in a recipe: the
    tower's features are computed once per image into the prepared-sample cache and training runs
    what follows; the losses equal those of running the frozen tower every step (same seed), and the
    exported checkpoint captions without the tower's folder."""
    from transformers import Dinov2Config, Dinov2Model

    from omni.config import load_recipe
    from omni.data.images import build_images_corpus
    from omni.train import train
    from omni.train.loop import read_metrics

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    text_tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    losses = {}
    for precompute in (False, True):
        recipe = tmp_path / f"recipe_{precompute}.yaml"
        recipe.write_text(
            "model: {size: debug, max_seq_len: 64, mrope: true, media: {image: {"
            f"tokenizer: {{kind: dinov2, path: {tmp_path / 'dino'}, freeze: true, precompute: {precompute}, "
            "image_size: 28, merge: 2}, connector: {kind: mlp}}}}\n"
            f"tokenizer: {{path: {tmp_path / 'tok'}}}\n"
            f"data: {{task: caption, media: image, target: caption, prompt: 'Caption:', path: {images}, "
            "seq_len: 64}\n"
            f"train: {{out_dir: {tmp_path / f'run_{precompute}'}, steps: 4, batch_size: 2, lr: 0.01, "
            "warmup_steps: 1, eval_every: 4, eval_batches: 1, save_every: 4, log_every: 1, "
            "progress: false}\n")
        train(load_recipe(str(recipe), []))
        rows = read_metrics(tmp_path / f"run_{precompute}" / "metrics.jsonl")
        losses[precompute] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) >= 4 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    model = omni.load(tmp_path / "run_True")  # the tower's weights are in the checkpoint
    assert model.model.encoders["image"].precomputed() is not None
    png = next(images.rglob("*.png"))
    assert isinstance(model.generate([omni.Image(png), "Caption:"], max_new_tokens=3), str)
