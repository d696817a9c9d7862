"""Audio encoders: our Whisper-style encoder, from scratch or as a pretrained Whisper's encoder read
from a local checkpoint (transformers', CTranslate2's or an omni import), frozen or not."""

import pytest
import torch

from omni.tokenizers.audio import LogMel, WhisperStyleEncoder, audio_encoder

TINY_WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=128, num_mel_bins=80,
                    max_source_positions=150, max_target_positions=32, vocab_size=128, pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, decoder_start_token_id=3)  # 300 mel frames = 3 s


def test_whisper_style_encoder_shapes_and_token_counts():
    torch.manual_seed(0)
    enc = WhisperStyleEncoder.from_size("debug").eval()
    assert enc.out_dim == 64
    for frames in (1, 100, 101, 3000):
        out = enc(torch.randn(2, 80, frames))
        assert out.shape == (2, enc.num_tokens(frames), 64)
    assert enc.num_tokens(101) == 51 and enc.num_tokens(3000) == 1500
    with pytest.raises(ValueError, match="exceed max_frames=3000"):
        enc(torch.randn(1, 80, 3001))
    with pytest.raises(ValueError, match=r"expected mel \(B, 80, F\)"):
        enc(torch.randn(1, 40, 100))
    with pytest.raises(ValueError, match="unknown audio encoder size 'huge'"):
        WhisperStyleEncoder.from_size("huge")


@pytest.mark.parametrize("conv_kernel,stem,subsample,frames", [
    (0, "conv1d", 2, 60), (5, "conv1d", 2, 60),  # 5: a Conformer convolution module after each layer
    (0, "conv1d", 4, 61), (0, "conv2d", 4, 61), (0, "conv2d", 2, 59)])  # 2-D stem: ESPnet's subsampling
def test_whisper_style_encoder_masks_padding(conv_kernel, stem, subsample, frames):
    torch.manual_seed(0)
    enc = WhisperStyleEncoder.from_size("debug", n_mels=16, conv_kernel=conv_kernel, stem=stem,
                                        subsample=subsample).eval()
    short, long = torch.randn(16, frames), torch.randn(16, 100)
    batch = torch.stack([torch.nn.functional.pad(short, (0, 100 - frames), value=3.0), long])  # any padding
    out = enc(batch, mel_lengths=torch.tensor([frames, 100]))
    alone = enc(short[None])
    n = enc.num_tokens(frames)
    assert alone.shape[1] == n and out.shape[1] == enc.num_tokens(100)
    assert torch.allclose(out[0, :n], alone[0], atol=1e-5)
    unmasked = enc(batch)
    assert not torch.allclose(unmasked[0, :n], alone[0], atol=1e-3)  # the mask is what made them equal
    out.sum().backward()
    assert enc.conv1.weight.grad is not None and enc.conv1.weight.grad.abs().sum() > 0
    if conv_kernel:
        assert enc.convs[0].depthwise.weight.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="conv_kernel must be odd"):
            WhisperStyleEncoder.from_size("debug", conv_kernel=4)
    with pytest.raises(ValueError, match="stem must be one of conv1d, conv2d"):
        WhisperStyleEncoder.from_size("debug", stem="conv3d")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    """A random-init WhisperForConditionalGeneration saved by transformers itself (safetensors)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper_tiny")
    WhisperForConditionalGeneration(WhisperConfig(**TINY_WHISPER)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(whisper_dir):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.encoder.eval()


def test_whisper_tower_features_equal_transformers_whisper_encoder(whisper_dir, reference):
    torch.manual_seed(1)
    tower = audio_encoder("whisper_style", path=str(whisper_dir), freeze=True)
    assert tower.out_dim == 64 and tower.max_frames == 300 and tower.input_mode == "pad"
    mel = torch.randn(2, 80, 300)
    with torch.no_grad():
        ref = reference(mel).last_hidden_state
        assert torch.allclose(tower(mel), ref, atol=1e-5)
        sliced = audio_encoder("whisper_style", path=str(whisper_dir), input_mode="slice")
        assert torch.allclose(sliced(mel), ref, atol=1e-5)


def test_whisper_tower_short_inputs(whisper_dir, reference):
    torch.manual_seed(2)
    tower = audio_encoder("whisper_style", path=str(whisper_dir), freeze=True)
    mel = torch.rand(2, 80, 121) - 0.2  # floor max - 2 > -1.5: the clamp for very quiet audio stays out of it
    floor = mel.amax(dim=(1, 2), keepdim=True) - 2.0
    padded = torch.cat([mel, floor.expand(-1, 80, 300 - 121)], dim=2)
    with torch.no_grad():
        out = tower(mel)
        assert out.shape == (2, tower.num_tokens(121), 64) == (2, 61, 64)
        assert torch.allclose(out, reference(padded).last_hidden_state[:, :61], atol=1e-5)
        # a batch: each clip in its own window, as alone
        both = tower(torch.stack([mel[0], torch.nn.functional.pad(mel[1, :, :100], (0, 21))]),
                     mel_lengths=torch.tensor([121, 100]))
        assert torch.allclose(both[1, :50], tower(mel[1:, :, :100])[0], atol=1e-5)
        fast = audio_encoder("whisper_style", path=str(whisper_dir), input_mode="slice")(mel)
    assert fast.shape == (2, 61, 64)
    with pytest.raises(ValueError, match="exceed max_frames=300"):
        tower(torch.randn(1, 80, 301))


def test_pad_mode_reproduces_whispers_padded_waveform():
    """Padding a short clip's mel with the floor value ~= the mel of the waveform zero-padded to 30 s."""
    wave = torch.randn(12345) * torch.linspace(0, 0.5, 12345)
    short = LogMel()(wave)  # (80, 77)
    full = LogMel(pad_to_s=3.0)(wave)  # (80, 300), as Whisper would compute it
    floor = short.max() - 2.0
    assert torch.allclose(full[:, :76], short[:, :76], atol=1e-5)
    assert torch.allclose(full[:, 79:], torch.full_like(full[:, 79:], floor), atol=1e-5)


