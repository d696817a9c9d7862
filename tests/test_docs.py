"""docs/api.md runs: every python block, in order, in one namespace, against a small checkpoint
that reads images and audio and writes text and audio. README.md's "Use it" blocks run as pasted:
the Python one against tiny runs, the shell one (slow) top to bottom in a fresh directory."""

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_examples_run(tmp_path, text_tokenizer, capsys):
    from PIL import Image as PILImage

    from omni.tokenizers.audio import AudioCodec
    from omni.vocab import Vocab

    torch.manual_seed(0)
    codec = AudioCodec("debug")
    v = text_tokenizer.vocab
    media = {"image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                       "connector": {"kind": "mlp"}},
             "audio": {"encoder": {"kind": "whisper_style", "size": "debug", "subsample": 4},
                       "connector": {"kind": "mlp"}}}
    vocab = Vocab(v.text_size, v.specials, codec.num_codebooks, codec.cardinality)
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=1024), vocab, seed=0, media=media),
                     tokenizer=text_tokenizer, codec=codec)
    model.save_pretrained(tmp_path / "ckpt")
    PILImage.fromarray(np.full((40, 40, 3), (0, 160, 0), np.uint8)).save(tmp_path / "frog.png")
    sf.write(tmp_path / "speech.wav", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    out = tmp_path / "out"
    out.mkdir()
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 8
    namespace = {"CKPT": tmp_path / "ckpt", "IMAGE": tmp_path / "frog.png", "SPEECH": tmp_path / "speech.wav",
                 "OUT": out}
    for n, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/api.md block {n + 1}", "exec"), namespace)
        except Exception as e:  # name the block that broke
            raise AssertionError(f"docs/api.md block {n + 1} failed: {e!r}\n{block}") from e
    printed = capsys.readouterr().out
    assert "['text', 'audio', 'image', 'audio codes']" in printed and "missing.wav" in printed
    assert (out / "continuation.wav").is_file() and (out / "copy" / "config.json").is_file()
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "omni_media.json").is_file()
    assert isinstance(namespace["caption"], str) and len(namespace["answers"]) == 2
    assert len(namespace["texts"]) == 2 and namespace["new_ids"].shape == (1, 4)


def test_every_test_reliability_md_names_exists():
    """docs/reliability.md says which test holds each promise: each one it names must exist."""
    doc = DOC.with_name("reliability.md").read_text(encoding="utf-8")
    tests = Path(__file__).resolve().parent
    refs = re.findall(r"`(?:\*slow\* )?([\w/]*test_\w+\.py)::(test_\w+)", doc)
    assert len(refs) >= 30
    for file, name in refs:
        candidates = [p for p in tests.rglob(Path(file).name) if str(p).endswith(file)]
        assert len(candidates) == 1, f"{file}: {len(candidates)} files match"
        assert re.search(rf"^def {name}\(", candidates[0].read_text(encoding="utf-8"), re.M), (
            f"{file}::{name} not found")


README = DOC.parents[1] / "README.md"


def readme_block(lang: str, after: str = "## Use it") -> str:
    """The first ``lang`` code block of README.md after the heading ``after``."""
    text = README.read_text(encoding="utf-8")
    return re.search(rf"```{lang}\n(.*?)```", text[text.index(after):], flags=re.DOTALL).group(1)


def _tiny_runs(root: Path, text_tokenizer) -> None:
    """The runs README's Python block loads, as ``omni train`` lays them out, at the debug size, and
    the media files it reads, under ``root``."""
    import yaml
    from PIL import Image as PILImage

    from omni.config import load_recipe
    from omni.pipeline import pipeline_from_recipe
    from omni.tokenizers.audio import AudioCodec

    torch.manual_seed(0)
    AudioCodec("tiny").save(root / "codec")  # 50 frames/s: three seconds fit the recipe's context
    for recipe, overrides in (("text/tiny", []),
                              ("whisper/asr_tiny", ["model.media.audio.encoder.size=debug"]),
                              ("audiolm/continue_tiny", [f"codec.path={root / 'codec'}"]),
                              ("llava/caption_tiny", ["model.media.image.tokenizer.size=debug"])):
        cfg = load_recipe(recipe, ["model.size=debug", *overrides])
        run = root / cfg.train.out_dir
        pipeline_from_recipe(cfg, text_tokenizer).save_pretrained(run)
        (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for name, seconds in (("speech.wav", 1.0), ("prompt.wav", 0.5)):
        sf.write(root / name, (0.1 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype(np.float32), 16000)
    for name, color in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200)), ("c.png", (0, 160, 0))):
        PILImage.fromarray(np.full((40, 40, 3), color, np.uint8)).save(root / name)


