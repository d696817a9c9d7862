import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omni.io import load_tensors, save_tensors
from omni.model import omni_model
from omni.model.backbone import KVCache, backbone_config
from omni.model.omni_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    OmniModel,
    build_model,
    default_positions,
)
from omni.pipeline import Pipeline
from omni.processor import TOKENIZER_DIR
from omni.sequence import IGNORE


def _ids(vocab_size, B=2, T=12, seed=0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path, debug_model):
    path = tmp_path / "ckpt"
    debug_model.save_pretrained(path)
    return path


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_gives_identical_logits(tmp_path, text_tokenizer, tie):
    model = Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, tie_embeddings=tie, seed=3),
                     tokenizer=text_tokenizer).eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR}
    assert ("lm_head.weight" in load_tensors(path / WEIGHTS_FILE)) is not tie  # no alias stored when tied
    back = Pipeline.from_pretrained(path)
    assert not back.training
    assert back.config.to_dict() == model.config.to_dict()
    assert (back.lm_head.weight is back.embed.weight) is tie
    ids = _ids(model.vocab.size)
    with torch.no_grad():
        assert torch.equal(back.logits(ids), model.logits(ids))
    assert back.tokenizer.encode("Hello there") == text_tokenizer.encode("Hello there")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_save_without_tokenizer(tmp_path, text_tokenizer):
    model = build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / TOKENIZER_DIR).exists()
    assert Pipeline.from_pretrained(tmp_path / "ckpt").tokenizer is None


def test_saving_over_a_checkpoint_replaces_it_and_keeps_other_files(saved, text_tokenizer):
    (saved / "metrics.jsonl").write_text("{}\n")
    new = Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=7),
                   tokenizer=text_tokenizer).eval()
    new.save_pretrained(saved)
    ids = _ids(new.vocab.size)
    with torch.no_grad():
        assert torch.equal(OmniModel.from_pretrained(saved).logits(ids), new.logits(ids))
    assert (saved / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_a_failing_save_leaves_the_old_checkpoint_intact(saved, debug_model, text_tokenizer, monkeypatch):
    def crash_mid_save(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
        raise OSError("disk full")

    new = Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=7),
                   tokenizer=text_tokenizer)
    monkeypatch.setattr(omni_model, "save_tensors", crash_mid_save)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(saved)
    monkeypatch.undo()
    ids = _ids(debug_model.vocab.size)
    with torch.no_grad():
        assert torch.equal(OmniModel.from_pretrained(saved).logits(ids), debug_model.logits(ids))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_a_failing_first_save_leaves_nothing(tmp_path, debug_model, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(omni_model, "save_tensors", crash)
    with pytest.raises(OSError):
        debug_model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="not found") as e:
        OmniModel.from_pretrained(tmp_path / "nope")
    assert "nope" in str(e.value)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_incomplete_checkpoint_names_the_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ValueError, match=f"incomplete checkpoint, {missing} is missing"):
        OmniModel.from_pretrained(saved)


