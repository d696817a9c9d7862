"""The training loop through the real CLI: loss falls, exact resume after SIGKILL (also mid-write,
and past a damaged checkpoint) and after SIGTERM, one writer per run folder, DDP and FSDP on CPU under
``accelerate launch`` (the same losses and weights as one process; FSDP's sharded checkpoints resume
exactly), NaN/inf updates skipped and the run stopped when they persist."""

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

from omni.config import load_recipe
from omni.data.text import build_text_corpus, wiki_documents
from omni.io import load_tensors, write_jsonl
from omni.tokenizers.text import TextTokenizer, corpus_texts
from omni.train.checkpoint import latest_checkpoint, load_checkpoint
from omni.train.loop import Trainer, lr_at, read_metrics

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


def test_a_missing_corpus_names_the_command_that_builds_it():
    from omni.config import TaskData
    from omni.train.loop import _build_command

    def command(**kw):
        return _build_command(TaskData(**kw))

    assert command(task="text", path="data/text") == "`omni data build text --out data/text`"
    assert command(task="speak", path="x") == "`omni data build speech --out x`"
    assert (command(task="caption", media="audio", path="data/sounds")
            == "`omni data build sounds --out data/sounds`")
    assert command(task="caption", media="audio", path="c") == ("`omni data build speech --out c` or "
                                                                "`omni data build sounds --out c`")
    assert command(task="caption", media="video", path="v") == "`omni data build video --out v`"


def test_time_budget_stops_early_and_exports(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.steps": 100000, "train.max_minutes": 0.02, "train.save_every": 100000,
        "train.eval_every": 100000})))
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
        "train.steps": 100000, "train.max_minutes": 0.02, "train.save_every": 100000,
        "train.eval_every": 100000})))
    assert r.returncode == 0, r.stderr
    assert "already trained" in r.stdout
    assert load_checkpoint(latest_checkpoint(out / "checkpoints")).state.step == stop["step"]


def test_train_lowers_loss_and_exports(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny",
                     *overrides(run_env, out, **{"train.steps": 40, "train.log_every": 1})))
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


def test_speed_switches_train_like_the_defaults(run_env, tmp_path):
    """flex attention, selective activation checkpointing and the chunked loss (the GPU recipes'
    switches; train.compile has its own test) give the run's losses of the defaults."""
    from omni.config import load_recipe
    from omni.train.loop import train

    losses = {}
    for name, extra in (("default", {}), ("switches", {"model.attn_backend": "flex", "train.loss_chunk": 50,
                                                        "train.activation_checkpointing": "selective"})):
        out = tmp_path / name
        train(load_recipe("text/tiny", overrides(run_env, out, **{
            "train.steps": 3, "train.log_every": 1, "train.eval_every": 3, "train.save_every": 3, **extra})))
        losses[name] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses["default"]) == 3
    assert losses["switches"] == pytest.approx(losses["default"], rel=1e-4)


def test_runs_in_one_process_each_get_their_own_mixed_precision(run_env, tmp_path, monkeypatch):
    """accelerate's state is one per process; a bf16 run after an fp32 one (a notebook, the API)
    trains in bf16 instead of failing."""
    from omni.config import load_recipe
    from omni.train import loop
    from omni.train.loop import Trainer

    monkeypatch.setattr(loop, "bf16_is_emulated", lambda device: False)  # a CPU with bfloat16 kernels
    for precision in ("no", "bf16", "no"):
        trainer = Trainer(load_recipe("text/tiny", overrides(run_env, tmp_path / precision, **{
            "train.mixed_precision": f"\"{precision}\""})))
        assert trainer.accelerator.mixed_precision == precision


def test_bf16_falls_back_to_fp32_on_a_cpu_that_would_emulate_it(run_env, tmp_path, monkeypatch, caplog):
    """The CPU recipes ask for bf16, 2.4x faster where the CPU has bfloat16 kernels; on one with AVX2
    alone it is emulated, many times slower than fp32, so such a run trains in fp32 and says why."""
    from omni.config import load_recipe
    from omni.train import loop
    from omni.train.loop import Trainer

    if torch.cuda.is_available():
        pytest.skip("the fallback is for CPU runs")
    monkeypatch.setattr(loop, "bf16_is_emulated", lambda device: True)
    with caplog.at_level("WARNING", logger="omni.train.loop"):
        trainer = Trainer(load_recipe("text/tiny", overrides(run_env, tmp_path / "run", **{
            "train.mixed_precision": "bf16"})))
    assert trainer.accelerator.mixed_precision == "no"
    assert "no bfloat16 kernels" in caplog.text and "training in fp32" in caplog.text


