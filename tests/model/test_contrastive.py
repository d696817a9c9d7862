"""Contrastive alignment (CLIP): symmetric InfoNCE with a learned temperature, negatives gathered
across processes with gradients, a recipe trained through the CLI and scored by zero-shot
retrieval and classification."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import omni
from omni.config import load_recipe
from omni.model.contrastive import info_nce


def test_info_nce_is_low_for_aligned_pairs_and_symmetric():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(4.0)  # exp(4) ~ 55
    aligned, _ = info_nce(x, x, scale)
    shuffled, _ = info_nce(x, x[torch.randperm(8)], scale)
    assert aligned < 0.1 < shuffled
    a, b = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    assert torch.allclose(info_nce(a, b, scale)[0], info_nce(b, a, scale)[0])
    # clamped at 100
    assert torch.allclose(info_nce(a, b, torch.tensor(9.0))[0], info_nce(a, b, torch.tensor(100.0))[0])


def _rank(rank, world, port, media, text, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(media) // world
    m = media[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    t = text[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss, _ = info_nce(m, t, torch.tensor(2.0))
    loss.backward()
    out[rank] = torch.cat([m.grad, t.grad], dim=1) / world  # what DDP's gradient averaging makes of it
    dist.barrier()  # no rank tears gloo down while the other still talks to it (a SIGABRT in CI)
    dist.destroy_process_group()


def test_negatives_come_from_every_process_and_gradients_match_one_big_batch():
    torch.manual_seed(0)
    media, text = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    m, t = media.clone().requires_grad_(True), text.clone().requires_grad_(True)
    info_nce(m, t, torch.tensor(2.0))[0].backward()
    with mp.Manager() as manager:
        out = manager.dict()
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(2, port, media, text, out), nprocs=2)
        grads = torch.cat([out[0], out[1]])
    assert torch.allclose(grads, torch.cat([m.grad, t.grad], dim=1), atol=1e-6)


def test_clip_recipe_trains_and_scores_zero_shot(tmp_path, text_tokenizer, fake_stamps):
    from omni.data.images import build_images_corpus

    images = tmp_path / "images"
    build_images_corpus(images, stamps_dir=fake_stamps, max_size=48, val_fraction=0.0, test_fraction=0.0)
    (images / "val.jsonl").write_text((images / "train.jsonl").read_text())
    text_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "clip"
    args = ["model.size=debug", f"data.path={images}", f"tokenizer.path={tmp_path / 'tok'}", "train.steps=25",
            "train.warmup_steps=2", "train.batch_size=4", "train.lr=3e-3", "train.eval_every=25",
            "train.eval_batches=1", "train.progress=false", "train.log_every=1",
            "model.media.image.tokenizer.size=debug",
            "model.media.image.tokenizer.image_size=32", f"train.out_dir={out}"]
    r = subprocess.run([sys.executable, "-m", "omni.cli", "train", "clip/images_tiny", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0]
    r = subprocess.run([sys.executable, "-m", "omni.cli", "eval", "--ckpt", str(out), "--split", "train"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "eval_train.json").read_text())
    assert m["pairs"] == 6 and m["classes"] == 3 and m["chance_accuracy"] == pytest.approx(1 / 3)
    for key in ("media_to_text_r1", "text_to_media_r1", "media_to_text_r5", "zero_shot_accuracy"):
        assert 0 <= m[key] <= 1
    # 6 pairs, two of them "A frog.": the right caption is always among the top 5
    assert m["media_to_text_r5"] == 1.0
    assert omni.load(out).contrastive is not None


def test_contrastive_task_needs_a_contrastive_model():
    with pytest.raises(ValueError, match="needs model.contrastive"):
        load_recipe("clip/images_tiny", ["model.contrastive=null"])
