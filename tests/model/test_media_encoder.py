"""The audio encoder's speech-recognition options: an auxiliary CTC head trained on the
transcript a slot carries, feature stacking, SpecAugment (training only), per-utterance mean
normalisation, and precomputed features from a frozen tower (audio, image, video frames) equal to
running it per step."""

import numpy as np
import pytest
import soundfile as sf
import torch

from omni.data.tasks import TaskDataset, TaskSpec, collate
from omni.io import write_jsonl
from omni.model.backbone import backbone_config
from omni.model.media_encoder import AudioEncoder, ImageEncoder, SpecAugment, VideoEncoder, length_buckets
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.processor import Processor

WHISPER = {"kind": "hf_whisper", "freeze": True, "input_mode": "slice",
           "whisper_config": {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                              "encoder_ffn_dim": 64, "max_source_positions": 100}}


def _asr(tmp_path, text_tokenizer, audio: dict):
    rng = np.random.default_rng(0)
    rows = []
    for i, secs in enumerate((1.0, 0.6)):
        sf.write(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32),
                 16000)
        rows.append({"audio": f"{i}.wav", "text": ["turn on the light", "what time is it"][i]})
    write_jsonl(tmp_path / "asr.jsonl", rows)
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab,
                        seed=0, media={"audio": {"encoder": {"kind": "whisper_style", "size": "debug"},
                                                 "connector": {"kind": "mlp"}, **audio}}),
                     tokenizer=text_tokenizer)
    ds = TaskDataset(tmp_path / "asr.jsonl", TaskSpec("caption", "audio", "text"), model, 128)
    return model, ds, rows


def test_ctc_head_trains_on_the_transcript_and_stack_shortens_the_span(tmp_path, text_tokenizer):
    model, ds, rows = _asr(tmp_path, text_tokenizer, {"ctc_weight": 0.3, "stack": 4, "normalize": "mean"})
    batch = collate([ds[i] for i in range(len(ds))])
    slots = [slot for _, slot in batch["media"]]
    assert [s.length for s in slots] == [13, 8]  # 100 and 60 mel frames -> 50 and 30 features -> /4
    assert [s.labels.tolist() for s in slots] == [text_tokenizer.encode(r["text"]) for r in rows]
    assert torch.allclose(slots[0].data.mean(-1), torch.zeros(80), atol=1e-5)  # mean-normalised bands
    kwargs = dict(positions=batch["positions"], targets=batch["targets"], doc_ids=batch["doc_ids"],
                  media=batch["media"])
    out = model.train()(batch["input_ids"], **kwargs)
    assert out.aux_loss is not None and out.aux_loss > 0 and torch.isfinite(out.objective)
    assert torch.equal(out.objective, out.loss + out.aux_loss)
    out.objective.backward()
    assert model.encoders["audio"].ctc_head.weight.grad.abs().sum() > 0
    assert model.eval()(batch["input_ids"], **kwargs).aux_loss is None  # evaluation scores tokens only
    ids = model.encoders["audio"].ctc_decode([s.data for s in slots])
    assert len(ids) == 2 and all(0 not in row for row in ids)  # blanks (pad id) are dropped


def test_ctc_learns_to_read_a_clip(tmp_path, text_tokenizer):
    model, ds, rows = _asr(tmp_path, text_tokenizer, {"ctc_weight": 1.0})
    enc = model.encoders["audio"].train()
    slots = [slot for _, slot in collate([ds[i] for i in range(len(ds))])["media"]]
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = enc.encode([s.data for s in slots], [s.labels for s in slots])
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoded = enc.eval().ctc_decode([s.data for s in slots])
    assert [text_tokenizer.decode(d) for d in decoded] == [r["text"] for r in rows]
    # joint CTC/attention decoding: with all the weight on CTC the untrained decoder is overruled
    from omni.media.audio import Audio

    clips = [[Audio(tmp_path / r["audio"])] for r in rows]
    model = model.eval()
    assert model.generate(clips, num_beams=3, ctc_weight=1.0, max_new_tokens=12) == [r["text"] for r in rows]
    assert model.generate(clips[0], num_beams=2, max_new_tokens=4) == model.generate(clips[0], num_beams=2,
                                                                                       max_new_tokens=4)
    with pytest.raises(ValueError, match="deterministic"):
        model.generate(clips[0], num_beams=2, temperature=0.7)
    with pytest.raises(ValueError, match="exactly one audio clip"):
        model.generate("no audio here", ctc_weight=0.5)