LONG = {"train.steps": 200, "train.save_every": 10, "train.eval_every": 200, "train.log_every": 50}


@pytest.fixture(scope="module")
def reference(run_env, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted LONG run, which every interrupted run must end with."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, ref, **LONG)))
    assert r.returncode == 0, r.stderr
    return weights(ref)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended before {path} appeared"
        time.sleep(0.005)


def patched_cmd(patch: str, *args) -> list[str]:
    """``omni`` in a process whose code ``patch`` changed first (fault injection)."""
    return [sys.executable, "-c",
            f"import sys\n{patch}\nfrom omni.cli import main\nsys.exit(main(sys.argv[1:]))",
            *map(str, args)]


def test_sigkill_then_resume_past_a_damaged_checkpoint_equals_uninterrupted(run_env, tmp_path, reference):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(omni_cmd("train", "text/tiny", *overrides(run_env, killed, **LONG)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoints" / "step_00000030" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    newest = latest_checkpoint(killed / "checkpoints")
    assert 30 <= load_checkpoint(newest).state.step < 200
    # a disk that lost the newest checkpoint's tail, and a metrics line cut short mid-write
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:1000])
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "lo')

    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, killed, **LONG)))
    assert r.returncode == 0, r.stderr
    assert f"skipping damaged checkpoint: {newest / 'model.safetensors'}" in r.stderr
    assert "dropped an unreadable metrics line" in r.stderr and "resumed from" in r.stderr
    assert_same_weights(reference, weights(killed))
    # the metrics log has no rows from the killed run past its checkpoint: one row per step
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))


def test_sigkill_during_a_checkpoint_write_then_resume_equals_uninterrupted(run_env, tmp_path, reference):
    out = tmp_path / "run"
    die_mid_write = (
        "import os, signal\nimport omni.train.checkpoint as C\nsave = C.save_tensors\n"
        "def save_tensors(path, tensors, metadata=None):\n"
        "    if '.step_00000020.tmp' in str(path) and path.name == 'optimizer.safetensors':\n"
        "        path.write_bytes(b'half a file')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(path, tensors, metadata)\n"
        "C.save_tensors = save_tensors")
    r = run(patched_cmd(die_mid_write, "train", "text/tiny", *overrides(run_env, out, **LONG)))
    assert r.returncode == -signal.SIGKILL
    assert latest_checkpoint(out / "checkpoints").name == "step_00000010"
    assert list((out / "checkpoints").glob(".step_00000020.tmp*"))
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **LONG)))
    assert r.returncode == 0, r.stderr
    assert "a checkpoint write that a killed run left unfinished" in r.stderr
    assert not list((out / "checkpoints").glob(".step_*"))
    assert_same_weights(reference, weights(out))


def test_sigterm_saves_exits_0_and_resumes_exactly_and_a_second_writer_is_refused(
        run_env, tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(omni_cmd("train", "text/tiny", *overrides(run_env, out, **LONG)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step_00000020" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGSTOP)  # hold it mid-run, lock held, while a second writer tries
    try:
        r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **LONG)))
    finally:
        proc.send_signal(signal.SIGCONT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"is being written by another process (pid {proc.pid} " in r.stderr.strip().splitlines()[-1]
    time.sleep(0.05)  # a step or so more
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: stopping after this step" in stderr
    ck = latest_checkpoint(out / "checkpoints")
    step = load_checkpoint(ck).state.step
    assert f"stopped by SIGTERM after step {step}; checkpoint {ck}" in stdout
    assert 20 < step < 200 and not (out / "model.safetensors").exists()
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **LONG)))
    assert r.returncode == 0, r.stderr
    assert_same_weights(reference, weights(out))


