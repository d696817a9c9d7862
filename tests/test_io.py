import os

import pytest
import torch

from omni import io


def test_atomic_write_bytes_writes_and_overwrites(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    io.atomic_write_bytes(p, b"one")
    io.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(p.parent) == ["f.bin"]


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_atomic_write_bytes_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "f.bin"
    p.write_bytes(b"original")

    def boom(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(io.os, fail_at, boom)
    with pytest.raises(OSError, match="simulated crash"):
        io.atomic_write_bytes(p, b"new content " * 1000)
    monkeypatch.undo()
    assert p.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_json_round_trip(tmp_path):
    import json

    io.atomic_write_json(tmp_path / "a.json", {"b": [1, 2], "a": "é"})
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": [1, 2], "a": "é"}


def test_tensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).to(torch.bfloat16).t()}
    io.save_tensors(tmp_path / "t.safetensors", t, metadata={"format": "pt"})
    back = io.load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_load_tensors_on_damaged_file_names_it(tmp_path, damage):
    p = tmp_path / "t.safetensors"
    io.save_tensors(p, {"a": torch.randn(64, 64)})
    data = p.read_bytes()
    p.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a safetensors file",
                   "empty": b""}[damage])
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        io.load_tensors(p)
    assert str(p) in str(e.value)


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        io.load_tensors(tmp_path / "nope.safetensors")


def test_jsonl_round_trip(tmp_path):
    rows = [{"id": 1, "text": "héllo 日本"}, {"id": 2, "text": "a\nb"}]
    assert io.write_jsonl(tmp_path / "m.jsonl", rows) == 2
    assert list(io.read_jsonl(tmp_path / "m.jsonl")) == rows
    assert io.write_jsonl(tmp_path / "e.jsonl", []) == 0
    assert list(io.read_jsonl(tmp_path / "e.jsonl")) == []


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert [r["a"] for r in io.read_jsonl(p)] == [1, 2]


@pytest.mark.parametrize("bad_line,expect", [(b'{"a": 1,}', "not valid JSON"),
                                             (b'{"a": "\xff\xfe"}', "not UTF-8"),
                                             (b"[1, 2]", "expected a JSON object")])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad_line, expect):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"a": 1}\n\n' + bad_line + b"\n")
    it = io.read_jsonl(p)
    assert next(it) == {"a": 1}  # rows before the bad line still come through
    with pytest.raises(ValueError, match=expect) as e:
        next(it)
    assert f"{p}:3:" in str(e.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl"):
        list(io.read_jsonl(tmp_path / "nope.jsonl"))


def test_replace_dir(tmp_path):
    final, tmp = tmp_path / "ckpt", tmp_path / "new"
    final.mkdir()
    (final / "x").write_text("old")
    tmp.mkdir()
    (tmp / "x").write_text("new")
    io.replace_dir(tmp, final)
    assert (final / "x").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from omni.io import atomic_write_bytes, default_mode, temp_dir

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644 == default_mode()
        assert temp_dir(tmp_path, ".t").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)


def test_exclusive_refuses_a_second_writer_and_names_the_holder(tmp_path):
    import subprocess
    import sys

    # the holder is another process, as two `omni train` on one folder would be
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from omni.io import exclusive\n"
        f"with exclusive({str(tmp_path)!r}, 'run'):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(io.LockedError,
                           match=rf"this run is being written by another process \(pid {holder.pid} "):
            with io.exclusive(tmp_path, "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with io.exclusive(tmp_path, "run"):  # the kernel released the dead holder's lock
        pass


def test_exclusive_is_not_reentrant_within_one_process(tmp_path):
    with io.exclusive(tmp_path, "corpus"):
        with pytest.raises(io.LockedError):
            with io.exclusive(tmp_path, "corpus"):
                pass


def test_a_folder_replaced_while_locked_stays_locked(tmp_path):
    """A codec trained into its folder replaces that folder at every save: the lock must survive."""
    final = tmp_path / "codec"
    with io.exclusive(final, "codec"):
        for version in ("one", "two"):
            tmp = io.temp_dir(tmp_path, ".codec.")
            (tmp / "model.safetensors").write_text(version)
            io.replace_dir(tmp, final)
            with pytest.raises(io.LockedError, match="this codec is being written"):
                with io.exclusive(final, "codec"):
                    pass
        assert (final / "model.safetensors").read_text() == "two"
    with io.exclusive(final, "codec"):  # released with the holder
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codec"]


def test_atomic_dir_appears_whole_and_replaces_the_old_folder(tmp_path):
    final = tmp_path / "codec"
    with io.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".codec.tmp") and not final.exists()
        (tmp / "a").write_text("one")
    assert (final / "a").read_text() == "one"
    (final / "stale").write_text("x")
    with io.atomic_dir(final) as tmp:
        (tmp / "a").write_text("two")
    assert sorted(os.listdir(final)) == ["a"] and (final / "a").read_text() == "two"
    assert sorted(os.listdir(tmp_path)) == ["codec"]


def test_atomic_dir_failure_leaves_the_old_folder_and_no_temp(tmp_path):
    final = tmp_path / "ckpt"
    with io.atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="simulated crash"), io.atomic_dir(final) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("simulated crash")
    assert (final / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_dir_keeps_a_held_lock(tmp_path):
    final = tmp_path / "codec"
    with io.exclusive(final, "codec"):
        with io.atomic_dir(final) as tmp:
            (tmp / "a").write_text("x")
        with pytest.raises(io.LockedError, match="this codec is being written"), io.exclusive(final, "codec"):
            pass


def test_atomic_dir_merge_keeps_other_files_and_writes_last_at_the_end(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "old.model").write_text("old")
    order = []
    replace = io.os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (order.append(os.path.basename(b)), replace(a, b)))
    with io.atomic_dir(run, merge=True) as tmp:
        for name in ("config.json", "model.safetensors"):
            (tmp / name).write_text("new")
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "text.model").write_text("new")
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "metrics.jsonl", "model.safetensors",
                                       "tokenizer"]
    assert os.listdir(run / "tokenizer") == ["text.model"]
    assert [n for n in order if not n.startswith(".")] == ["tokenizer", "model.safetensors", "config.json"]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    with io.atomic_dir(tmp_path / "fresh", merge=True) as tmp:  # no folder yet: it appears whole
        (tmp / "config.json").write_text("{}")
    assert os.listdir(tmp_path / "fresh") == ["config.json"]