def test_ctc_on_the_connector_scores_its_tokens_against_the_lm_embeddings(tmp_path, text_tokenizer):
    """``ctc_on: connector``: no head of its own; the connector's tokens against the language
    model's input embeddings (times a learned scale). Trained on two clips, greedy CTC of the tokens
    reads each, and joint decoding with all the weight on CTC writes them."""
    model, ds, rows = _asr(tmp_path, text_tokenizer, {"ctc_weight": 1.0, "ctc_on": "connector", "stack": 2})
    enc = model.encoders["audio"]
    assert enc.ctc_head is None and enc.ctc_scale is not None
    batch = collate([ds[i] for i in range(len(ds))])
    slots = [slot for _, slot in batch["media"]]
    out = model.train()(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                        doc_ids=batch["doc_ids"], media=batch["media"])
    assert out.aux_loss > 0
    out.objective.backward()
    assert enc.ctc_scale.grad != 0 and all(p.grad.abs().sum() > 0 for p in enc.connector.parameters())
    assert model.embed.weight.grad.abs().sum() > 0  # the embeddings too, where they train
    embed = model.embed.weight.detach()
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = enc.encode([s.data for s in slots], [s.labels for s in slots], embed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoded = enc.eval().ctc_decode([s.data for s in slots], embed)
    assert [text_tokenizer.decode(d) for d in decoded] == [r["text"] for r in rows]
    from omni.media.audio import Audio

    clips = [[Audio(tmp_path / r["audio"])] for r in rows]
    texts = model.eval().generate(clips, num_beams=3, ctc_weight=1.0, max_new_tokens=12)
    assert texts == [r["text"] for r in rows]
    with pytest.raises(ValueError, match="pass embed"):
        enc.ctc_decode([s.data for s in slots])
    with pytest.raises(ValueError, match="ctc_on"):
        _asr(tmp_path, text_tokenizer, {"ctc_weight": 1.0, "ctc_on": "decoder"})


def test_aux_only_the_loss_is_the_connectors_ctc_and_the_language_model_never_runs(tmp_path, text_tokenizer):
    """``train.loss: aux`` (``model.aux_only``): a forward with targets returns the encoders' CTC loss
    as the loss, a mean over the labelled clips, in training and in evaluation (a validation loss), and
    the backbone does not run."""
    pipe, ds, _ = _asr(tmp_path, text_tokenizer, {"ctc_weight": 1.0, "ctc_on": "connector", "stack": 2})
    model, batch = pipe.model, collate([ds[i] for i in range(len(ds))])
    args = dict(positions=batch["positions"], targets=batch["targets"], doc_ids=batch["doc_ids"],
                media=batch["media"])
    torch.manual_seed(0)
    joint = model.train()(batch["input_ids"], **args)
    model.aux_only = True
    model.backbone.forward = lambda *a, **k: pytest.fail("the language model ran")
    out = model(batch["input_ids"], **args)
    assert out.logits is None and out.aux_loss is None
    assert out.num_tokens == len(batch["media"]) == out.loss_mass
    assert out.loss.item() == pytest.approx(joint.aux_loss.item(), rel=1e-5)
    out.loss.backward()
    assert model.encoders["audio"].ctc_scale.grad != 0
    with torch.no_grad():
        val = model.eval()(batch["input_ids"], **args)
    assert val.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="train.loss=aux"):  # a row without a clip
        model(batch["input_ids"], **{**args, "media": None})
    model.encoders["audio"].ctc_weight = 0.0
    with pytest.raises(ValueError, match="train.loss=aux"):
        model(batch["input_ids"], **args)


def test_length_buckets_group_similar_lengths_within_the_allowed_padding():
    lengths = [300, 100, 1000, 110, 280, 120, 320]
    groups = length_buckets(lengths, waste=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[1, 3, 5], [4, 0, 6], [2]]  # shortest first; the 10 s clip alone
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert length_buckets(lengths, waste=float("inf")) == [[1, 3, 5, 4, 0, 6, 2]]  # one call, as before


def test_audio_clips_encode_as_if_alone_whatever_their_batch(text_tokenizer):
    """Clips go through the encoder in length buckets, and padding never leaks into a clip's features."""
    torch.manual_seed(0)
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab,
                        seed=0, media={"audio": {"encoder": {"kind": "whisper_style", "size": "debug"},
                                                 "connector": {"kind": "mlp"}}}), tokenizer=text_tokenizer)
    enc = model.encoders["audio"].eval()
    clips = [torch.randn(80, n) - 4 for n in (100, 1000, 103, 390, 180)]  # log-mel-like: below zero
    calls = []
    enc.encoder.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        together = enc(clips)
        assert (sorted(calls) == [1, 1, 1, 2]
                and len(calls) == len(length_buckets([c.shape[-1] for c in clips])))
        for clip, out in zip(clips, together):
            assert torch.allclose(out, enc([clip])[0], atol=1e-5)