def test_a_second_signal_ends_the_run_at_once(run_env, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(omni_cmd("train", "text/tiny", *overrides(run_env, out, **LONG)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoints" / "step_00000010" / "trainer_state.json", proc)
    proc.send_signal(signal.SIGSTOP)  # both signals are pending when it wakes: the second ends it
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) in (-signal.SIGINT, -signal.SIGTERM)
    load_checkpoint(latest_checkpoint(out / "checkpoints"))  # what was written is intact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp_on_two_processes_match_one_process(run_env, tmp_path):
    single = tmp_path / "single"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, single)))
    assert r.returncode == 0, r.stderr
    one = weights(single)

    def losses(d, key):
        return [r[key] for r in read_metrics(d / "metrics.jsonl") if key in r]

    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        r = run(ddp_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.parallel": mode})))
        assert r.returncode == 0, r.stdout + r.stderr
        start = [row for row in read_metrics(out / "metrics.jsonl") if row.get("event") == "start"]
        assert start[-1]["world_size"] == 2
        # Two processes each take half of every global batch, and each one's token loss is its share
        # of the global batch's mean: the run is the single-process one up to fp32 reduction order.
        assert losses(out, "loss") == pytest.approx(losses(single, "loss"), abs=1e-4)
        assert losses(out, "val_loss") == pytest.approx(losses(single, "val_loss"), abs=1e-4)
        two = weights(out)  # under FSDP gathered from the shards into one ordinary file
        assert two.keys() == one.keys()
        assert max(float((two[k] - one[k]).abs().max()) for k in one) < 1e-5, mode
        ck = load_checkpoint(latest_checkpoint(out / "checkpoints"))
        assert len(ck.rng) == 2 and ck.meta["world_size"] == 2  # each rank's RNG states, for an exact resume
        assert (ck.sharded is not None) == (mode == "fsdp")
    assert len(list(ck.sharded.glob("*.distcp"))) == 2  # each process wrote its own shards
    assert not (ck.path / "model.safetensors").exists()

    import omni

    assert isinstance(omni.load(tmp_path / "fsdp").generate("The", max_new_tokens=4), str)


def nan_gradients_at(steps: str) -> str:
    """A patch making the gradient NaN (the loss stays finite) at the training steps ``steps`` names."""
    return ("import omni.train.loop as L\nforward, calls = L._forward, [0]\n"
            "def _forward(model, batch):\n"
            "    out = forward(model, batch)\n"
            "    if model.training:\n"
            "        calls[0] += 1\n"
            f"        if calls[0] in {steps}: out.loss.register_hook(lambda g: g * float('nan'))\n"
            "    return out\n"
            "L._forward = _forward")


def test_non_finite_gradients_skip_the_update_and_are_counted(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(patched_cmd(nan_gradients_at("(5, 6, 17)"), "train", "text/tiny", *overrides(run_env, out)))
    assert r.returncode == 0, r.stderr
    assert "step 6: loss" in r.stderr and "gradient norm nan: update skipped (2 in a row)" in r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["step"] for row in rows if row.get("event") == "skipped_step"] == [5, 6, 17]
    assert rows[-2]["skipped_steps"] == 3  # the last log row
    ck = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ck.state.step == 30 and ck.state.skipped_steps == 3
    assert all(torch.isfinite(v).all() for v in weights(out).values())


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(run_env, tmp_path):
    out = tmp_path / "nan"
    r = run(patched_cmd(nan_gradients_at("range(5, 10**6)"), "train", "text/tiny",
                        *overrides(run_env, out, **{"train.save_every": 1, "train.keep_checkpoints": 20,
                                                    "train.max_skipped_steps": 3})))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert "gradient norm nan at step 7: 3 updates in a row skipped" in err, r.stderr
    assert "Traceback" not in r.stderr
    last = latest_checkpoint(out / "checkpoints")
    assert last.name == "step_00000004" and str(last) in err  # none written during the streak
    load_checkpoint(last)  # intact
    assert not (out / "model.safetensors").exists()


def test_weights_that_blow_up_are_never_checkpointed(run_env, tmp_path):
    out = tmp_path / "inf"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.lr": 1e30, "train.warmup_steps": 0, "train.save_every": 1, "train.grad_clip": 1e30})))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "Last good checkpoint" in err and ("NaN/inf" in err or "updates in a row skipped" in err), err
    for ck in (out / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(ck).model_state.values())
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


def test_a_run_folder_is_never_trained_over(run_env, tmp_path):
    out = tmp_path / "run"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.steps": 10})))
    assert r.returncode == 0, r.stderr
    def files(d):
        return {p.relative_to(d): p.read_bytes() for p in d.rglob("*")
                if p.is_file() and p.name != ".omni.lock"}

    before = files(out)
    for args, needle in ((["train.steps=20", "model.dim=96"], "model.dim: None -> 96"),  # a changed recipe
                         # and forced
                         (["train.steps=20", "model.dim=96", "train.resume_changed=true"], "shape"),
                         (["train.resume=false"], "already holds a run and train.resume=false")):
        r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{"train.steps": 10}), *args))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert needle in r.stderr.strip().splitlines()[-1], r.stderr
        assert files(out) == before
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.steps": 10, "train.resume": "false", "train.overwrite": "true", "train.lr": 0.01})))
    assert r.returncode == 0, r.stderr
    (aside,) = tmp_path.glob("run.old-*")
    assert files(aside) == before
    new, old = weights(out), weights(aside)  # a new run (another lr) beside the old one, kept whole
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)



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


