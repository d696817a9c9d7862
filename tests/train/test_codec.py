"""Codec training: the reconstruction metrics, the shipped specs, and a short real training run."""

import json
import shutil

import pytest
import torch

from omni.io import read_jsonl
from omni.metrics import multiscale_mel_distance, si_sdr
from omni.tokenizers.audio import AudioCodec
from omni.train.codec import (
    CodecTrainSpec,
    DeadCodeReviver,
    data_init,
    load_codec_spec,
    reconstruct_manifest,
    train_codec,
)

SPECS = ["audio_codec_tiny", "audio_codec_base"]


def test_si_sdr():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8000, generator=g)
    assert (si_sdr(x, x) > 80).all()
    y = x + 0.1 * torch.randn(2, 8000, generator=g)
    assert torch.allclose(si_sdr(3.0 * y, x), si_sdr(y, x), atol=1e-4)  # gain does not matter
    assert torch.allclose(si_sdr(y, 0.5 * x), si_sdr(y, x), atol=1e-4)
    assert 19 < si_sdr(y, x).mean() < 21  # noise at -20 dB
    assert si_sdr(torch.randn(8000, generator=g), x[0]) < -10
    with pytest.raises(ValueError, match="shapes differ"):
        si_sdr(x, x[0])


def test_multiscale_mel_distance():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    x = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    assert multiscale_mel_distance(x, x.clone(), 16000) == 0.0
    near = multiscale_mel_distance(x + 0.001 * torch.randn(16000, generator=g), x, 16000)
    far = multiscale_mel_distance(x + 0.1 * torch.randn(16000, generator=g), x, 16000)
    assert 0 < near < far
    other = 0.5 * torch.sin(2 * torch.pi * 880 * t)
    assert multiscale_mel_distance(other, x, 16000) == pytest.approx(multiscale_mel_distance(x, other, 16000))
    assert multiscale_mel_distance(torch.stack([x, x]), torch.stack([x, other]), 16000) > 0