def test_readme_python_block_runs_as_pasted_into_an_interactive_session(tmp_path, monkeypatch, text_tokenizer,
                                                                        capsys):
    """README.md's Python block, line by line through an interactive console (a compound statement
    needs its blank line there), against tiny runs where `omni train` would have put them."""
    import code

    block = readme_block("python")
    monkeypatch.chdir(tmp_path)
    _tiny_runs(tmp_path, text_tokenizer)

    class Console(code.InteractiveConsole):
        def showsyntaxerror(self, filename=None, **kwargs):
            raise AssertionError(f"README.md's Python block is not valid as pasted: {self.buffer}")

        def runcode(self, code_obj):  # an exception fails the test instead of being printed
            exec(code_obj, self.locals)

    console = Console()
    more = False
    for line in block.splitlines():
        more = console.push(line)
    assert not more, "the block ends inside a statement"
    namespace = console.locals
    assert namespace["new_ids"].dim() == 2 and namespace["new_ids"].dtype == torch.long
    assert (tmp_path / "out.wav").is_file() and "hf" not in namespace
    assert capsys.readouterr().out  # the expressions' values, as a session shows them


# What each command of the "Use it" block gets appended so the whole block runs in minutes on a CPU:
# fewer steps, fewer documents, the debug model size (README's own values stay as written before them).
TINY_TRAIN = ("model.size=debug train.steps=2 train.warmup_steps=1 train.eval_every=2 train.save_every=2 "
              "train.eval_batches=1 train.progress=false")
TINY = {"omni train ": TINY_TRAIN, "accelerate launch ": TINY_TRAIN,
        "omni data build text ": "", "omni data build speech ": "--max-docs 40",
        "omni data build sounds ": "--max-docs 30", "omni data build images ": "--max-docs 30",
        "omni data build video ": "--max-docs 30", "omni tokenizer train text_spm": "",
        "omni tokenizer train audio_codec_tiny": "steps=2 num_val_clips=2",
        "omni eval ": "--max-rows 2", "omni generate ": "", "omni transcribe ": "", "omni caption ": "",
        "omni demo ": ("--max-docs 30 --codec-minutes 0.02 --eval-rows 2 model.size=debug train.steps=2 "
                       "train.warmup_steps=1 train.batch_size=4 train.eval_batches=1 train.progress=false"),
        ". .venv/bin/activate": ""}


def tiny_command(command: str) -> str:
    """One command of the block with its tiny overrides appended; an unknown command fails the test, so
    a line added to the block is run here too."""
    prefix = next((p for p in TINY if command.startswith(p)), None)
    assert prefix is not None, f"tests/test_docs.py does not know how to shrink `{command}`: add it to TINY"
    return f"{command} {TINY[prefix]}".rstrip()


def _fake_venv(root: Path) -> None:
    """``.venv/bin/activate`` in ``root`` that puts an ``omni`` command running this checkout (and the
    Python that runs the tests, with accelerate) on PATH, as the README's set-up would."""
    import sys

    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "omni").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m omni.cli "$@"\n')
    (bin_dir / "omni").chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH"\n'
                                      f'export PYTHONPATH="{README.parent}" HF_HUB_OFFLINE=1\n')


def _own_media(root: Path) -> None:
    """The files the block names as the reader's own: a meeting, an audio prompt, a photo, a clip."""
    from PIL import Image as PILImage

    from omni.media.video import write_video

    t = np.arange(16000 * 9) / 16000
    meeting = 0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(t))
    sf.write(root / "meeting.wav", meeting.astype(np.float32), 16000)
    sf.write(root / "prompt.wav", (0.1 * np.sin(2 * np.pi * 330 * t[:16000])).astype(np.float32), 16000)
    PILImage.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(root / "photo.png")
    frames = torch.zeros(16, 3, 64, 64, dtype=torch.uint8)
    for i in range(16):
        frames[i, 1, 20:36, 2 * i:2 * i + 16] = 220  # a green square moving right
    write_video(root / "clip.mp4", frames, fps=8.0)


@pytest.mark.slow
def test_readme_use_it_block_runs_top_to_bottom(tmp_path):
    """README.md's "Use it" shell block, in a fresh directory, top to bottom in one bash: each command
    as written with tiny overrides appended (TINY), so every step's inputs come from the steps before."""
    import os
    import subprocess
    import time

    lines = []
    for line in readme_block("bash").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line:
            lines.append(" && ".join(tiny_command(c.strip()) for c in line.split(" && ")))
    assert lines[0] == ". .venv/bin/activate" and any(x.startswith("omni demo") for x in lines)
    _fake_venv(tmp_path)
    _own_media(tmp_path)
    script = "set -euo pipefail\n" + "".join(f"echo '+ {x}' >&2\n{x}\n" for x in lines)
    start = time.perf_counter()
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=3600,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=False)
    took = time.perf_counter() - start
    assert run.returncode == 0, (f"the block stopped after {took:.0f} s at the last command below\n"
                                 f"{run.stderr[-6000:]}\n--- stdout ---\n{run.stdout[-3000:]}")
    for path in ("runs/text_tiny/model.safetensors", "runs/text_tiny_ddp/model.safetensors", "out.wav",
                 "runs/whisper_asr_tiny/eval_test.json", "runs/any2any_tiny/eval_test.json",
                 "runs/demo/report.md"):
        assert (tmp_path / path).is_file(), path
    for media in ("meeting.wav", "photo.png", "clip.mp4"):  # transcribed, captioned
        assert re.search(rf"^{re.escape(media)}\t", run.stdout, re.MULTILINE), media