def test_truncated_weights_name_the_file(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated") as e:
        OmniModel.from_pretrained(saved)
    assert str(saved / WEIGHTS_FILE) in str(e.value)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an omni config"),
    ('"omni"', "not an omni config"),
    ('{"model_type": "llama"}', "not an omni config"),
    ('{"model_type": "omni", "vocab": {"text_size": 512}}', "malformed"),
    ('{"model_type": "omni", "backbone": {"dimm": 3}, "vocab": {"text_size": 512}}', "malformed"),
])
def test_corrupt_config_names_the_file(saved, content, match):
    (saved / CONFIG_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        OmniModel.from_pretrained(saved)
    assert str(saved / CONFIG_FILE) in str(e.value)


def test_invalid_backbone_values_in_config_name_the_file(saved):
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    cfg["backbone"]["num_kv_heads"] = 3
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_kv_heads") as e:
        OmniModel.from_pretrained(saved)
    assert str(saved / CONFIG_FILE) in str(e.value)


def test_mis_shaped_tensor_is_named(saved):
    tensors = load_tensors(saved / WEIGHTS_FILE)
    tensors["backbone.layers.1.ffn.w2.weight"] = torch.zeros(64, 100)
    save_tensors(saved / WEIGHTS_FILE, tensors)
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.ffn\.w2\.weight has shape \(64, 100\)") as e:
        OmniModel.from_pretrained(saved)
    assert str(saved / WEIGHTS_FILE) in str(e.value)


def test_missing_and_unexpected_tensors_are_named(saved):
    tensors = load_tensors(saved / WEIGHTS_FILE)
    del tensors["backbone.norm.weight"]
    tensors["extra.bias"] = torch.zeros(3)
    save_tensors(saved / WEIGHTS_FILE, tensors)
    with pytest.raises(ValueError, match=r"backbone\.norm\.weight.*extra\.bias"):
        OmniModel.from_pretrained(saved)


def test_tokenizer_that_does_not_match_the_config(saved):
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    cfg["vocab"]["text_size"] = 600
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer has 512 pieces but config.json says 600"):
        Pipeline.from_pretrained(saved)


def test_loss_ignores_minus_100(debug_model):
    V = debug_model.vocab.size
    ids = _ids(V, T=10)
    targets = _ids(V, T=10, seed=1)
    targets[0, :4] = IGNORE
    targets[1, 7:] = IGNORE
    with torch.no_grad():
        out = debug_model(ids, targets=targets)
        keep = targets != IGNORE
        full = debug_model(ids).logits
        # the head runs only at the positions with a target: their logits, in row-major order
        assert torch.equal(out.kept, keep) and out.logits.shape == (13, V)
        torch.testing.assert_close(out.logits, full[keep], atol=1e-5, rtol=0)
        expect = F.cross_entropy(full[keep], targets[keep])
        assert out.num_tokens == int(keep.sum()) == 13
        torch.testing.assert_close(out.loss, expect)
        # what sits at ignored positions does not matter
        other = targets.clone()
        other[~keep] = IGNORE
        assert debug_model(ids, targets=other).loss == out.loss
        none = debug_model(ids, targets=torch.full_like(targets, IGNORE))
        assert none.num_tokens == 0 and none.loss == 0


def test_loss_weights_give_a_weighted_mean_over_the_targets(debug_model):
    V = debug_model.vocab.size
    ids, targets = _ids(V, T=10), _ids(V, T=10, seed=1)
    targets[1, 7:] = IGNORE
    weights = torch.ones(2, 10)
    weights[0, :5] = 3.0  # e.g. a mixture task's targets in the first half of row 0
    with torch.no_grad():
        out = debug_model(ids, targets=targets, loss_weights=weights)
        keep = targets != IGNORE
        per_token = F.cross_entropy(debug_model(ids).logits[keep], targets[keep], reduction="none")
        torch.testing.assert_close(out.loss, (per_token * weights[keep]).sum() / weights[keep].sum())
        assert out.num_tokens == 17
        plain = debug_model(ids, targets=targets)
        torch.testing.assert_close(debug_model(ids, targets=targets, loss_weights=torch.ones(2, 10)).loss,
                                   plain.loss)


def test_logits_rejects_input_longer_than_the_context(debug_model):
    n = debug_model.max_seq_len + 1
    with pytest.raises(ValueError, match=f"{n} tokens but the model's context is {debug_model.max_seq_len}"):
        debug_model.logits(torch.zeros(1, n, dtype=torch.long))


def test_default_positions():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert default_positions(ids).tolist() == [[0, 1, 2, 3, 4]] * 2
    kp = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert default_positions(ids, kp).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    cache = KVCache(backbone_config("debug"), 2, 8)
    cache.mark_padding(kp)
    cache.advance(5, kp)  # what the backbone does once every layer has the 5 prompt positions
    assert cache.length == 5
    assert default_positions(ids[:, :1], cache=cache).tolist() == [[5], [3]]


@torch.no_grad()
def test_left_padded_batch_matches_single_rows(sampling_model):
    V = sampling_model.vocab.size
    a, b = _ids(V, 1, 9, seed=1), _ids(V, 1, 5, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    kp = torch.ones(2, 9, dtype=torch.bool)
    kp[1, :4] = False
    logits = sampling_model(ids, key_padding=kp).logits
    torch.testing.assert_close(logits[0:1], sampling_model.logits(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1:2, 4:], sampling_model.logits(b), atol=1e-5, rtol=0)


def test_num_params_matches_config(text_tokenizer):
    for tie in (True, False):
        m = build_model(backbone_config("debug"), text_tokenizer.vocab, tie_embeddings=tie, seed=0)
        assert m.num_params() == m.config.backbone.num_params(m.vocab.size, tied=tie)


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=32, patch_size=16)


def _pretrained_towers(root):
    """Tiny random transformers checkpoints as save_pretrained writes them: a whole CLIP (its pixel
    mean/std in preprocessor_config.json), a ViT and a Whisper."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        ViTConfig,
        ViTModel,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=text)).save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.45, 0.5],
                                                                        "image_std": [0.2, 0.25, 0.3]}))
    ViTModel(ViTConfig(**TINY_VISION), add_pooling_layer=False).save_pretrained(root / "vit")
    WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=100, max_target_positions=16,
        vocab_size=64, pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
    )).save_pretrained(root / "whisper")


def _media_logits(model, inputs: dict) -> torch.Tensor:
    """Logits of a few text tokens around each input's feature span."""
    from omni.sequence import MediaSlot

    ids, media = [7, 8], []
    for modality, obj in inputs.items():
        data, grid = model.encoders[modality].prepare(obj)
        n = grid[0] * grid[1] * grid[2]
        media.append((0, MediaSlot(len(ids), n, modality, data)))
        ids += [model.vocab.id("<|feat|>")] * n + [9]
    with torch.no_grad():
        return model(torch.tensor([ids]), media=media).logits


def test_a_checkpoint_on_pretrained_towers_loads_without_their_folders(tmp_path, text_tokenizer):
    import shutil

    import omni

    weights = tmp_path / "weights"
    _pretrained_towers(weights)
    media = {"image": {"tokenizer": {"kind": "clip", "path": str(weights / "clip"), "freeze": True},
                       "connector": {"kind": "mlp"}},
             "video": {"tokenizer": {"kind": "vit", "path": str(weights / "vit")}, "video": {"num_frames": 2},
                       "connector": {"kind": "mlp"}},
             "audio": {"encoder": {"kind": "hf_whisper", "path": str(weights / "whisper"), "freeze": True,
                                   "input_mode": "slice"}, "connector": {"kind": "mlp"}}}
    model = Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0, media=media),
                     tokenizer=text_tokenizer)
    model.eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"image": torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g),
              "video": torch.randint(0, 256, (2, 3, 36, 36), dtype=torch.uint8, generator=g),
              "audio": 0.1 * torch.randn(8000, generator=g)}
    expected = _media_logits(model, inputs)
    model.save_pretrained(tmp_path / "ckpt")
    # a checkpoint of the old form, whose config names the tower folders, loads while they exist
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "ckpt", old)
    (old / CONFIG_FILE).write_text(json.dumps(model.config.to_dict()))
    assert torch.equal(_media_logits(OmniModel.from_pretrained(old), inputs), expected)

    shutil.rmtree(weights)
    loaded = omni.load(tmp_path / "ckpt")
    assert torch.equal(_media_logits(loaded, inputs), expected)
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["media"]
    assert "weights" not in json.dumps(saved)  # no tower folder is named
    clip = saved["image"]["tokenizer"]
    assert clip["tower"]["model_type"] == "clip_vision_model" and clip["freeze"] is True
    assert (clip["mean"], clip["std"]) == ([0.4, 0.45, 0.5], [0.2, 0.25, 0.3])  # the checkpoint's, not CLIP's
    assert saved["audio"]["encoder"]["whisper_config"]["d_model"] == 32
    with pytest.raises(ValueError, match="weights/clip: no config.json"):
        OmniModel.from_pretrained(old)


