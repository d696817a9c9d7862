"""omni.progress: bars on a terminal's stderr in the work's own units, nothing in a pipe or a log
unless forced."""

import io

from omni.progress import progress, progress_enabled


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
    assert out == err == ""  # captured stderr is not a terminal: off
    assert list(progress(range(7), desc="encoding data/speech/train.jsonl", unit="row", enabled=True)) == \
        list(range(7))
    out, err = capsys.readouterr()
    assert out == "" and "encoding data/speech/train.jsonl" in err and "7/7" in err and "row" in err
    monkeypatch.setenv("OMNI_PROGRESS", "1")
    with progress(total=3, desc="scoring", unit="clip") as bar:
        bar.update(3)
    assert "3/3" in capsys.readouterr().err
