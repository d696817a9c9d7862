"""omni.progress: bars on a terminal's stderr in the work's own units; in a pipe or a log a line
every ~10% (unit, count, rate, ETA); nothing when turned off."""

import io
import logging
import re
import time

from omni.progress import progress, progress_enabled, progress_mode, ticking


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_is_drawn_on_a_terminal_and_not_in_a_pipe_unless_forced(monkeypatch):
    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    assert progress_enabled(stream=_Terminal()) is True
    assert progress_enabled(stream=io.StringIO()) is False  # a pipe or a log file
    monkeypatch.setenv("OMNI_PROGRESS", "1")
    assert progress_enabled(stream=io.StringIO()) is True
    monkeypatch.setenv("OMNI_PROGRESS", "0")
    assert progress_enabled(stream=_Terminal()) is False
    assert progress_enabled(True, stream=io.StringIO()) is True
    assert progress_enabled(False, stream=_Terminal()) is False


def test_the_bar_counts_the_work_in_its_units_on_stderr(capsys, monkeypatch):
    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    assert list(progress(range(7), desc="encoding data/speech/train.jsonl", unit="row")) == list(range(7))
    out, err = capsys.readouterr()
    assert out == err == ""  # captured stderr is not a terminal: no bar (log lines instead)
    assert list(progress(range(7), desc="encoding data/speech/train.jsonl", unit="row", enabled=True)) == \
        list(range(7))
    out, err = capsys.readouterr()
    assert out == "" and "encoding data/speech/train.jsonl" in err and "7/7" in err and "row" in err
    monkeypatch.setenv("OMNI_PROGRESS", "1")
    with progress(total=3, desc="scoring", unit="clip") as bar:
        bar.update(3)
    assert "3/3" in capsys.readouterr().err


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "omni.progress"]


def test_without_a_terminal_a_line_is_logged_every_tenth(caplog, monkeypatch):
    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        list(progress(range(50), desc="a short step", unit="file", mininterval=0))
    assert [line.split(":")[1].split()[0] for line in _lines(caplog)] == ["0%", "100%"]  # its start and end
    caplog.clear()
    monkeypatch.setattr("omni.progress.LOG_AFTER_S", 0.0)  # as if every step were long
    assert progress_mode(stream=io.StringIO()) == "log" and progress_mode(stream=_Terminal()) == "bar"
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        assert list(progress(range(50), desc="speaking into data/speech", unit="utterance",
                             mininterval=0)) == list(range(50))
    lines = _lines(caplog)
    assert len(lines) == 11, lines  # the start, then every 10%: one line each, none twice
    percents = [int(re.search(r": (\d+)% ", line)[1]) for line in lines]
    assert percents == list(range(0, 101, 10))
    half = lines[5]
    assert half.startswith("speaking into data/speech: 50% 25/50 utterance [")  # unit and count
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+utterance/s\]$", half), half  # elapsed<ETA, rate
    caplog.clear()
    monkeypatch.setenv("OMNI_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        list(progress(range(50), desc="off", mininterval=0))
        list(progress(range(50), desc="off", enabled=False, mininterval=0))
    assert _lines(caplog) == []


def test_ticking_runs_against_an_estimate_and_ends_at_100(caplog, monkeypatch):
    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        with ticking("training the tokenizer", estimate_s=10, tick_s=0.01):
            time.sleep(0.08)
    lines = _lines(caplog)
    assert lines[0].startswith("training the tokenizer: 0% [") and "estimated" in lines[0]
    assert lines[-1].startswith("training the tokenizer: 100% [")


def test_ticking_past_its_estimate_keeps_moving(caplog, monkeypatch):
    """A step that runs 3x its estimate extends it, so a log keeps getting lines instead of going
    silent at the last second of the estimate."""
    import omni.progress

    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    monkeypatch.setattr(omni.progress, "LOG_AFTER_S", 0)
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        with ticking("training the tokenizer", estimate_s=10, tick_s=0.02) as bar:
            time.sleep(1.6)  # the bar redraws (here: logs) every 0.5 s
            ticked, total = bar.n, bar.total
    assert ticked > 10 and total > 10  # ticked on past the 10-s estimate, which grew
    percents = [int(line.split(": ")[1].split("%")[0]) for line in _lines(caplog)]
    assert len(percents) >= 4 and percents[-1] == 100
    assert all(p < 100 for p in percents[:-1])  # never 100% before the step ends


def test_rendering_a_task_reports_its_rows(caplog, monkeypatch, tiny_corpus, debug_model):
    """One long phase end to end: rendering a manifest logs its progress in its rows (documents)."""
    from omni.data.tasks import TaskSpec, manifest_samples

    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        samples = manifest_samples(tiny_corpus / "val.jsonl", TaskSpec("text"), debug_model, seq_len=64,
                                   progress=None)
    lines = _lines(caplog)
    assert len(samples) == 20 and lines
    assert lines[0].startswith(f"tokenizing {tiny_corpus / 'val.jsonl'}: 0% 0/20 doc")
    assert lines[-1].startswith(f"tokenizing {tiny_corpus / 'val.jsonl'}: 100% 20/20 doc")


def test_training_keeps_its_progress_line(caplog, monkeypatch, tmp_path, tiny_corpus, text_tokenizer):
    """Training's line in a log: step count, loss, tokens/s and the ETA (under a time budget, also
    the budget's, which may end the run before the last step)."""
    from omni.config import load_recipe
    from omni.train import train

    monkeypatch.delenv("OMNI_PROGRESS", raising=False)
    steps = 4
    text_tokenizer.save(tmp_path / "tok")
    cfg = load_recipe("text/tiny", [
        "model.size=debug", f"data.path={tiny_corpus}", f"tokenizer.path={tmp_path / 'tok'}",
        f"train.out_dir={tmp_path / 'run'}", f"train.steps={steps}", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=1", "train.batch_size=2", "data.seq_len=32",
        "model.max_seq_len=32",
        "train.warmup_steps=1", "train.max_minutes=30"])
    with caplog.at_level(logging.INFO, logger="omni.progress"):
        train(cfg)
    lines = [line for line in _lines(caplog) if line.startswith("train ")]
    assert lines[-1].startswith(f"train text/tiny: 100% {steps}/{steps} step [")
    assert re.search(r"<\d\d:\d\d, +[\d.]+step/s, ", lines[-1]), lines  # elapsed<ETA (steps), rate
    for part in (r"loss=[\d.]+", r"tok_s=[\d,]+", r"eta=00:00:00"):  # eta: the nearer of steps and budget
        assert re.search(part, lines[-1]), (part, lines[-1])
