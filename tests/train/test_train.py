"""The training loop through the real CLI: loss falls, exact resume after SIGKILL, DDP on CPU
under ``accelerate launch``, NaN stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omni.data.text import build_text_corpus, wiki_documents
from omni.io import load_tensors, write_jsonl
from omni.tokenizers.text import TextTokenizer, corpus_texts
from omni.train.checkpoint import latest_checkpoint, load_checkpoint
from omni.train.loop import lr_at, read_metrics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    """A real (small) Wikipedia corpus and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("train_env")
    write_jsonl(root / "docs.jsonl", wiki_documents()[:400])
    data = root / "data"
    build_text_corpus(data, source=str(root / "docs.jsonl"), val_fraction=0.1, test_fraction=0.0)
    tok = TextTokenizer.train(corpus_texts(data / "train.jsonl"), vocab_size=512)
    tok.save(root / "tok")
    return root


def overrides(env: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.size": "debug", "model.max_seq_len": 64, "data.seq_len": 64, "data.path": env / "data",
        "tokenizer.path": env / "tok", "train.out_dir": out, "train.batch_size": 4, "train.steps": 30,
        "train.warmup_steps": 3, "train.lr": 0.003, "train.eval_every": 10, "train.eval_batches": 2,
        "train.save_every": 10, "train.log_every": 5, "train.progress": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def omni_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "omni.cli", *map(str, args)]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tensors(out / "model.safetensors")


def test_lr_schedule_warmup_then_cosine():
    class C:
        lr, warmup_steps, steps, min_lr_ratio, max_minutes = 1.0, 10, 110, 0.1, 0.0

    assert lr_at(0, C) == pytest.approx(0.1)
    assert lr_at(9, C) == pytest.approx(1.0)
    assert lr_at(60, C) == pytest.approx(0.55)
    assert lr_at(110, C) == pytest.approx(0.1)

    class Budget(C):
        max_minutes = 1.0

    # with a time budget the schedule follows whichever of steps and time is further along
    assert lr_at(60, Budget, train_seconds=0.0) == pytest.approx(0.55)
    assert lr_at(20, Budget, train_seconds=30.0) == pytest.approx(0.55)
    assert lr_at(20, Budget, train_seconds=60.0) == pytest.approx(0.1)


def test_time_budget_stops_early_and_exports(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.steps": 100000, "train.max_minutes": 0.02, "train.save_every": 100000, "train.eval_every": 100000})))
    assert r.returncode == 0, r.stderr
    assert "train.max_minutes=0.02 reached at step" in r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    stop = next(r for r in rows if r.get("event") == "time_budget")
    assert 1 <= stop["step"] < 100000 and stop["train_seconds"] >= 1.2
    assert any("val_loss" in r and r["step"] == stop["step"] for r in rows)  # the final evaluation ran
    ck = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ck.state.step == stop["step"] and ck.state.train_seconds >= 1.2
    assert (out / "model.safetensors").is_file()
    # resuming a run whose budget is spent exports it again without training further
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.steps": 100000, "train.max_minutes": 0.02, "train.save_every": 100000, "train.eval_every": 100000})))
    assert r.returncode == 0, r.stderr
    assert "already trained" in r.stdout
    assert load_checkpoint(latest_checkpoint(out / "checkpoints")).state.step == stop["step"]


def test_train_lowers_loss_and_exports(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.steps": 40, "train.log_every": 1})))
    assert r.returncode == 0, r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert vals[-1] < vals[0], vals
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    for f in ("config.json", "model.safetensors", "tokenizer/text.model", "recipe.yaml", "loss.png"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # keep_checkpoints=2: only the newest two remain, and `latest` names the final one
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000030", "step_00000040"]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000040"

    import omni

    model = omni.load(out)
    text = model.generate("The", max_new_tokens=8)
    assert isinstance(text, str) and len(text) > 0


def test_sigkill_then_resume_equals_uninterrupted(run_env, tmp_path):
    long = {"train.steps": 400, "train.save_every": 10, "train.eval_every": 400, "train.log_every": 50}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, ref, **long)))
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen(omni_cmd("train", "text/tiny", *overrides(run_env, killed, **long)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000020" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    done = load_checkpoint(latest_checkpoint(killed / "checkpoints")).state.step
    assert 20 <= done < 400

    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, killed, **long)))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    a, b = weights(ref), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the metrics log has no rows from the killed run past its checkpoint: one row per step
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_under_accelerate_launch(run_env, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, single)))
    assert r.returncode == 0, r.stderr
    # `--multi_gpu` selects accelerate's torchrun launcher; without a GPU the ranks use gloo on CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "omni.cli", "train", "text/tiny",
              *overrides(run_env, ddp)]
    r = run(launch)
    assert r.returncode == 0, r.stdout + r.stderr
    start = [row for row in read_metrics(ddp / "metrics.jsonl") if row.get("event") == "start"]
    assert start[-1]["world_size"] == 2
    # Two processes each take half of every global batch, so the run follows the single-process
    # one up to floating-point reduction order (Adam turns that into small weight differences).
    losses = lambda d, key: [r[key] for r in read_metrics(d / "metrics.jsonl") if key in r]  # noqa: E731
    assert losses(ddp, "loss") == pytest.approx(losses(single, "loss"), abs=1e-2)
    assert losses(ddp, "val_loss") == pytest.approx(losses(single, "val_loss"), abs=1e-2)
    assert losses(ddp, "loss")[-1] < losses(ddp, "loss")[0]

def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(run_env, tmp_path):
    out = tmp_path / "nan"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.lr": 1e30, "train.warmup_steps": 0, "train.save_every": 1, "train.grad_clip": 1e30})))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert "loss is nan" in err or "loss is inf" in err, r.stderr
    assert "Last good checkpoint" in err and "Traceback" not in r.stderr
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None and str(last) in err
    load_checkpoint(last)  # intact
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("args, needle", [
    (["train.nonexistent=1"], "unknown key train.nonexistent"),
    (["train.steps=ten"], "train.steps must be an integer"),
    (["model.size=huge"], "model.size must be one of"),
    (["data.path=/nonexistent/corpus"], "omni data build text"),
])
def test_bad_recipe_input_is_one_line_error(run_env, tmp_path, args, needle):
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, tmp_path / "x"), *args))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]


def test_resume_refuses_incompatible_checkpoint(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.steps": 10})))
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.steps": 20, "model.dim": 96})))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "shape" in r.stderr
    assert before == {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}



def test_export_best_keeps_the_weights_with_the_lowest_val_loss(run_env, tmp_path):
    out = tmp_path / "best"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.export": "best", "train.keep_checkpoints": 3, "train.lr": 0.03, "train.warmup_steps": 0})))
    assert r.returncode == 0, r.stderr
    vals = {row["step"]: row["val_loss"] for row in read_metrics(out / "metrics.jsonl") if "val_loss" in row}
    best = min(vals, key=vals.get)
    exported = weights(out)
    ck = load_tensors(out / "checkpoints" / f"step_{best:08d}" / "model.safetensors")
    assert all(torch.equal(exported[k], ck[k]) for k in ck)