def test_a_checkpoint_from_before_the_processor_refactor_gives_the_same_logits():
    """tests/data/ckpt_v1 was written by main at 84cb853 (tests/data/make_ckpt_v1.py): text, image,
    video and audio prompts, and an audio continuation as codec codes, render to the same ids and
    give the same logits with today's code."""
    from safetensors.torch import load_file

    import omni
    from omni.api import render_prompts
    from omni.generation import left_pad

    data = Path(__file__).parent.parent / "data"
    ref = load_file(str(data / "ckpt_v1_reference.safetensors"))
    model = omni.load(data / "ckpt_v1")
    cases = {
        "text_media": ([[omni.Image(ref["pixels"]), "Caption:"],
                        [omni.Audio(ref["wave"], sample_rate=16000), "Transcribe."],
                        [omni.Video(data / "ckpt_v1_clip.mp4", num_frames=2), "Describe."],
                        ["The history of"]], "text"),
        "continue": ([["Continue:", omni.Audio(ref["speech"], sample_rate=16000)]], "audio"),
    }
    with torch.no_grad():
        for name, (batch, output) in cases.items():
            rendered, inputs = render_prompts(model, batch, output)
            ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
            assert torch.equal(ids, ref[f"{name}.ids"]), name
            kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
            logits = model(ids, key_padding=inputs["attention_mask"].bool(), **kw).logits
            torch.testing.assert_close(logits, ref[f"{name}.logits"], rtol=0, atol=1e-5, msg=name)


