"""``omni export --to hf|gguf``: omni checkpoints back out as transformers folders and GGUF files,
checked by loading them with transformers and comparing logits with omni's on the same ids."""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import omni
from omni.model.hf_export import export_hf
from omni.model.lora import LoraSpec, add_lora
from omni.sequence import Message, Sample, Segment, render

transformers = pytest.importorskip("transformers")

from tests.conftest import CHATML  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=128)
TOL = 1e-4  # fp32, transformers' eager attention against omni's sdpa


def _randomize(module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + scale * noise if name.endswith("norm.weight") else scale * noise)


def _hf_folder(path, cls_name, bpe_tokenizer, **overrides):
    """A random transformers checkpoint with bpe_tokenizer and the ChatML template."""
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    vocab = bpe_tokenizer.get_vocab_size()
    model = getattr(transformers, cls_name)(cfg_cls(**{**TINY, "vocab_size": vocab, **overrides})).eval()
    _randomize(model, 0)
    model.save_pretrained(path)
    bpe_tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "chat_template": CHATML}))
    return path


def _with_lora(model, seed=1):
    """LoRA adapters on every projection with random (non-zero) B, so merging them changes the logits."""
    torch.manual_seed(seed)
    add_lora(model, LoraSpec(r=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ids(vocab: int, B=2, T=20, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls_name,tied", [("LlamaForCausalLM", True), ("Qwen2ForCausalLM", False),
                                           ("MistralForCausalLM", True)])
def test_hf_export_matches_transformers(tmp_path, bpe_tokenizer, cls_name, tied):
    src = _hf_folder(tmp_path / "src", cls_name, bpe_tokenizer, tie_word_embeddings=tied)
    pipe = omni.import_hf(src)
    _with_lora(pipe.model)
    ids = _ids(pipe.vocab.text_size)
    with torch.no_grad():
        ours = pipe.model.logits(ids)
    out = export_hf(pipe.model, pipe.tokenizer, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == cls_name and hf.config.tie_word_embeddings is tied
    with torch.no_grad():
        ref = hf(ids).logits
    assert ref.shape == ours.shape  # every row omni has: the model's ids and omni's markers
    diff = _diff(ours, ref)
    print(f"hf {cls_name} lora-merged fp32 logits max abs diff {diff:.2e}")
    assert diff < TOL

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The cat sat on the mat. Hello world!"
    assert tok.encode(text, add_special_tokens=False) == pipe.tokenizer.encode(text)
    chat = [{"role": "user", "content": "Hello world!"}]
    sample = Sample([Message("user", [Segment("text", text="Hello world!")])])
    want = render(sample, pipe.tokenizer, add_generation_prompt=True).ids.tolist()
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) == want
    assert tok.convert_ids_to_tokens(pipe.vocab.id("<|image|>")) == "<|image|>"


def test_hf_export_model_vocab_is_the_original(tmp_path, bpe_tokenizer):
    """vocab='model' drops omni's markers: the folder has the imported model's shapes and tokenizer."""
    src = _hf_folder(tmp_path / "src", "LlamaForCausalLM", bpe_tokenizer)
    pipe = omni.import_hf(src)
    out = export_hf(pipe.model, pipe.tokenizer, tmp_path / "out", vocab="model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = _ids(bpe_tokenizer.get_vocab_size())
    with torch.no_grad():
        assert _diff(hf(ids).logits, orig(ids).logits) < TOL
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == bpe_tokenizer.get_vocab_size()


# --- GGUF ------------------------------------------------------------------------------------------

# max abs logit diff (logits' std ~0.8): f16 rounds each weight to 11 bits, q8_0 to 8 bits per 32-value
# block; transformers and omni's re-import dequantize the same file, so they agree with each other
GGUF_TOL = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.2}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_export_reloads_in_transformers(tmp_path, write_gguf, arch):
    """omni (an imported GGUF, LoRA merged) -> GGUF f32/f16/q8_0 -> transformers' GGUF loader: the
    same logits within each type's tolerance; omni's own import of the file gives them too."""
    from omni.model.gguf_export import export_gguf

    pipe = omni.import_hf(write_gguf(tmp_path / "src.gguf", arch=arch, tied=arch == "llama"))
    _with_lora(pipe.model)
    ids = _ids(pipe.vocab.text_size)
    with torch.no_grad():
        ours = pipe.model.logits(ids)
    for dtype in GGUF_TOL if arch == "llama" else ["f32"]:
        file = export_gguf(pipe.model, pipe.tokenizer, tmp_path / "out", dtype=dtype, overwrite=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                               dtype=torch.float32).eval()
        back = omni.import_hf(file)
        with torch.no_grad():
            ref, again = hf(ids).logits, back.model.logits(ids)
        diff = _diff(ref, ours)
        print(f"gguf {arch} {dtype}: transformers vs omni {diff:.2e}, vs omni's re-import of the file "
              f"{_diff(ref, again):.2e} (logits std {ours.std():.2f})")
        assert diff < GGUF_TOL[dtype]
        assert _diff(ref, again) < TOL  # the rounding is the type's alone: both read the same weights
        assert back.tokenizer.encode("The cat sat. 123") == pipe.tokenizer.encode("The cat sat. 123")
        assert back.tokenizer.chat_template == pipe.tokenizer.chat_template
        assert back.vocab == pipe.vocab


# --- Whisper ---------------------------------------------------------------------------------------


def test_whisper_export_is_a_transformers_whisper(whisper_ckpt, tmp_path):
    """An imported Whisper, fine-tuned (LoRA on the decoder, merged), goes back out as
    WhisperForConditionalGeneration with the same logits, tokenizer and prompt ids."""
    from omni.sequence import MediaSlot

    pipe = omni.load(whisper_ckpt)
    _with_lora(pipe.model)
    tok = pipe.tokenizer
    mel = torch.randn(80, 3000, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([tok.prompt("de") + tok.encode(" The cat sat on the mat")])
    with torch.no_grad():
        ours = pipe.model(ids, media=[(0, MediaSlot(0, 1500, "audio", mel))]).logits[..., :tok.model_ids]
    out = export_hf(pipe.model, tok, tmp_path / "out")
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_features=mel[None], decoder_input_ids=ids).logits
    diff = _diff(ours, ref)
    print(f"hf whisper lora-merged fp32 logits max abs diff {diff:.2e}")
    assert diff < TOL
    assert hf.generation_config.decoder_start_token_id == tok.sot
    assert hf.generation_config.lang_to_id["<|de|>"] == tok.languages["de"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(" The cat sat", add_special_tokens=False) == tok.encode(" The cat sat")
    assert len(hf_tok) == tok.model_ids
    fe = transformers.AutoFeatureExtractor.from_pretrained(out)
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(1)).numpy() * 0.1
    feats = fe(wave, sampling_rate=16000, return_tensors="pt").input_features[0]
    ours_feats, _ = pipe.processor.prepare("audio", omni.Audio(torch.from_numpy(wave), sample_rate=16000))
    assert _diff(feats, ours_feats) < 1e-3  # omni's log-mel is Whisper's front end


# --- a from-scratch omni model: its SentencePiece tokenizer, media encoders beside the LM ----------


def test_from_scratch_model_exports_with_its_sentencepiece_tokenizer(debug_model, tiny_corpus, tmp_path):
    """omni's own debug model (RMSNorm, SwiGLU, RoPE) -> LlamaForCausalLM with the same logits; its
    SentencePiece tokenizer -> a tokenizer.json that encodes every corpus line as SentencePiece does,
    and omni's chat layout as the chat template."""
    model = copy.deepcopy(debug_model.model)
    _randomize(model, 0)  # the fixture's init (std 0.02) gives logits too small to show a mistake
    out = export_hf(model, debug_model.tokenizer, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(debug_model.vocab.text_size)
    with torch.no_grad():
        ours = model.logits(ids)
        diff = _diff(hf(ids).logits, ours)
    print(f"hf from-scratch debug model fp32 logits max abs diff {diff:.2e} (logits std {ours.std():.2f})")
    assert diff < TOL
    tok, sp = transformers.AutoTokenizer.from_pretrained(out), debug_model.tokenizer
    lines = [json.loads(line)["text"] for line in (tiny_corpus / "val.jsonl").read_text().splitlines()]
    lines += ["  two  spaces, 12345 digits, émoji 😀 and ünïcödé \n new line"]
    for text in lines:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("Hi")[0] == sp.vocab.bos_id
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Paris?"}]
    sample = Sample([Message(m["role"], [Segment("text", text=m["content"])]) for m in chat])
    want = render(sample, sp, add_generation_prompt=True).ids.tolist()
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == want


def test_multimodal_export_writes_the_lm_and_its_encoders_beside_it(text_tokenizer, tmp_path):
    """An image model: the LM as LlamaForCausalLM, the tower + connector in omni_media.safetensors;
    rebuilt as omni_media.json says and fed to transformers as inputs_embeds, it gives omni's logits."""
    from safetensors.torch import load_file

    from omni.model.backbone import backbone_config
    from omni.model.hf_export import MEDIA_JSON, MEDIA_WEIGHTS
    from omni.model.media_encoder import build_media_encoder
    from omni.model.omni_model import build_model
    from omni.sequence import MediaSlot

    media = {"image": {"tokenizer": {"kind": "siglip", "size": "tiny", "image_size": 32, "patch_size": 16},
                       "connector": {"kind": "mlp"}}}
    model = build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0, media=media).eval()
    _randomize(model.backbone, 1)
    _randomize(model.embed, 2)
    pixels = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data, grid = model.encoders["image"].prepare(pixels)
    n = grid[0] * grid[1] * grid[2]
    v = model.vocab
    ids = torch.tensor([[v.bos_id, 300, v.id("<|image|>"), *[v.id("<|feat|>")] * n, v.id("<|/image|>"), 301]])
    with torch.no_grad():
        ours = model(ids, media=[(0, MediaSlot(3, n, "image", data))]).logits

    out = export_hf(model, text_tokenizer, tmp_path / "out")
    described = json.loads((out / MEDIA_JSON).read_text())
    assert described["media"] == model.standalone_config().media and described["hidden_size"] == 64
    tensors = load_file(out / MEDIA_WEIGHTS)
    encoder = build_media_encoder("image", described["media"]["image"], described["hidden_size"],
                                  described["vocab"]["text_size"])
    encoder.load_state_dict({k.removeprefix("encoders.image."): t for k, t in tensors.items()})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        embeds[0, 3:3 + n] = encoder.eval()([data])[0]
        diff = _diff(hf(inputs_embeds=embeds).logits, ours)
    print(f"hf image model (LM + rebuilt tower/connector) fp32 logits max abs diff {diff:.2e} "
          f"(logits std {ours.std():.2f})")
    assert diff < TOL
    with pytest.raises(ValueError, match="GGUF export writes a language model alone"):
        from omni.model.gguf_export import export_gguf
        export_gguf(model, text_tokenizer, tmp_path / "m.gguf")


# --- the command, and what is refused ----------------------------------------------------------------


def test_cli_exports_a_model_folder_and_refuses_clearly(tmp_path, write_gguf, capsys):
    from omni.cli import main

    omni.import_hf(write_gguf(tmp_path / "src.gguf")).save_pretrained(tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    assert main(["export", "--ckpt", ckpt, "--to", "hf", "--out", str(tmp_path / "hf"),
                 "--dtype", "bf16"]) == 0
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.model_type == "llama" and config.dtype == torch.bfloat16
    assert main(["export", "--ckpt", ckpt, "--to", "gguf", "--out", str(tmp_path / "g"),
                 "--dtype", "q8_0"]) == 0
    assert (tmp_path / "g" / "model-q8_0.gguf").is_file()
    capsys.readouterr()
    refused = {  # argv tail -> what the one-line error says
        ("--to", "hf", "--out", str(tmp_path / "hf")): "already exists and is not empty",
        ("--to", "hf", "--out", str(tmp_path / "x"), "--dtype", "q8_0"): "q8_0 is for --to gguf",
        ("--to", "gguf", "--out", str(tmp_path / "y.gguf"), "--dtype", "bf16"): "not a GGUF export type",
        ("--to", "omni", "--out", str(tmp_path / "z"), "--dtype", "f16"): "--dtype and --vocab are for",
        ("--out", str(tmp_path / "z")): "it is a model folder: export it --to hf or --to gguf",
    }
    for tail, message in refused.items():
        assert main(["export", "--ckpt", ckpt, *tail]) == 1
        assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("x", "y.gguf", "z"))


@pytest.mark.parametrize("change,named", [
    (dict(mrope_section=[2, 3, 3]), "mrope_section"),
    (dict(cross_attention={"every": 1}), "cross_attention"),
    (dict(norm="layer", mlp="gelu"), "backbone.norm='layer'.*backbone.mlp='gelu'"),
    (dict(out_bias=True), "out_bias"),
])
def test_what_transformers_cannot_express_is_refused_by_name(text_tokenizer, tmp_path, change, named):
    from omni.model.backbone import backbone_config
    from omni.model.gguf_export import export_gguf
    from omni.model.omni_model import build_model

    model = build_model(backbone_config("debug", **change), text_tokenizer.vocab, seed=0)
    with pytest.raises(ValueError, match=f"cannot be exported as a transformers language model: .*{named}"):
        export_hf(model, text_tokenizer, tmp_path / "out")
    with pytest.raises(ValueError, match=named):
        export_gguf(model, text_tokenizer, tmp_path / "out.gguf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def test_gguf_refuses_a_sentencepiece_model_and_hf_a_whisper_changed_away_from_whisper(
        debug_model, whisper_ckpt, tmp_path):
    from omni.model.gguf_export import export_gguf

    with pytest.raises(ValueError, match="GGUF export writes llama.cpp's byte-level BPE.*TextTokenizer"):
        export_gguf(debug_model.model, debug_model.tokenizer, tmp_path / "a.gguf")
    pipe = omni.load(whisper_ckpt)
    with pytest.raises(ValueError, match="an imported Whisper exports --to hf"):
        export_gguf(pipe.model, pipe.tokenizer, tmp_path / "w.gguf")
    pipe.model.config.media["audio"]["connector"] = {"kind": "mlp"}
    with pytest.raises(ValueError, match="no longer has Whisper's layout"):
        export_hf(pipe.model, pipe.tokenizer, tmp_path / "w")
    with pytest.raises(ValueError, match="vocab='model'.*WhisperTokenizer"):
        from omni.model.hf_export import lm_rows
        lm_rows(pipe.model, pipe.tokenizer, "model")


@pytest.mark.slow
def test_smollm2_exports_to_transformers_and_gguf(smollm2_gguf, tmp_path):
    """The real SmolLM2-135M (imported from its Q4_1 GGUF): hf f32 and GGUF f16 read back by
    transformers (benchmarks/export_parity.py measures all types)."""
    pipe = omni.import_hf(smollm2_gguf)
    rows = pipe.tokenizer.model_ids
    ids = torch.tensor([pipe.tokenizer.encode("The capital of France is Paris. It is known for")])
    with torch.no_grad():
        ours = pipe.model.logits(ids)[..., :rows]
    folder = omni.export(pipe, tmp_path / "hf", to="hf", vocab="model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.config.vocab_size == rows == 49152
    file = omni.export(pipe, tmp_path / "m.gguf", to="gguf", dtype="f16")
    gg = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    with torch.no_grad():
        assert _diff(hf(ids).logits, ours) < TOL
        assert _diff(gg.eval()(ids).logits[..., :rows], ours) < 0.1  # f16 rounding; logits std ~6