def test_export_best_by_a_task_metric_from_the_starting_weights_on(run_env, tmp_path):
    """train.best_metric names a task's own score on its validation split (here the next-token
    accuracy, better higher); eval_at_start makes the starting weights a candidate too."""
    out = tmp_path / "best_acc"
    metric = "text.next_token_accuracy"
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, out, **{
        "train.export": "best", "train.best_metric": metric, "train.eval_at_start": "true",
        "train.keep_checkpoints": 3, "train.lr": 0.03, "train.warmup_steps": 0})))
    assert r.returncode == 0, r.stderr
    rows = read_metrics(out / "metrics.jsonl")
    scores = {row["step"]: row[f"val_{metric}"] for row in rows if f"val_{metric}" in row}
    assert sorted(scores) == [0, 10, 20, 30]
    assert all(0.05 < row["max_rss_gib"] < 8 for row in rows if "loss" in row)  # peak memory, on a CPU
    best = max(scores, key=scores.get)
    assert best > 0  # random weights are the worst
    (event,) = [row for row in rows if row.get("event") == "exported"]
    assert event["metric"] == metric and event["step"] == best
    assert event["value"] == pytest.approx(scores[best], abs=1e-5)
    exported = weights(out)
    ck = load_tensors(out / "checkpoints" / f"step_{best:08d}" / "model.safetensors")
    assert all(torch.equal(exported[k], ck[k]) for k in ck)


def test_best_metric_errors(run_env, tmp_path):
    with pytest.raises(ValueError, match=r"<task label>.<metric> with a task of data \(text\)"):
        load_recipe("text/tiny", overrides(run_env, tmp_path / "a", **{"train.best_metric": "asr.wer"}))
    cfg = load_recipe("text/tiny", overrides(run_env, tmp_path / "b", **{"train.best_metric": "text.ppl"}))
    with pytest.raises(ValueError, match="scores generated outputs: train with `omni train`"):
        Trainer(cfg)  # no scorer to compute it with
    r = run(omni_cmd("train", "text/tiny", *overrides(run_env, tmp_path / "c", **{
        "train.best_metric": "text.bleu4", "train.steps": 10})))
    assert r.returncode == 1 and "task text reports no number 'bleu4'; it reports loss, ppl" in r.stderr


def ddp_cmd(*args, script: Path | None = None) -> list[str]:
    """``omni`` (or ``script``) on 2 processes under ``accelerate launch``: its torchrun launcher
    (``--multi_gpu``) with gloo on CPU; DDP or FSDP as the recipe's ``train.parallel`` says."""
    target = [str(script)] if script else ["-m", "omni.cli"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *target, *map(str, args)]


