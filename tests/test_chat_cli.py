"""``omni chat``: the REPL on stdin and the --message runs for scripts (in-process, debug checkpoints)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image as PILImage

import omni
from omni.cli import main
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline


@pytest.fixture(scope="module")
def ckpt(sampling_model, tmp_path_factory):
    """A text-only checkpoint (512-token context) whose greedy answers vary from step to step."""
    return sampling_model.save_pretrained(tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def image_ckpt(text_tokenizer, tmp_path_factory):
    """A checkpoint that reads images (a debug SigLIP tower), and an image it can read."""
    root = tmp_path_factory.mktemp("chat_image")
    media = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                       "connector": {"kind": "mlp"}}}
    net = build_model(backbone_config("debug"), text_tokenizer.vocab, tie_embeddings=False, seed=0,
                      media=media)  # untied: its greedy answer is not empty
    model = Pipeline(net, tokenizer=text_tokenizer)
    PILImage.fromarray(np.full((40, 40, 3), (0, 160, 0), np.uint8)).save(root / "frog.png")
    return model.save_pretrained(root / "ckpt"), root / "frog.png"


def _stdin(monkeypatch, *lines: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))


def _printed(answers: list[str]) -> str:
    return "".join(a.lstrip() + "\n" for a in answers)


def test_messages_run_non_interactively_and_keep_the_conversation(ckpt, capsys):
    kw = dict(max_new_tokens=6)
    chat = omni.Chat(omni.load(ckpt), system="Be brief.")
    expected = [chat("Zero is", **kw), chat("And one?", **kw)]
    assert main(["chat", "--ckpt", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "6",
                 "--message", "Zero is", "--message", "And one?"]) == 0
    assert capsys.readouterr().out == _printed(expected)


def test_sampling_flags_reach_generation(ckpt, capsys):
    base = ["chat", "--ckpt", str(ckpt), "--max-new-tokens", "8", "--message", "Zero is"]
    assert main(base) == 0
    greedy = capsys.readouterr().out.rstrip("\n")
    stop = greedy[3:6]
    assert stop.strip()
    assert main(base + ["--stop", "qqq", "--stop", stop]) == 0
    assert capsys.readouterr().out == greedy[: greedy.index(stop)] + "\n"
    model = omni.load(ckpt)
    for flags, kw in ((["--repetition-penalty", "1.5"], dict(repetition_penalty=1.5)),
                      (["--temperature", "1", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
                       dict(temperature=1.0, top_k=20, top_p=0.9, seed=3))):
        assert main(base + flags) == 0
        assert capsys.readouterr().out == _printed([omni.Chat(model)("Zero is", max_new_tokens=8, **kw)])
    int8 = omni.load(ckpt, quantize="int8")  # --int8 answers as the int8 model does
    assert main(base + ["--int8"]) == 0
    assert capsys.readouterr().out == _printed([omni.Chat(int8)("Zero is", max_new_tokens=8)])
    with pytest.raises(ValueError, match="quantize='int4'"):
        omni.load(ckpt, quantize="int4")


def test_repl_streams_answers_and_takes_commands(ckpt, tmp_path, monkeypatch, capsys):
    _stdin(monkeypatch, "Zero is", f"/save {tmp_path / 'one.json'}", "/system Be brief.", "",
           "Hello", f"/save {tmp_path / 'two.json'}", "/reset", f"/save {tmp_path / 'three.json'}",
           "/bogus", "/save", "/exit", "never answered")
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    model = omni.load(ckpt)
    first = omni.Chat(model)("Zero is", max_new_tokens=5)
    second = omni.Chat(model, system="Be brief.")("Hello", max_new_tokens=5)
    assert out == _printed([first, second]) and first.strip() and second.strip()

    def saved(name):
        return json.loads((tmp_path / name).read_text())["messages"]

    assert saved("one.json") == [{"role": "user", "content": "Zero is"},
                                 {"role": "assistant", "content": first.strip()}]
    system = {"role": "system", "content": "Be brief."}
    assert saved("two.json") == [system, {"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": second.strip()}]
    assert saved("three.json") == [system]
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 2 and "unknown command /bogus" in errors[0] and "/save needs a FILE" in errors[1]


def test_repl_ends_at_end_of_input(ckpt, monkeypatch, capsys):
    _stdin(monkeypatch, "Zero is")
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 1


def test_bad_input_is_a_one_line_error(ckpt, tmp_path, monkeypatch, capsys):
    image = tmp_path / "x.png"
    PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for argv, needle in (
            (["--ckpt", str(tmp_path / "nope"), "--message", "hi"], "checkpoint directory not found"),
            (["--ckpt", str(ckpt), "--attach", str(image), "--message", "hi"], "cannot read image"),
            (["--ckpt", str(ckpt), "--message", "hi", "--attach", str(image)], "goes before the --message"),
            (["--ckpt", str(ckpt), "--message", "hi", "--repetition-penalty", "0"], "repetition_penalty")):
        assert main(["chat", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    # in the REPL the error is reported and the conversation goes on
    _stdin(monkeypatch, f"/attach {image}", f"/attach {tmp_path / 'missing.wav'}", "Zero is")
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "cannot read image" in err and "missing.wav" in err
    assert out == _printed([omni.Chat(omni.load(ckpt))("Zero is", max_new_tokens=3)])


def test_attached_media_go_with_the_next_turn(image_ckpt, tmp_path, monkeypatch, capsys):
    ckpt, frog = image_ckpt
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model = omni.load(ckpt)
    turn = {"role": "user", "content": [omni.Image(frog), "What is this?"]}
    expected = model.generate([turn], max_new_tokens=4)
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "4", "--attach", str(frog),
                 "--message", "What is this?"]) == 0
    assert capsys.readouterr().out == _printed([expected]) and expected.strip()
    _stdin(monkeypatch, f"/attach {broken}", f"/attach {frog}", "What is this?",
           f"/save {tmp_path / 'c.json'}")
    assert main(["chat", "--ckpt", str(ckpt), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out == _printed([expected])
    assert "broken.png" in err and len([line for line in err.splitlines() if "error" in line]) == 1
    user = json.loads((tmp_path / "c.json").read_text())["messages"][0]
    assert user == {"role": "user", "content": [{"type": "image", "path": str(frog)},
                                                {"type": "text", "text": "What is this?"}]}