def test_spec_augment_masks_only_while_training(tmp_path, text_tokenizer):
    torch.manual_seed(0)
    mel = torch.randn(80, 200)
    out = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=0.1)(mel)
    changed = out != mel
    assert changed.any() and (changed.all(1).sum() + changed.all(0).sum()) > 0  # whole bands / spans
    model, ds, _ = _asr(tmp_path, text_tokenizer, {"spec_augment": {"freq_masks": 2}})
    enc = model.encoders["audio"]
    data = [ds[0].media[0].data]
    assert torch.equal(enc.eval()(data)[0], enc(data)[0])
    torch.manual_seed(1)
    assert not torch.equal(enc.train()(data)[0], enc.eval()(data)[0])


def test_precomputed_features_of_a_frozen_tower_equal_running_it(tmp_path):
    wave = 0.1 * torch.randn(16000)
    cfg = {"encoder": WHISPER, "connector": {"kind": "linear"}, "stack": 2}
    torch.manual_seed(0)
    live = AudioEncoder(cfg, dim=48)
    cached = AudioEncoder({**cfg, "precompute": True}, dim=48)
    cached.load_state_dict(live.state_dict())
    mel, grid = live.prepare(wave)
    feats, grid2 = cached.prepare(wave)
    assert grid == grid2 and mel.shape == (80, 100) and feats.shape == (50, 32)
    assert torch.allclose(live([mel])[0], cached([feats])[0], atol=1e-5)
    with pytest.raises(ValueError, match="precompute needs a frozen encoder"):
        AudioEncoder({"encoder": {"kind": "whisper_style", "size": "debug"}, "precompute": True}, dim=48)
    with pytest.raises(ValueError, match="unknown key model.media.audio.ctc"):
        AudioEncoder({"encoder": {"kind": "whisper_style", "size": "debug"}, "ctc": 0.3}, dim=48)


@pytest.mark.parametrize("tokenizer, video", [
    ({"kind": "dinov2", "size": "debug", "merge": 2}, {"temporal": "mrope", "num_frames": 3}),
    ({"kind": "efficientnet", "image_size": 64}, {"temporal": "qformer", "num_frames": 3, "num_queries": 4}),
])
def test_precomputed_image_and_frame_features_equal_running_the_tower(tokenizer, video):
    """A frozen image tower with ``precompute``: ``prepare`` gives its features ((h*w, D) per image,
    (N, h, w, D) per video), the model runs only what follows, and the outputs are the same; the
    processor's fingerprint (the prepared-sample cache's key) follows the tower's weights."""
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    frames = torch.randint(0, 256, (3, 3, 40, 50), dtype=torch.uint8)
    for cls, obj, extra in ((ImageEncoder, image, {}), (VideoEncoder, frames, {"video": video})):
        torch.manual_seed(0)
        live = cls({"tokenizer": tokenizer, "connector": {"kind": "mlp"}, **extra}, dim=48).eval()
        cached = cls({"tokenizer": {**tokenizer, "precompute": True}, "connector": {"kind": "mlp"}, **extra},
                     dim=48).eval()
        cached.load_state_dict(live.state_dict())
        pixels, grid = live.prepare(obj)
        feats, grid2 = cached.prepare(obj)
        tower = cached.precomputed()
        assert grid == grid2 and tower is not None and live.precomputed() is None
        assert feats.shape[-1] == tower.out_dim and feats.dim() == pixels.dim() - 1 + (cls is VideoEncoder)
        with torch.no_grad():
            assert torch.allclose(live([pixels, pixels])[1], cached([feats, feats])[1], atol=1e-5)
        proc = Processor(None, encoders={"m": cached}, render_options={"mrope": True})
        key = proc.fingerprint()
        with torch.no_grad():
            next(tower.parameters()).add_(1.0)
        assert proc.fingerprint() != key