def test_data_init_gives_every_conv_unit_rms_and_the_output_the_asked_level():
    torch.manual_seed(0)
    codec = AudioCodec("debug")
    model = codec.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = 0.05 * torch.randn(4, 4000)
    convs = [m for part in (model.encoder, model.decoder) for m in part.modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    rms = {}
    hooks = [c.register_forward_hook(lambda m, a, out: rms.__setitem__(m, float(out.pow(2).mean().sqrt())))
             for c in convs]
    data_init(model, x, out_rms=0.5)
    model.decoder(model.encoder(x[:, None]))
    for h in hooks:
        h.remove()
    assert all(rms[c] == pytest.approx(1.0, rel=1e-3) for c in convs[:-1])
    assert rms[convs[-1]] == pytest.approx(0.5 * 0.05, rel=0.05)
    after = model.state_dict()
    conv_biases = [k for k in after if k.endswith(".bias")]  # zeroed; the LSTM's (bias_ih_l0) kept
    assert conv_biases and all(after[k].abs().sum() == 0 for k in conv_biases)
    assert any(before[k].abs().sum() > 0 for k in conv_biases)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(conv_biases) | {k for k in after if k.endswith("weight_g")}


def test_dead_codes_are_revived_and_stay_revived():
    """encodec's own expiry is undone by its EMA update; ours moves a dead entry onto the data and
    keeps it there through the next training forward."""
    torch.manual_seed(0)
    codec = AudioCodec("debug")  # 2 codebooks of 32, dimension 16
    vq = codec.model.quantizer.vq
    vq.train()
    x = torch.randn(4, 16, 50)  # (B, D, T): 200 frames, a fair share of 6.25 uses per code
    vq(x, n_q=2)  # k-means initialisation
    cb = vq.layers[0]._codebook
    with torch.no_grad():  # entry 3 is far from all data and unused
        cb.embed[3] = cb.embed_avg[3] = torch.full((16,), 100.0)
        cb.cluster_size[3] = 0.0
    revive = DeadCodeReviver(codec.model.quantizer, share=0.2)
    vq(x, n_q=2)
    assert revive() >= 1 and cb.embed[3].abs().max() < 10  # now one of the batch's frames
    entry = cb.embed[3].clone()
    vq(x, n_q=2)  # the EMA update keeps (roughly) the revived entry
    assert torch.allclose(cb.embed[3], entry, atol=1.0) and cb.embed[3].abs().max() < 10
    revive()
    assert revive() == 0  # nothing seen since the last call


@pytest.mark.parametrize("name", SPECS)
def test_shipped_specs_load_and_validate(name):
    spec = load_codec_spec(name)
    assert isinstance(spec, CodecTrainSpec) and spec.kind == "audio_codec"
    AudioCodec(spec.codec)  # the architecture builds


def test_spec_overrides_and_errors():
    spec = load_codec_spec("audio_codec_tiny", ["codec.num_codebooks=4", "steps=10", "loss.mel=2"])
    assert spec.codec.num_codebooks == 4 and spec.codec.codebook_size == 256 and spec.steps == 10
    assert spec.loss.mel == 2.0
    with pytest.raises(ValueError, match="unknown key codec.filters"):
        load_codec_spec("audio_codec_tiny", ["codec.filters=3"])
    with pytest.raises(ValueError, match="preset must be one of"):
        load_codec_spec("audio_codec_tiny", ["preset=huge"])
    with pytest.raises(ValueError, match="must be longer than the largest mel scale"):
        load_codec_spec("audio_codec_tiny", ["segment_s=0.1"])
    with pytest.raises(ValueError, match="codec.num_codebooks"):
        load_codec_spec("audio_codec_tiny", ["codec.num_codebooks=9"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not (shutil.which("espeak-ng") and shutil.which("flite")):
        pytest.skip("needs apt-get install espeak-ng flite")
    from omni.data.speech import build_speech_corpus

    out = tmp_path_factory.mktemp("speech")
    build_speech_corpus(out, counts={"train": 8, "val": 3, "test": 0}, piper=False, seed=1)
    return out


def _spec(corpus, out, **kw):
    base = dict(preset="debug", train_manifests=[str(corpus / "train.jsonl")],
                val_manifests=[str(corpus / "val.jsonl")], out=str(out), steps=40, batch_size=4,
                segment_s=0.3,
                lr=3e-3, warmup_steps=5, mel_scales=[128, 256, 512], num_val_clips=3, val_max_s=1.0,
                log_every=100, threads=2)
    from omni.tokenizers.audio import codec_config

    spec = CodecTrainSpec(codec=codec_config("debug"), **{**base, **kw})
    spec.validate()
    return spec


def test_training_lowers_held_out_mel_distance_and_saves(corpus, tmp_path):
    torch.manual_seed(0)
    report = train_codec(_spec(corpus, tmp_path / "codec", batch_size=8, lr=5e-3))
    assert report["steps"] == 40 and report["loss_last"] < report["loss_first"]
    assert report["after"]["mel_distance"] < 0.97 * report["before"]["mel_distance"]  # 11k params, 40 steps
    assert report["skipped_files"] == 0 and report["val_clips"] == 3
    perplexity = report["after"]["codebook_perplexity"]
    assert len(perplexity) == 2 and all(1 <= p <= 32 for p in perplexity)
    saved = json.loads((tmp_path / "codec" / "report.json").read_text())
    assert saved["mel_distance_reduction"] == pytest.approx(report["mel_distance_reduction"])
    codec = AudioCodec.load(tmp_path / "codec")
    rec = reconstruct_manifest(codec, corpus / "val.jsonl", tmp_path / "rec")
    rows = list(read_jsonl(rec))
    assert len(rows) == 3 and all((rec.parent / r["audio"]).is_file() for r in rows)


def test_discriminator_path_and_bad_samples(corpus, tmp_path):
    manifest = tmp_path / "with_bad.jsonl"
    rows = list(read_jsonl(corpus / "train.jsonl"))
    rows = [{**r, "audio": str(corpus / r["audio"])} for r in rows] + [{"id": "gone", "audio": "missing.wav"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = train_codec(_spec(corpus, tmp_path / "codec", train_manifests=[str(manifest)], steps=3,
                               discriminator=True, disc_filters=4))
    assert report["skipped_files"] == 1 and report["steps"] == 3
    assert all(k in report["spec"] for k in ("discriminator", "loss"))
    with pytest.raises(ValueError, match="missing.wav: unusable audio"):
        train_codec(_spec(corpus, tmp_path / "codec2", train_manifests=[str(manifest)], steps=1,
                          on_bad_sample="error"))


def test_the_codec_folder_stays_locked_while_training_and_a_second_training_is_refused(
        corpus, tmp_path, monkeypatch, lock_held_elsewhere, folder_files):
    from omni.io import LockedError, exclusive

    out = tmp_path / "codec"
    locked_after_save = []  # whether another writer is refused right after each save (a folder swap)
    real_save = AudioCodec.save

    def save(self, directory):
        saved = real_save(self, directory)
        try:
            with exclusive(directory, "codec"):
                locked_after_save.append(False)
        except LockedError:
            locked_after_save.append(True)
        return saved

    monkeypatch.setattr(AudioCodec, "save", save)
    train_codec(_spec(corpus, out, steps=1, save_every=1, batch_size=1, num_val_clips=1, val_max_s=0.5))
    assert locked_after_save == [True, True]  # the save at step 1 and the final one
    before = folder_files(out)
    with lock_held_elsewhere(out, "codec") as pid:
        with pytest.raises(LockedError,
                           match=rf"this codec is being written by another process \(pid {pid} "):
            train_codec(_spec(corpus, out, steps=1))
    assert folder_files(out) == before


def test_non_finite_updates_are_skipped_and_too_many_in_a_row_stop_the_run(corpus, tmp_path, monkeypatch):
    from omni.train import TrainingError

    clip, calls = torch.nn.utils.clip_grad_norm_, [0]

    def nan_norm_at(steps):
        def clip_grad_norm_(params, max_norm):
            calls[0] += 1
            norm = clip(params, max_norm)
            return norm * float("nan") if calls[0] in steps else norm
        return clip_grad_norm_

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm_at({2, 3}))
    report = train_codec(_spec(corpus, tmp_path / "codec", steps=4, num_val_clips=1))
    assert report["steps"] == 4 and report["skipped_steps"] == 2
    weights = AudioCodec.load(tmp_path / "codec").model.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    calls[0] = 0
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm_at(range(10**6)))
    with pytest.raises(TrainingError, match="at step 2: 2 updates in a row skipped"):
        train_codec(_spec(corpus, tmp_path / "codec2", steps=4, num_val_clips=1, max_skipped_steps=2))