def test_frozen_tower_stays_frozen_and_in_eval(whisper_dir):
    tower = audio_encoder("whisper_style", path=str(whisper_dir), freeze=True)
    tower.train()
    assert not tower.training
    assert not any(p.requires_grad for p in tower.parameters())
    trainable = audio_encoder("whisper_style", path=str(whisper_dir))
    assert all(p.requires_grad for p in trainable.parameters())


def test_whisper_model_dir_and_builders(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    ref = WhisperModel(WhisperConfig(**TINY_WHISPER)).eval()
    ref.save_pretrained(tmp_path / "wm")
    tower = audio_encoder("hf_whisper", path=str(tmp_path / "wm"))  # the old kind: the same encoder
    assert isinstance(tower, WhisperStyleEncoder)
    mel = torch.randn(1, 80, 300)
    with torch.no_grad():
        assert torch.allclose(tower.eval()(mel), ref.encoder(mel).last_hidden_state, atol=1e-5)
    keys = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "max_source_positions")
    built = audio_encoder("hf_whisper", whisper_config={k: TINY_WHISPER[k] for k in keys})
    assert built.out_dim == 64 and built(torch.randn(1, 80, 50)).shape == (1, 25, 64)
    assert audio_encoder("whisper_style", size="debug").out_dim == 64
    with pytest.raises(ValueError, match="one of whisper_style; got 'wav2vec'"):
        audio_encoder("wav2vec")
    with pytest.raises(ValueError, match="no config.json"):
        audio_encoder("whisper_style", path=str(tmp_path / "missing"))


def test_tower_from_an_imported_whisper_checkpoint_gives_its_encoders_features(hf_whisper_dir, tmp_path):
    """``{kind: whisper_style, path: DIR}`` on ``omni import whisper --out DIR``: the same weights,
    the same features as the whole imported model's encoder."""
    import omni

    pipe = omni.import_hf(hf_whisper_dir)
    pipe.save_pretrained(tmp_path / "w")
    tower = audio_encoder("whisper_style", path=str(tmp_path / "w"), freeze=True)
    whole = pipe.model.encoders["audio"].encoder
    mel = torch.randn(1, 80, whole.max_frames)
    with torch.no_grad():
        assert torch.equal(tower(mel), whole(mel))
    assert tower.whisper_config == pipe.model.config.media["audio"]["encoder"]["whisper_config"]
