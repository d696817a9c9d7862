"""``omni.model.gguf_import``: tiny random GGUF files written like llama.cpp's converter give the
logits of transformers' own GGUF loader (the independent reference); bad files are clear errors."""

import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from omni.model.gguf_import import import_gguf, read_gguf_tokenizer
from omni.vocab import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOL = 1e-4


def _reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _assert_same_logits(path: Path, ids: torch.Tensor):
    model, tok = import_gguf(path)
    with torch.no_grad():
        ref = _reference(path)(ids).logits
        got = model.logits(ids)
    n = ref.shape[-1]
    assert got.shape[-1] == n + len(SPECIAL_TOKENS)
    diff = (got[..., :n] - ref).abs().max().item()
    assert diff < TOL, f"max abs logit diff {diff:.2e}"
    return model, tok


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n, (2, 20), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qtype, tied", [("F32", True), ("Q8_0", False), ("Q4_1", True)])
def test_llama_logits_match_transformers(tmp_path, write_gguf, qtype, tied):
    path = write_gguf(tmp_path / "tiny.gguf", "llama", qtype, tied)
    model, tok = _assert_same_logits(path, _ids(300))
    assert model.config.tie_embeddings is tied and model.config.vocab == tok.vocab
    assert model.config.backbone.extra["eos_token_id"] == tok.vocab.eos_id == 2


def test_qwen2_logits_match_transformers(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "tiny.gguf", "qwen2", "Q8_0", tied=False)
    model, _ = _assert_same_logits(path, _ids(300))
    assert model.config.backbone.qkv_bias


def test_appended_marker_rows_are_the_mean_of_the_models_rows(tmp_path, write_gguf):
    model, tok = import_gguf(write_gguf(tmp_path / "tiny.gguf", tied=False))
    base = tok.vocab.text_size - len(SPECIAL_TOKENS)
    markers = sorted(tok.vocab.specials.values())
    assert markers == list(range(base, tok.vocab.text_size))
    for weight in (model.embed.weight, model.lm_head.weight):
        assert torch.allclose(weight[markers], weight[:base].mean(0).expand(len(markers), -1))


def test_bfloat16_and_a_folder_with_one_file(tmp_path, write_gguf):
    write_gguf(tmp_path / "tiny.gguf")
    model, _ = import_gguf(tmp_path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.backbone.rotary.inv_freq.dtype == torch.float32


def _split(src: Path, out: Path) -> list[Path]:
    """``src`` as two split parts, the way llama.cpp's gguf-split lays them out."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tensors = list(reader.tensors)
    parts = []
    for no, chunk in enumerate((tensors[:5], tensors[5:])):
        path = out / f"tiny-{no + 1:05d}-of-00002.gguf"
        w = gguf.GGUFWriter(path, arch)
        w.add_uint16("split.no", no)
        w.add_uint16("split.count", 2)
        w.add_int32("split.tensors.count", len(tensors))
        if no == 0:
            for key, field in reader.fields.items():
                if not key.startswith(("GGUF.", "general.architecture")):
                    w.add_key_value(key, field.contents(), field.types[0],
                                    field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for t in chunk:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        parts.append(path)
    return parts


def test_split_parts_load_like_one_file(tmp_path, write_gguf):
    single = write_gguf(tmp_path / "tiny.gguf", qtype="Q8_0")
    (tmp_path / "split").mkdir()
    parts = _split(single, tmp_path / "split")
    ids = _ids(300)
    with torch.no_grad():
        want = import_gguf(single)[0].logits(ids)
        assert torch.equal(import_gguf(parts[1])[0].logits(ids), want)
        assert torch.equal(import_gguf(tmp_path / "split")[0].logits(ids), want)
    parts[1].unlink()
    with pytest.raises(ValueError, match=r"missing part\(s\) tiny-00002-of-00002.gguf") as e:
        import_gguf(parts[0])
    assert str(parts[0]) in str(e.value)


# -- bad input ------------------------------------------------------------------------------------


def _patch_field(src: Path, key: str, value) -> None:
    """Rewrite a string-valued metadata field in place (same length)."""
    reader = gguf.GGUFReader(src, "r+")
    field = reader.fields[key]
    data = field.parts[field.data[0]]
    assert len(value) == len(data)
    data[:] = list(value.encode())
    reader.data.flush()


def test_unsupported_architecture(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "tiny.gguf")
    _patch_field(path, "general.architecture", "gpt2j")
    with pytest.raises(ValueError, match="'gpt2j' is not supported; supported: llama, qwen2") as e:
        import_gguf(path)
    assert str(path) in str(e.value)


def test_unknown_quantisation_type(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "tiny.gguf", qtype="Q8_0")
    reader = gguf.GGUFReader(path, "r+")
    t = reader.tensors[1]  # blk.0.attn_norm.weight; its type id is the field before its offset
    t.field.parts[-2][0] = 250
    reader.data.flush()
    with pytest.raises(ValueError, match="unknown quantisation type 250") as e:
        import_gguf(path)
    assert str(path) in str(e.value)


def test_truncated_file(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        import_gguf(path)
    assert str(path) in str(e.value)


def test_tokenizer_size_must_match_the_embedding(tmp_path, write_gguf, bpe_tokenizer):
    path = write_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path, "r+")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    embd.field.parts[3][1] -= 1  # ne[1]: the embedding's rows
    reader.data.flush()
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the embedding has \d+ rows") as e:
        import_gguf(path)
    assert str(path) in str(e.value)


def test_not_a_gguf_and_a_folder_without_one(tmp_path):
    (tmp_path / "x.gguf").write_bytes(struct.pack("<I", 0x12345678) + b"junk" * 10)
    with pytest.raises(ValueError, match="x.gguf: not a readable GGUF file"):
        import_gguf(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected one GGUF model in the folder, found none"):
        import_gguf(tmp_path / "empty")


# -- the real file ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_gguf):
    ids = torch.tensor([read_gguf_tokenizer(smollm2_gguf).encode("The capital of France is")])
    _, tok = _assert_same_logits(smollm2_gguf, ids)
    assert (tok.vocab.bos_id, tok.vocab.eos_id, tok.vocab.pad_id) == (1, 2, 2)
    assert tok.chat_template.startswith("{% for message in messages %}")
