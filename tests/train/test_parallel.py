"""Mixed-modality batches on several processes (``omni.train.parallel``, ``OmniModel.every_tower``):
rank 0 holds only audio, rank 1 only images, and no step hangs; the gradients are the
single-process run's on the whole batch. The worker is ``mixed_modality_worker.py``, run under
``torchrun`` with gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mixed_modality_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_mixed_modality_batches_never_hang_and_match_one_process(tmp_path, mode):
    result = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(_free_port()), str(WORKER), mode, str(result)],
                       env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["steps"] == 5
    # fp32 reduction order apart, the same gradients at every step and the same weights after (the
    # CTC head's gradient is ~1 in size; a per-process CTC mean would be off by half of it)
    assert got["max_grad_diff"] < 1e-4, got
    assert got["max_weight_diff"] < 1e-5, got


def test_an_idle_tower_runs_on_a_dummy_input_at_zero_weight():
    """One process: with ``every_tower`` a batch lacking a modality still runs its tower (every
    tower parameter that the tower uses gets a gradient, of zeros), and the loss and every other
    gradient are those without it."""
    import torch
    from mixed_modality_worker import batch, build, row

    grads = {}
    for every in (False, True):
        model = build().train()
        model.every_tower = every
        g = torch.Generator().manual_seed(0)
        b = batch([row(model, "image", g)])  # no audio: the audio tower (cross-attention) is idle
        out = model(b["input_ids"], targets=b["targets"], media=b["media"])
        out.objective.backward()  # the token loss plus the idle CTC head at zero weight
        grads[every] = (float(out.loss), {n: p.grad for n, p in model.named_parameters()})
    (loss_off, off), (loss_on, on) = grads[False], grads[True]
    assert loss_on == loss_off
    audio = [n for n in on if n.startswith("encoders.audio.")]
    assert audio and all(off[n] is None for n in audio)
    assert all(on[n] is not None and not on[n].any() for n in audio)
    for n, g in off.items():
        if g is not None:
            assert torch.equal(g, on[n]), n
