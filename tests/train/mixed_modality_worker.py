"""One process of ``test_distributed.py``'s mixed-modality test, under ``torchrun`` on CPU (gloo).

A model with an audio tower (read by cross-attention) and an image tower (tokens in the sequence)
trains for 5 steps on batches where rank 0 holds only audio and rank 1 only images, under DDP or
FSDP2 (``argv[1]``). Each rank also trains an unwrapped copy on the whole global batch, the
single-process run; the gradients of every step and the final weights of the two are compared.
The audio clips carry transcripts for the audio tower's CTC head. The token loss and the CTC loss
are each process's share of the global mean (``share_of_global_mean``), as the trainer makes them.
``argv[3] == "skip"`` turns the dummy towers off (to show the hang the test guards against).
Writes ``{"max_grad_diff", "max_weight_diff", "steps"}`` as JSON to ``argv[2]`` (rank 0).
"""

from __future__ import annotations

import datetime
import json
import sys

import torch
import torch.distributed as dist

from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.sequence import MediaSlot
from omni.train.parallel import share_of_global_mean
from omni.vocab import Vocab

MEDIA = {"audio": {"encoder": {"kind": "whisper_style", "size": "debug", "subsample": 4},
                   "connector": {"kind": "mlp"}, "ctc_weight": 0.5},
         "image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                   "connector": {"kind": "mlp"}}}
T, VOCAB, STEPS = 24, 64, 5


def build():
    cfg = backbone_config("debug", max_seq_len=T, cross_attention={"every": 1, "media": ["audio"]})
    return build_model(cfg, Vocab(text_size=VOCAB), seed=0, media=MEDIA)


def row(model, modality: str, g: torch.Generator) -> dict:
    """One training row of ``modality``: its media at position 2, random text ids and targets."""
    if modality == "audio":
        data, grid = model.encoders["audio"].prepare(torch.randn(8000, generator=g) * 0.1)
    else:
        data, grid = model.encoders["image"].prepare(torch.randint(0, 256, (3, 32, 32), generator=g,
                                                                   dtype=torch.uint8))
    n = 1 if modality == "audio" else grid[0] * grid[1] * grid[2]  # audio: a memory, visible from 2 on
    ids = torch.randint(4, VOCAB, (T,), generator=g)
    targets = torch.randint(4, VOCAB, (T,), generator=g)
    targets[: 2 + n] = -100
    length = grid[0] * grid[1] * grid[2]
    labels = torch.randint(1, VOCAB, (3,), generator=g) if modality == "audio" else None  # a transcript
    return {"ids": ids, "targets": targets, "slot": MediaSlot(2, length, modality, data, labels=labels)}


def batch(rows: list[dict]) -> dict:
    return {"input_ids": torch.stack([r["ids"] for r in rows]),
            "targets": torch.stack([r["targets"] for r in rows]),
            "media": [(i, r["slot"]) for i, r in enumerate(rows)]}


def loss_of(model, b: dict, world: int = 1) -> torch.Tensor:
    """The trainer's objective: with several processes, each loss is this one's share of the global
    mean."""
    out = model(b["input_ids"], targets=b["targets"], media=b["media"])
    loss = share_of_global_mean(out.loss, out.loss_mass, world)
    if out.aux_loss is None:
        return loss
    return loss + share_of_global_mean(out.aux_loss, out.aux_mass, world)


def full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None:
            out[name.replace("module.", "")] = g.full_tensor() if isinstance(g, DTensor) else g
    return out


def main() -> None:
    mode, out_file = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref, model = build(), build()
    ref.train()
    model.train()
    model.every_tower = len(sys.argv) < 4 or sys.argv[3] != "skip"
    if mode == "fsdp":
        from omni.train.parallel import shard_model

        shard_model(model, model, "no", torch.device("cpu"))
        wrapped = model
    else:
        # as the trainer wraps a model with towers: SigLIP's pooling head is never used
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # plain SGD: Adam would blow the fp32 noise of gradients that are zero in exact arithmetic
    # (attention key biases) up to lr-sized steps of either sign
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    max_grad = 0.0
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        rows = [row(ref, "audio", g), row(ref, "image", g)]  # the global batch: rank 0's row, rank 1's
        loss_of(ref, batch(rows)).backward()
        loss_of(wrapped, batch([rows[rank]]), world).backward()
        mine, theirs = full_grads(model), full_grads(ref)
        assert mine.keys() == theirs.keys(), sorted(set(mine) ^ set(theirs))
        max_grad = max(max_grad, max(float((mine[k] - theirs[k]).abs().max()) for k in mine))
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad()
    if mode == "fsdp":
        from omni.train.parallel import full_state_dict

        weights = full_state_dict(model)
    else:
        weights = model.state_dict()
    if rank == 0:
        ref_sd = ref.state_dict()
        max_weight = max(float((weights[k] - ref_sd[k]).abs().max()) for k in ref_sd)
        with open(out_file, "w") as f:
            json.dump({"max_grad_diff": max_grad, "max_weight_diff": max_weight, "steps": STEPS}, f)
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
