"""Parity of ``omni.import_hf`` with transformers on tiny checkpoints that transformers saves itself."""

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

import omni
from omni.model.hf_import import hf_config_to_omni

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=128)
TOL = 1e-4


def _randomize(model, seed: int) -> None:
    """Weights large enough that attention is far from uniform and norms/biases are not 1/0, so a
    wrong fusion order, a swapped norm or a missed bias shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)


def _save(path, cls_name: str, seed: int = 0, **overrides):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls_name)(cfg_cls(**{**TINY, **overrides})).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    return model


def _ids(B=3, T=24, V=256, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _assert_same_logits(hf, path, ids):
    ours = omni.import_hf(path)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.logits(ids)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff < TOL, f"max abs logit diff {diff:.2e}"
    return ours


@pytest.mark.parametrize("tied", [True, False])
def test_llama_logits_match(tmp_path, tied):
    hf = _save(tmp_path, "LlamaForCausalLM", tie_word_embeddings=tied)
    ours = _assert_same_logits(hf, tmp_path, _ids())
    assert ours.config.tie_embeddings is tied
    assert (ours.lm_head.weight is ours.embed.weight) is tied
    assert ours.tokenizer is None
    assert ours.config.backbone.extra["imported_from"] == "llama"


def test_qwen2_logits_match_with_qkv_bias(tmp_path):
    hf = _save(tmp_path, "Qwen2ForCausalLM", tie_word_embeddings=True)
    assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # _randomize filled the biases
    ours = _assert_same_logits(hf, tmp_path, _ids())
    assert ours.config.backbone.qkv_bias


def test_llama3_rope_scaling(tmp_path):
    # original_max_position_embeddings=16 scales every rotary pair but the fastest one, so with
    # 48 positions the scaled frequencies decide the logits.
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf = _save(tmp_path, "LlamaForCausalLM", rope_parameters=rope)
    ours = _assert_same_logits(hf, tmp_path, _ids(B=2, T=48))
    assert ours.config.backbone.rope_scaling["rope_type"] == "llama3"


def test_sharded_checkpoint(tmp_path):
    hf = _save(tmp_path, "LlamaForCausalLM", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_same_logits(hf, tmp_path / "sharded", _ids())


def test_mistral_sliding_window_caps_context(tmp_path, caplog):
    hf = _save(tmp_path, "MistralForCausalLM", sliding_window=16)
    with caplog.at_level(logging.WARNING, logger="omni.model.hf_import"):
        ours = _assert_same_logits(hf, tmp_path, _ids(T=16))
    assert ours.max_seq_len == 16
    assert "sliding-window" in caplog.text
    with pytest.raises(ValueError, match="context"):
        ours.logits(_ids(T=17))


def test_bfloat16_import(tmp_path):
    hf = _save(tmp_path, "LlamaForCausalLM")
    ours = omni.import_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.backbone.rotary.inv_freq.dtype == torch.float32  # rotary angles stay exact
    ids = _ids()
    with torch.no_grad():
        ref, got = hf(ids).logits, ours.logits(ids).float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_greedy_generation_matches(tmp_path):
    hf = _save(tmp_path, "LlamaForCausalLM", tie_word_embeddings=False)
    ours = omni.import_hf(tmp_path)
    ids = _ids(B=2, T=8, seed=3)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                      min_new_tokens=20, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, max_new_tokens=20, stop_ids=[])
    assert ref.shape == (2, 20)
    assert torch.equal(got, ref)



def test_generation_stops_at_the_checkpoints_own_eos(tmp_path):
    _save(tmp_path, "LlamaForCausalLM", tie_word_embeddings=False)
    ids = _ids(B=1, T=8, seed=3)
    free = omni.import_hf(tmp_path).generate(ids, max_new_tokens=6, stop_ids=[])[0].tolist()
    eos = free[2]
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    got = omni.import_hf(tmp_path).generate(ids, max_new_tokens=6)[0].tolist()
    k = free.index(eos)
    assert got[:k + 1] == free[:k + 1]
    assert all(t == 0 for t in got[k + 1:])

# -- config mapping without weights -----------------------------------------------------------


def test_old_style_rope_keys():
    raw = {"model_type": "llama", **TINY, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    cfg = hf_config_to_omni(raw).backbone
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg.head_dim == 16 and cfg.num_kv_heads == 2 and cfg.max_seq_len == 128


def test_qwen2_unused_sliding_window_is_ignored():
    raw = {"model_type": "qwen2", **TINY, "use_sliding_window": False, "sliding_window": 16}
    assert hf_config_to_omni(raw).backbone.max_seq_len == 128


def test_unsupported_rope_type():
    raw = {"model_type": "llama", **TINY,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
    with pytest.raises(ValueError, match="'yarn'.*default, llama3"):
        hf_config_to_omni(raw)


# -- bad input -----------------------------------------------------------------------------------


def test_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json") as e:
        omni.import_hf(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match="'gpt2'.*llama, mistral, qwen2") as e:
        omni.import_hf(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_truncated_safetensors(tmp_path):
    _save(tmp_path, "LlamaForCausalLM")
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as e:
        omni.import_hf(tmp_path)
    assert str(weights) in str(e.value)


def test_missing_tensor(tmp_path):
    _save(tmp_path, "LlamaForCausalLM")
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight") as e:
        omni.import_hf(tmp_path)
    assert str(weights) in str(e.value)


def test_pickled_bin_only_is_refused(tmp_path):
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors") as e:
        omni.import_hf(tmp_path)
    assert str(tmp_path) in str(e.value)