def test_training_fuses_the_head_with_its_loss_without_keeping_the_logits(text_tokenizer):
    """In training (and in validation with ``loss_chunk``) the head and its cross-entropy are fused
    (``LMHead.loss``, whole or ``loss_chunk`` rows at a time): the loss and gradients of the unfused
    head (evaluation mode), text and codebook streams, weighted, and no (rows x vocabulary) tensor
    saved for the backward."""
    from omni.model.omni_model import OmniConfig
    from omni.vocab import Vocab

    vocab = Vocab.default(text_tokenizer.vocab.text_size, num_codebooks=3, codebook_size=16)
    torch.manual_seed(0)
    model = OmniModel(OmniConfig(backbone_config("debug", max_seq_len=64), vocab))
    model.reset_parameters()
    V, B, T = vocab.size, 2, 12
    ids, targets = _ids(V, B, T), _ids(V, B, T, seed=1)
    targets[0, :3] = IGNORE
    starts = torch.tensor([vocab.codebook_range(k).start for k in (1, 2)])
    stream_targets = starts[None, :, None] + _ids(16, B * 2, T, seed=2).view(B, 2, T)  # codebooks 1, 2
    stream_targets[:, 1, 8:] = IGNORE
    stream_targets[0, :, :2] = IGNORE  # row 0's first two positions carry no target at all
    batch = dict(targets=targets, stream_targets=stream_targets, loss_weights=torch.rand(B, T) + 0.5)
    results = []
    for training, chunk in ((False, 0), (True, 0), (True, 5)):
        model.train(training)
        model.loss_chunk = chunk
        model.zero_grad()
        shapes = []  # of the tensors saved for the backward pass

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, **batch)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, shapes))
    (ref, grads, ref_saved), *fused = results
    assert (int(ref.kept.sum()), V) in ref_saved  # the unfused head keeps all the logits
    for out, fused_grads, saved in fused:
        assert out.num_tokens == ref.num_tokens > 0 and out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(fused_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
        assert not [s for s in saved if len(s) == 2 and s[1] == V]
    # a trainer's validation (eval, no gradient) with loss_chunk set: fused too, the same loss
    model.eval()
    model.loss_chunk = 5
    with torch.no_grad():
        out = model(ids, **batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)


def test_uint8_cached_pixels_give_the_logits_of_normalised_float_pixels():
    """Images and video frames are prepared (and cached) as uint8 pixels at the tower's size and
    normalised in the encoder's forward, on the model's device: 4x fewer bytes than the float32
    normalised pixels prepared before, and bit-identical logits from either form."""
    import dataclasses

    import omni
    from omni.api import render_prompts
    from omni.generation import left_pad

    data = Path(__file__).parent.parent / "data"
    model = omni.load(data / "ckpt_v1")
    pixels = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    batch = [[omni.Image(pixels), "Caption:"],
             [omni.Video(data / "ckpt_v1_clip.mp4", num_frames=2), "Describe."]]
    rendered, inputs = render_prompts(model, batch)
    media = inputs.pop("media")
    towers = {"image": model.encoders["image"].tokenizer,
              "video": model.encoders["video"].video.image_tokenizer}
    floats = []
    for row, slot in media:
        assert slot.data.dtype == torch.uint8, slot.modality
        old = towers[slot.modality].preprocess(slot.data)[0]  # what prepare gave before: float32 normalised
        assert old.dtype == torch.float32 and old.nbytes == 4 * slot.data.nbytes
        floats.append((row, dataclasses.replace(slot, data=old)))
    assert {slot.modality for _, slot in media} == {"image", "video"}
    ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
    mask = inputs.pop("attention_mask").bool()
    with torch.no_grad():
        new = model(ids, key_padding=mask, media=media, **inputs).logits
        old = model(ids, key_padding=mask, media=floats, **inputs).logits
    assert torch.equal(new, old)
