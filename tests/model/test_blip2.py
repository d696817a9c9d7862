"""BLIP-2 in two stages: stage 1 trains a Q-Former over a frozen image tower with switchable
contrastive / matching / grounded-generation losses (each logged on its own), ITM hard negatives
never pick the positive, stage 2 captions through the Q-Former into a frozen language model; a
config that turns every loss off fails before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from omni.config import load_recipe
from omni.io import load_tensors
from omni.model.backbone import backbone_config
from omni.model.blip2 import hard_negatives
from omni.model.objectives import PairObjective
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.sequence import MediaSlot

IMAGE = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                   "connector": {"kind": "qformer", "num_queries": 4, "num_layers": 1}}}


def test_hard_negatives_never_pick_the_positive_nor_a_row_with_the_same_text():
    torch.manual_seed(0)
    B = 6
    sims = torch.randn(B, B) + 20 * torch.eye(B)  # the positive is by far the most similar
    same = torch.eye(B, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # rows 0 and 1 share their caption
    for _ in range(200):
        neg_text, neg_image = hard_negatives(sims, same)
        for i in range(B):
            assert not same[i, neg_text[i]] and not same[neg_image[i], i]
    # hard: the similarity decides; row 2's texts are all alike but text 4, so text 4 it is
    sims = torch.zeros(B, B)
    sims[2, 4] = 30.0
    assert all(int(hard_negatives(sims, same)[0][2]) == 4 for _ in range(20))
    # uniform without similarities (itc off); a batch of one caption still finds another row
    neg_text, _ = hard_negatives(None, torch.ones(B, B, dtype=torch.bool))
    assert all(int(n) != i for i, n in enumerate(neg_text))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        hard_negatives(None, torch.ones(1, 1, dtype=torch.bool))


def _pairs(tok, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["a red frog", "a blue car", "the green tree", "a red frog"][:B]
    seqs = [[tok.vocab.bos_id] + tok.encode(t) + [tok.vocab.eos_id] for t in texts]
    from omni.data.tasks import right_pad

    ids, mask = right_pad(seqs)
    media = [(i, MediaSlot(0, 0, "image", torch.randn(3, 32, 32, generator=g))) for i in range(B)]
    return ids, mask, media


@pytest.mark.parametrize("weights", [{"itc": 1, "itm": 1, "itg": 1}, {"itc": 1, "itm": 0, "itg": 0},
                                     {"itc": 0, "itm": 1, "itg": 0}, {"itc": 0, "itm": 0, "itg": 2}])
def test_each_loss_is_computed_only_when_on_and_the_objective_is_the_weighted_sum(text_tokenizer, weights):
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=64), text_tokenizer.vocab,
                        seed=0, media=IMAGE, blip2={**weights, "embed_dim": 16}), tokenizer=text_tokenizer)
    ids, mask, media = _pairs(text_tokenizer)
    out = PairObjective(model)(ids, mask, media)
    on = {k for k, w in weights.items() if w}
    assert set(out.parts) == on
    assert torch.allclose(out.loss, sum(weights[k] * out.parts[k] for k in on))
    out.loss.backward()
    qformer = model.encoders["image"].connector
    assert qformer.queries.grad is not None and qformer.queries.grad.abs().sum() > 0
    assert hasattr(model.blip2, "itm_head") == bool(weights["itm"])  # heads exist only for losses that are on
    assert hasattr(model.blip2, "query_proj") == bool(weights["itc"])


def test_itg_reads_the_image_only_through_the_queries(text_tokenizer):
    """Generation loss depends on the image; text tokens never leak into the query positions."""
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=64), text_tokenizer.vocab,
                        seed=0, media=IMAGE, blip2={"itc": 0, "itm": 0, "itg": 1}),
                     tokenizer=text_tokenizer).eval()
    ids, mask, media = _pairs(text_tokenizer)
    _, _, other = _pairs(text_tokenizer, seed=1)
    a = PairObjective(model)(ids, mask, media).loss
    b = PairObjective(model)(ids, mask, other).loss
    assert not torch.allclose(a, b)


def test_all_losses_off_is_an_error_before_training(tmp_path):
    with pytest.raises(ValueError, match="itc, itm and itg are all 0, so nothing would train"):
        load_recipe("blip2/stage1_tiny", ["model.blip2={itc: 0, itm: 0, itg: 0}"])
    with pytest.raises(ValueError, match="data.task must be contrastive"):
        load_recipe("blip2/stage1_tiny", ["data.task=caption", "data.seq_len=64"])
    with pytest.raises(ValueError, match="model.blip2.itm must be >= 0"):
        load_recipe("blip2/stage1_tiny", ["model.blip2.itm=-1"])
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "blip2/stage1_tiny", "model.blip2.itc=0",
                        "model.blip2.itm=0", "model.blip2.itg=0", f"train.out_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nothing would train" in r.stderr
    assert not (tmp_path / "run").exists()


def _losses(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_blip2_two_stages_through_the_cli(tmp_path, text_tokenizer, fake_stamps):
    """Stage 1 trains the Q-Former (and the LM copy that is its text side) on a frozen tower, logging
    each loss; stage 2 loads stage 1's image side and the original LM, and trains only the
    Q-Former and embeddings: the tower and the LM come out bit for bit as they went in."""
    from omni.data.images import build_images_corpus

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    text_tokenizer.save(tmp_path / "tok")
    lm = Pipeline(build_model(backbone_config("debug", max_seq_len=64), text_tokenizer.vocab, seed=3),
                  tokenizer=text_tokenizer)
    lm.save_pretrained(tmp_path / "lm")  # stands in for a pre-trained language model run
    common = ["model.size=debug", "model.max_seq_len=64", f"data.path={images}",
              f"tokenizer.path={tmp_path / 'tok'}", "train.warmup_steps=1", "train.batch_size=4",
              "train.eval_batches=1", "train.progress=false", "train.log_every=1",
              "model.media.image.tokenizer.size=debug", "model.media.image.tokenizer.image_size=32",
              "model.media.image.connector.num_queries=4", "model.media.image.connector.num_layers=1"]

    def train(recipe, out, *extra):
        r = subprocess.run([sys.executable, "-m", "omni.cli", "train", recipe, *common, "train.steps=4",
                            "train.eval_every=4", f"train.out_dir={tmp_path / out}", *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return tmp_path / out

    s1 = train("blip2/stage1_tiny", "s1", "data.seq_len=64", f"train.init_from={tmp_path / 'lm'}")
    rows = _losses(s1)
    assert all({"itc_loss", "itm_loss", "itg_loss"} <= set(r) for r in rows)
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["itc_loss"] + r["itm_loss"] + r["itg_loss"], abs=1e-3)
    off = train("blip2/stage1_tiny", "s1_itm_off", "data.seq_len=64", f"train.init_from={tmp_path / 'lm'}",
                "model.blip2.itm=0", "model.blip2.itg=0.5")
    for r in _losses(off):
        assert "itm_loss" not in r and {"itc_loss", "itg_loss"} <= set(r)
        assert r["loss"] == pytest.approx(r["itc_loss"] + 0.5 * r["itg_loss"], abs=1e-3)

    s2 = train("blip2/stage2_tiny", "s2", "data.seq_len=64", f"train.init_from=[{s1},{tmp_path / 'lm'}]")
    from omni.model.build import model_from_recipe

    init = model_from_recipe(load_recipe("blip2/stage1_tiny", common), text_tokenizer).export_state_dict()
    lm_w = load_tensors(tmp_path / "lm" / "model.safetensors")
    w1, w2 = load_tensors(s1 / "model.safetensors"), load_tensors(s2 / "model.safetensors")
    tower = [k for k in w1 if k.startswith("encoders.image.tokenizer.")]
    assert tower and all(torch.equal(w1[k], init[k]) and torch.equal(w2[k], init[k]) for k in tower)  # frozen
    assert not torch.equal(w1["encoders.image.connector.queries"], w2["encoders.image.connector.queries"])
    # the LM of stage 2 is the original, not stage 1's trained copy, and it stays frozen
    assert not torch.equal(w1["backbone.layers.0.attn.wqkv.weight"],
                           lm_w["backbone.layers.0.attn.wqkv.weight"])
    assert all(torch.equal(w2[k], v) for k, v in lm_w.items() if k != "embed.weight")
    # heads dropped
    assert any(k.startswith("blip2.") for k in w1) and not any(k.startswith("blip2.") for k in w2)
    # stage 1 is scored by zero-shot retrieval with its query embeddings, stage 2 by captioning
    from omni.eval import evaluate

    m = evaluate(s1, split="train")
    assert m["pairs"] == 6 and m["media_to_text_r5"] == 1.0  # 6 pairs, two "A frog.": always in the top 5
    assert "cider_d" in evaluate(s2, split="train", max_new_tokens=4)
