"""docs/api.md runs: every python block, in order, in one namespace, against a small checkpoint
that reads images and audio and writes text and audio."""

import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model

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
    model = build_model(backbone_config("debug", max_seq_len=1024), Vocab(v.text_size, v.specials, codec.num_codebooks,
                        codec.cardinality), text_tokenizer, seed=0, media=media, codec=codec)
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
        assert re.search(rf"^def {name}\(", candidates[0].read_text(encoding="utf-8"), re.M), f"{file}::{name} not found"