KILL_AFTER_STEP_10 = """import os, signal, sys
import omni.train.loop as L
save = L.save_checkpoint
def save_checkpoint(*args, **kwargs):
    path = save(*args, **kwargs)
    if path.name == "step_00000010":  # the whole job (launcher and every rank), at once
        os.killpg(0, signal.SIGKILL)
    return path
L.save_checkpoint = save_checkpoint
from omni.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_fsdp_killed_after_a_checkpoint_resumes_exactly_and_exports_one_file(run_env, tmp_path):
    """SIGKILL a 2-process FSDP job right after its step-10 sharded checkpoint, resume it with the same
    command: the same weights, bit for bit, as an uninterrupted FSDP run; ``omni export`` of a sharded
    checkpoint gives the ordinary single-file model the run exported."""
    fsdp = {"train.parallel": "fsdp"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run(ddp_cmd("train", "text/tiny", *overrides(run_env, ref, **fsdp)))
    assert r.returncode == 0, r.stdout + r.stderr
    script = tmp_path / "killed_after_step_10.py"
    script.write_text(KILL_AFTER_STEP_10)
    subprocess.run(ddp_cmd("train", "text/tiny", *overrides(run_env, killed, **fsdp), script=script), env=ENV,
                   capture_output=True, timeout=300, start_new_session=True)
    assert latest_checkpoint(killed / "checkpoints").name == "step_00000010"
    assert not (killed / "model.safetensors").exists()
    r = run(ddp_cmd("train", "text/tiny", *overrides(run_env, killed, **fsdp)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stderr
    assert_same_weights(weights(ref), weights(killed))
    r = run(omni_cmd("export", latest_checkpoint(ref / "checkpoints"), "--out", tmp_path / "exported"))
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(ref), weights(tmp_path / "exported"))


@pytest.mark.slow
def test_ddp_killed_at_a_random_step_then_resumed_equals_uninterrupted(run_env, tmp_path):
    """Fault injection: SIGKILL the whole 2-process DDP job (launcher and ranks) at a random moment,
    then resume with the same command: the same weights, bit for bit, as an uninterrupted DDP run."""
    import random

    steps = {"train.steps": 120, "train.save_every": 10, "train.eval_every": 120, "train.log_every": 20}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = run(ddp_cmd("train", "text/tiny", *overrides(run_env, ref, **steps)), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    target = rng.randrange(10, 100, 10)
    proc = subprocess.Popen(ddp_cmd("train", "text/tiny", *overrides(run_env, killed, **steps)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(killed / "checkpoints" / f"step_{target:08d}" / "trainer_state.json", proc, timeout=300)
        time.sleep(rng.uniform(0, 0.5))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "model.safetensors").exists(), f"seed {seed}: the run ended before the kill"
    r = run(ddp_cmd("train", "text/tiny", *overrides(run_env, killed, **steps)), timeout=600)
    assert r.returncode == 0, f"seed {seed}: " + r.stdout + r.stderr
    assert "resumed from" in r.stderr
    assert_same_weights(weights(ref), weights(killed))


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200", 989e12), ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_peak_flops_by_device_name(monkeypatch, name, peak):
    from omni.train.loop import _peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert _peak_flops(torch.device("cuda")) == peak
    assert _peak_flops(torch.device("cpu")) is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_mixture_with_an_audio_tower_trains_on_two_processes(run_env, tone_speech, tmp_path, mode):
    """Text rows and speech rows (a cross-attention audio tower with a CTC head) mixed: micro-batches
    where one process holds audio and the other none run without a hang, in training and evaluation,
    and follow the single-process run: the token and CTC losses are each process's share of the
    global micro-batch's mean."""
    import yaml

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mix_debug",
        "model": {"size": "debug", "max_seq_len": 64, "cross_attention": {"every": 1, "media": ["audio"]},
                  "media": {"audio": {"encoder": {"kind": "whisper_style", "size": "debug", "subsample": 4},
                                      "connector": {"kind": "mlp"}, "ctc_weight": 0.5}}},
        "tokenizer": {"path": str(run_env / "tok")},
        "data": {"seq_len": 64, "mixture": [
            {"task": "caption", "media": "audio", "target": "text", "path": str(tone_speech), "name": "asr"},
            {"task": "text", "path": str(run_env / "data"), "name": "text"}]},
        "train": {"batch_size": 4, "steps": 8, "warmup_steps": 2, "lr": 0.003, "eval_every": 4,
                  "eval_batches": 2, "save_every": 4, "log_every": 1, "progress": False,
                  "mixed_precision": "no"}}))
    single, two = tmp_path / "single", tmp_path / mode
    r = run(omni_cmd("train", recipe, f"train.out_dir={single}"))
    assert r.returncode == 0, r.stderr
    r = run(ddp_cmd("train", recipe, f"train.out_dir={two}", f"train.parallel={mode}"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

    def losses(d, key):
        return [r[key] for r in read_metrics(d / "metrics.jsonl") if key in r]

    assert len(losses(two, "loss")) == 8 and len(losses(two, "val_loss")) == 2
    assert losses(two, "loss") == pytest.approx(losses(single, "loss"), abs=1e-4)
    assert losses(two, "val_loss") == pytest.approx(losses(single, "val_loss"), abs=1e-4)