def test_ctc_covers_only_the_clips_that_carry_a_transcript(tmp_path, text_tokenizer):
    """A mixture's sound captions describe the clip rather than say it (``transcript: false``):
    they carry no CTC labels, and the speech clips beside them in a batch still train the head."""
    model, ds, _ = _asr(tmp_path, text_tokenizer, {"ctc_weight": 1.0})
    sounds = TaskDataset(tmp_path / "asr.jsonl", TaskSpec("caption", "audio", "text", transcript=False),
                         model, 128)
    slot = collate([sounds[0]])["media"][0][1]
    assert slot.labels is None
    enc = model.encoders["audio"].eval()
    speech = [s for _, s in collate([ds[i] for i in range(len(ds))])["media"]]
    _, alone = enc.encode([speech[0].data], [speech[0].labels])
    _, beside = enc.encode([speech[0].data, slot.data], [speech[0].labels, None])
    assert alone is not None and torch.allclose(alone, beside, atol=1e-4)
    assert enc.encode([slot.data], [None])[1] is None


def test_whisper_style_encoder_with_no_padding_runs_unmasked_with_the_same_features():
    """Lengths that cover every frame (Whisper's 30-s window) mask nothing: the encoder drops them
    and runs its fused unmasked attention, with the features of the masked path."""
    from omni.tokenizers.audio import WhisperStyleEncoder

    torch.manual_seed(0)
    enc = WhisperStyleEncoder(n_mels=16, dim=32, num_layers=2, num_heads=4, max_frames=64).eval()
    mel = torch.randn(2, 16, 40)
    with torch.inference_mode():
        plain = enc(mel)
        torch.testing.assert_close(enc(mel, mel_lengths=torch.tensor([40, 40])), plain)
        short = enc(mel, mel_lengths=torch.tensor([40, 20]))  # padding still masked
    torch.testing.assert_close(short[0], plain[0])
    assert not torch.allclose(short[1, :10], plain[1, :10])


@pytest.mark.parametrize("conv_kernel", [0, 3])
def test_whisper_style_encoder_in_eval_attends_through_sdpa_like_the_torch_layers(conv_kernel):
    """Eval runs each layer's attention through scaled_dot_product_attention; training (dropout 0
    here) runs nn.TransformerEncoder's own: the same features, padded rows included."""
    from omni.tokenizers.audio import WhisperStyleEncoder

    torch.manual_seed(0)
    enc = WhisperStyleEncoder(n_mels=16, dim=32, num_layers=2, num_heads=4, max_frames=64,
                              conv_kernel=conv_kernel)
    mel, lengths = torch.randn(2, 16, 40), torch.tensor([40, 23])
    with torch.no_grad():
        torch_layers = enc.train()(mel, mel_lengths=lengths)
        fused = enc.eval()(mel, mel_lengths=lengths)
    torch.testing.assert_close(fused[0], torch_layers[0])
    torch.testing.assert_close(fused[1, :12], torch_layers[1, :12])  # the real features of the short clip


def test_a_checkpoint_with_the_old_hf_whisper_tower_gives_the_same_features():
    """tests/data/ckpt_hf_whisper was saved by main with the transformers-based hf_whisper tower
    (tests/data/make_ckpt_hf_whisper.py); the tower rebuilt on omni's Whisper encoder reads its config
    and renamed weights and gives the same features; saved again, it loads under today's names."""
    from pathlib import Path

    from omni.io import load_tensors
    from omni.model.omni_model import OmniModel
    from omni.tokenizers.audio import WhisperStyleEncoder

    data = Path(__file__).parents[1] / "data"
    ref = load_tensors(data / "ckpt_hf_whisper_reference.safetensors")
    model = OmniModel.from_pretrained(data / "ckpt_hf_whisper")
    tower = model.encoders["audio"]
    assert isinstance(tower.encoder, WhisperStyleEncoder) and tower.encoder.input_mode == "pad"
    with torch.no_grad():
        for i in (0, 1):
            assert torch.allclose(tower([ref[f"mel{i}"]])[0], ref[f"feat{i}"], atol=1e-5)
    assert not any(p.requires_grad for p in tower.encoder.parameters())  # freeze: true, as saved


def test_the_cache_key_follows_the_encoders_data_format(monkeypatch):
    """Images are prepared as uint8 pixels (``data_format`` 2; float32 normalised ones were 1): the
    processor's fingerprint (the prepared-sample cache's key) changes with it, so a cache of the
    older form is rebuilt rather than read as uint8."""
    section = {"tokenizer": {"kind": "siglip", "size": "debug"}, "connector": {"kind": "mlp"}}
    enc = ImageEncoder(section, dim=48)
    pixels, _ = enc.prepare(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    proc = Processor(None, encoders={"image": enc}, render_options={"mrope": True})
    key = proc.fingerprint()
    monkeypatch.setattr(ImageEncoder, "data_format", 1)
    assert proc.fingerprint() != key
