"""Checkpoints and run folders without training: what is written, what is refused, what a damaged
folder resumes from (omni/train/checkpoint.py, omni/train/run.py)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch

from omni.config import RecipeConfig, TrainConfig
from omni.train.checkpoint import (
    NonFiniteError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from omni.train.loop import _truncate_metrics, read_metrics
from omni.train.run import StopSignals, check_resume, open_run, recipe_changes


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(root, step, run_id="run-a", keep=5, **kw):
    model, opt = _model_and_optimizer()
    return save_checkpoint(root, model.state_dict(), opt.state_dict(), TrainState(step=step, run_id=run_id),
                           {"recipe": RecipeConfig().to_dict(), "world_size": 1}, keep, **kw)


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_weights_or_optimizer_state_are_never_written(tmp_path, where):
    model, opt = _model_and_optimizer()
    state = opt.state_dict()
    if where == "model":
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    else:
        state["state"][0]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        save_checkpoint(tmp_path, model.state_dict(), state, TrainState(step=3), {}, keep=2)
    assert list(tmp_path.iterdir()) == []  # no folder, no temp, no `latest`


def test_pruning_keeps_other_runs_checkpoints(tmp_path):
    for step in (1000, 2000):  # an older run's higher step numbers
        _save(tmp_path, step, run_id="old")
    for step in (10, 20, 30):
        _save(tmp_path, step, run_id="new", keep=2)
    names = sorted(p.name for p in tmp_path.glob("step_*"))
    assert names == ["step_00000020", "step_00000030", "step_00001000", "step_00002000"]


def test_every_ranks_rng_state_round_trips(tmp_path):
    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    states = []
    for seed in (1, 2):  # two "ranks" with different streams
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        states.append(rng_state())
    expected = []
    for st in states:
        set_rng_state(st)
        expected.append(draws())
    path = _save(tmp_path, 5, rng=states, scaler={"scale": 1024.0, "_growth_tracker": 3})
    ck = load_checkpoint(path)
    assert len(ck.rng) == 2 and ck.meta["scaler"] == {"scale": 1024.0, "_growth_tracker": 3}
    for rank in (1, 0):
        ck.restore_rng(rank)
        assert draws() == expected[rank]


@pytest.mark.parametrize("content, needle", [
    ("[]", "no 'state' object"),
    ('{"state": {"step": "ten", "cursor": 0}, "optimizer": {"param_groups": []}}', "must be integers"),
    ('{"state": {"step": 1, "epoch": 2}, "optimizer": {"param_groups": []}}', "unknown state keys"),
    ('{"state": {"step": 1}}', "optimizer.param_groups"),
])
def test_trainer_state_of_the_wrong_shape_names_the_file(tmp_path, content, needle):
    path = _save(tmp_path, 7)
    (path / "trainer_state.json").write_text(content)
    with pytest.raises(ValueError, match="trainer_state.json: not a trainer state") as e:
        load_checkpoint(path)
    assert needle in str(e.value)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    model_file = tmp_path / "step_00000030" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated
    (tmp_path / "step_00000020" / "trainer_state.json").write_text('{"state": 3}')  # wrong shape
    with caplog.at_level(logging.WARNING):
        ck = load_latest(tmp_path)
    assert ck.state.step == 10
    assert str(model_file) in caplog.text and "step_00000020/trainer_state.json" in caplog.text
    (tmp_path / "step_00000010" / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match="no checkpoint loads"):
        load_latest(tmp_path)


def test_a_metrics_line_cut_short_is_dropped_with_a_warning(tmp_path, caplog):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        _truncate_metrics(f, 2)
    assert read_metrics(f) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]
    assert "metrics.jsonl:3: dropped an unreadable metrics line" in caplog.text


def test_recipe_changes_on_resume_are_listed_and_breaking_ones_refused(tmp_path, caplog):
    old = RecipeConfig()
    path = _save(tmp_path, 10)
    ck = load_checkpoint(path)
    new = RecipeConfig()
    new.train.eval_every, new.train.out_dir = 7, "elsewhere"  # when to evaluate, where: safe
    with caplog.at_level(logging.WARNING):
        check_resume(ck, new.to_dict(), world_size=1, allow_changes=False)
    assert "train.eval_every: 100 -> 7" in caplog.text
    new.train.lr, new.train.batch_size = 0.5, 3
    with pytest.raises(ValueError,
                       match=r"train.batch_size: 16 -> 3; train.lr: 0.001 -> 0.5.*train.resume_changed=true"):
        check_resume(ck, new.to_dict(), world_size=1, allow_changes=False)
    check_resume(ck, new.to_dict(), world_size=1, allow_changes=True)
    with pytest.raises(ValueError, match=r"processes: 1 -> 2"):
        check_resume(ck, old.to_dict(), world_size=2, allow_changes=False)
    # an option the old recipe predates counts as changed only away from its default
    legacy = old.to_dict()
    del legacy["train"]["max_skipped_steps"]
    assert recipe_changes(legacy, old.to_dict()) == []


def _tc(**kw) -> TrainConfig:
    tc = TrainConfig()
    for k, v in kw.items():
        setattr(tc, k, v)
    return tc


def test_open_run_refuses_to_train_over_another_run_unless_told(tmp_path):
    out = tmp_path / "run"
    _save(out / "checkpoints", 10, run_id="first")
    (out / "model.safetensors").write_bytes(b"exported")
    recipe = RecipeConfig().to_dict()
    with pytest.raises(ValueError, match=r"already holds a run and train.resume=false.*train.overwrite=true"):
        open_run(out, _tc(resume=False), recipe, 1)
    assert (out / "model.safetensors").read_bytes() == b"exported"
    path, run_id = open_run(out, _tc(), recipe, 1)  # the default resumes it, as the same run
    assert path.name == "step_00000010" and run_id == "first"

    path, run_id = open_run(out, _tc(resume=False, overwrite=True), recipe, 1)
    assert path is None and run_id != "first"
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "model.safetensors").read_bytes() == b"exported"
    assert load_checkpoint(aside / "checkpoints" / "step_00000010").state.run_id == "first"
    assert [p.name for p in out.iterdir()] == []


def test_open_run_starts_over_a_run_killed_before_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step_00000010.tmpab").mkdir(parents=True)  # a write SIGKILL interrupted
    (out / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    path, run_id = open_run(out, _tc(resume=False), RecipeConfig().to_dict(), 1)
    assert path is None and run_id
    assert not (out / "checkpoints" / ".step_00000010.tmpab").exists()
    assert latest_checkpoint(out / "checkpoints") is None


def test_stop_signals_turn_the_first_signal_into_a_request():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM"  # and this process is still alive
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sharded_checkpoint_is_moved_in_whole_and_its_weights_load_in_one_process(tmp_path):
    """``train.parallel=fsdp``'s layout: the processes' ``torch.distributed.checkpoint`` folder moves
    into the checkpoint as ``sharded/`` (nothing left at the staging path); ``load_model`` reads the
    weights into a whole model, as ``omni export`` does; a truncated shard and a missing ``.metadata``
    are named."""
    import torch.distributed.checkpoint as dcp

    model, _ = _model_and_optimizer()
    staging = tmp_path / ".step_00000007.shards"
    dcp.save({"model": model.state_dict()}, checkpoint_id=staging, no_dist=True)
    path = _save(tmp_path, 7, shards=staging)
    assert not staging.exists() and (path / "sharded" / ".metadata").is_file()
    assert not (path / "model.safetensors").exists()
    ck = load_checkpoint(path)
    assert ck.sharded == path / "sharded" and ck.model_state == {}
    fresh = torch.nn.Linear(4, 3)
    ck.load_model(fresh)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    shard = next((path / "sharded").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # a shard cut short (a disk filled up, a copy killed)
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated \({len(data) // 2} of \d+ bytes\)"):
        load_checkpoint(path)
    shard.write_bytes(data)
    (path / "sharded" / ".metadata").unlink()
    with pytest.raises(ValueError, match="sharded: the sharded model and optimizer state are missing"):
        load_checkpoint(path)


def test_a_state_written_before_best_metric_reads_its_best_val_loss(tmp_path):
    path = _save(tmp_path, 5)
    meta_file = path / "trainer_state.json"
    meta = json.loads(meta_file.read_text())
    meta["state"].pop("best")
    meta["state"]["best_val_loss"] = 2.5
    meta_file.write_text(json.dumps(meta))
    assert load_checkpoint(path).state.best == {"metric": "val_loss", "value": 2.5}
