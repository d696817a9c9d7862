import os

import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
torch.manual_seed(0)


# --- shared fixtures for the unit tests (tests/ mirrors omni/) ---------------------------------

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS_DOCS = 300  # the first 300 Wikipedia summaries (sorted by title)
CORPUS_VAL_DOCS = 20  # the last 20 of them go to val.jsonl
TOKENIZER_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory with ``train.jsonl`` (280 docs) and ``val.jsonl`` (20 docs) of real English text."""
    from omni.data.text import wiki_documents

    docs = wiki_documents()[:CORPUS_DOCS]
    assert len(docs) == CORPUS_DOCS
    out = tmp_path_factory.mktemp("tiny_corpus")
    for name, rows in (("train", docs[:-CORPUS_VAL_DOCS]), ("val", docs[-CORPUS_VAL_DOCS:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def text_tokenizer(tiny_corpus):
    """A SentencePiece tokenizer (512 pieces) trained once on ``tiny_corpus/train.jsonl``."""
    from omni.tokenizers.text import TextTokenizer

    lines = (tiny_corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return TextTokenizer.train([json.loads(line)["text"] for line in lines], vocab_size=TOKENIZER_VOCAB,
                               seed=0)


@pytest.fixture(scope="session")
def debug_model(text_tokenizer):
    """The ``debug`` backbone with tied embeddings, seeded, as a pipeline; in eval mode.
    Do not modify it in a test."""
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model
    from omni.pipeline import Pipeline

    return Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0),
                    tokenizer=text_tokenizer).eval()


@pytest.fixture(scope="session")
def sampling_model(text_tokenizer):
    """An untied ``debug`` model: its greedy output varies from step to step (a freshly initialised
    tied model mostly repeats its last token), so decoding tests can tell steps apart. Do not modify it."""
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model
    from omni.pipeline import Pipeline

    return Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, tie_embeddings=False, seed=0),
                    tokenizer=text_tokenizer).eval()


# --- another process writing a folder (omni.io.exclusive held elsewhere) ------------------------


def _hold_lock(folder, what, held):
    from omni.io import exclusive

    with exclusive(folder, what):
        held.set()
        time.sleep(60)


@pytest.fixture
def lock_held_elsewhere():
    """``with lock_held_elsewhere(folder, what) as pid:`` another process holds
    ``omni.io.exclusive(folder, what)`` meanwhile, as a second ``omni`` command would. The holder
    is forked, so it starts at once, without importing torch again."""
    import contextlib
    import multiprocessing

    @contextlib.contextmanager
    def hold(folder: Path, what: str):
        ctx = multiprocessing.get_context("fork")
        held = ctx.Event()
        holder = ctx.Process(target=_hold_lock, args=(folder, what, held), daemon=True)
        holder.start()
        try:
            assert held.wait(30), "the lock holder did not start"
            yield holder.pid
        finally:
            holder.kill()
            holder.join()

    return hold


@pytest.fixture
def folder_files():
    """``folder_files(folder)``: every file under ``folder`` but the lock file, by relative path,
    with its bytes: to show that a refused writer changed nothing."""
    def files(folder: Path) -> dict[str, bytes]:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and p.name != ".omni.lock"}

    return files


# --- a small fake Tux Paint stamps folder laid out like the real one (corpus builders, stages) ---
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect x="0" y="0" width="40" height="20" fill="#0000ff"/></svg>')


def write_ogg(path: Path, seconds: float = 0.5, freq: float = 440.0) -> Path:
    """An Ogg/Opus tone (PyAV's bundled FFmpeg encodes Opus; the real stamps' sounds are Ogg/Vorbis)."""
    import av

    sr = 48000
    wav = (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
    with av.open(str(path), "w", format="ogg") as c:
        s = c.add_stream("libopus", rate=sr)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wav[None], format="flt", layout="mono")
        frame.sample_rate = sr
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


def _png(path: Path, color, size=(60, 40)):
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[5:-5, 5:-5] = (*color, 255)  # an opaque box on a transparent margin
    PILImage.fromarray(arr, "RGBA").save(path)


def make_stamps(root: Path) -> Path:
    """animals/frog (png + sound), animals/frog-1 (same caption), vehicles/truck, vehicles/car,
    vehicles/bus, space/rocket (svg), plus things the builders must ignore or count as bad."""
    specs = {
        "animals/frog": ("A frog.", (0, 160, 0)),
        "animals/frog-1": ("A frog.", (0, 120, 0)),
        "vehicles/truck": ("A red truck.", (200, 0, 0)),
        "vehicles/car": ("A yellow car.", (220, 220, 0)),
        "vehicles/bus": ("A school bus that takes children to school every day.", (250, 150, 0)),
    }
    for name, (caption, color) in specs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        _png(p.with_suffix(".png"), color)
        text = f"{caption}\nfr.utf8=Traduit.\nen_GB.utf8={caption}\n"
        p.with_suffix(".txt").write_text(text, encoding="utf-8")
    write_ogg(root / "animals" / "frog.ogg")
    (root / "animals" / "frog_desc.ogg").write_bytes(b"spoken description: not a sound effect")
    (root / "space").mkdir()
    (root / "space" / "rocket.svg").write_text(SVG)
    (root / "space" / "rocket.txt").write_text("de.utf8=Eine Rakete.\nen.utf8=A rocket.\n", encoding="utf-8")
    _png(root / "space" / "mirror_only.png", (1, 2, 3))  # no caption: ignored
    (root / "space" / "orphan.txt").write_text("An orphan caption.\n")  # no image: ignored
    (root / "space" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "space" / "broken.txt").write_text("A broken stamp.\n")
    return root


@pytest.fixture
def fake_stamps(tmp_path) -> Path:
    return make_stamps(tmp_path / "stamps")
