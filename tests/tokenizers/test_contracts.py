"""omni.tokenizers.base: every registered backend, built tiny, implements its family's contract
and states rates and sizes that agree with what it computes; a new backend is one class plus one
registry line, and is then built by name through the family's builder."""

import json
import math

import pytest
import torch

from omni.media.video import Video
from omni.tokenizers.audio import MEL_HOP_LENGTH, AudioCodec, LogMel, audio_encoder, load_codec
from omni.tokenizers.base import (
    AUDIO_ENCODERS,
    CODECS,
    IMAGE_TOWERS,
    TEXT_TOKENIZERS,
    BaseAudioEncoder,
    BaseCodec,
    BaseImageTower,
    BaseTextTokenizer,
    BaseVideoTokenizer,
    Registry,
)
from omni.tokenizers.bpe import BPETokenizer
from omni.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, build_image_tokenizer
from omni.tokenizers.text import load_text_tokenizer
from omni.tokenizers.video import VideoTokenizerConfig, build_video_tokenizer
from omni.tokenizers.whisper import WhisperTokenizer
from omni.vocab import SPECIAL_TOKENS

TINY_WHISPER = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                "max_source_positions": 150}  # 300 mel frames = 3 s

# How each registered backend is built tiny: a backend registered without an entry here fails
# test_every_registered_backend_is_built_here.
IMAGE_BUILDS = {
    "patchify": [{"size": "debug"}, {"size": "debug", "merge": 2},
                 {"size": "debug", "merge": 2, "merge_mode": "linear"}],
    "siglip": [{"size": "debug"}, {"size": "debug", "merge": 2}],
    "clip": [{"size": "debug"}],
    "vit": [{"size": "debug", "patch_size": 16}],
    "dinov2": [{"size": "debug"}, {"size": "debug", "merge": 2, "freeze": False}],
    "efficientnet": [{"image_size": 64}, {"image_size": 128, "merge": 2}],
}
AUDIO_ENCODER_BUILDS = {
    "whisper_style": [{"size": "debug"},
                      {"size": "debug", "subsample": 4, "stem": "conv2d", "stem_channels": 4},
                      # a Whisper's encoder: also what checkpoints of the old tower (kind hf_whisper) build
                      {"whisper_config": TINY_WHISPER},
                      {"whisper_config": TINY_WHISPER, "input_mode": "pad"}],
}
CODEC_BUILDS = {"encodec": [lambda: AudioCodec("debug")]}
TEXT_BUILDS = {"sentencepiece": "text_tokenizer", "bpe": "bpe_text_tokenizer",  # fixtures (conftest, below)
               "whisper": "whisper_text_tokenizer"}


def _cases(builds: dict) -> list:
    return [pytest.param(kind, opts, id=f"{kind}-{i}") for kind, all_opts in builds.items()
            for i, opts in enumerate(all_opts)]


@pytest.mark.parametrize("registry, builds", [(TEXT_TOKENIZERS, TEXT_BUILDS), (IMAGE_TOWERS, IMAGE_BUILDS),
                                              (AUDIO_ENCODERS, AUDIO_ENCODER_BUILDS), (CODECS, CODEC_BUILDS)],
                         ids=["text", "image", "audio_encoder", "codec"])
def test_every_registered_backend_is_built_here(registry, builds):
    assert set(registry.names()) == set(builds), f"build each {registry.family} backend tiny in this file"


# -- text ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_text_tokenizer(bpe_tokenizer):
    """The tiny byte-level BPE of conftest, eos ``<|im_end|>``."""
    return BPETokenizer(bpe_tokenizer, eos_id=bpe_tokenizer.token_to_id("<|im_end|>"))


@pytest.fixture(scope="module")
def whisper_text_tokenizer(whisper_tokenizer_json):
    """conftest's tiny Whisper-shaped BPE, multilingual."""
    return WhisperTokenizer.from_file(whisper_tokenizer_json, multilingual=True)


@pytest.mark.parametrize("kind", TEXT_TOKENIZERS.names())
def test_text_tokenizer_contract(kind, request, tmp_path):
    text_tokenizer = request.getfixturevalue(TEXT_BUILDS[kind])
    text_tokenizer.save(tmp_path)
    assert type(load_text_tokenizer(tmp_path)) is TEXT_TOKENIZERS.get(kind)  # found by its files
    tok = load_text_tokenizer(tmp_path, kind)
    assert isinstance(tok, BaseTextTokenizer) and type(tok) is TEXT_TOKENIZERS.get(kind)
    assert len(tok) == tok.vocab.text_size == len(text_tokenizer)
    specials = {tok.vocab.id(t) for t in SPECIAL_TOKENS}
    text = "The cat sat. " + " ".join(SPECIAL_TOKENS)
    ids = tok.encode(text)
    assert ids == text_tokenizer.encode(text) and all(0 <= i < len(tok) for i in ids)
    assert not specials & set(ids), "user text must never encode to a special token"
    assert tok.decode(ids) == text and tok.decode([*ids, *specials, len(tok) + 5]) == text
    head, tail = tok.encode("The cat"), tok.encode("The cat sat")
    assert tail[:len(head)] == head
    assert tok.decode_continuation(tail[len(head):], head) == " sat"


# -- image towers ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, opts", _cases(IMAGE_BUILDS))
def test_image_tower_contract(kind, opts):
    torch.manual_seed(0)
    tower = build_image_tokenizer(ImageTokenizerConfig(kind=kind, **opts)).eval()
    assert isinstance(tower, BaseImageTower) and isinstance(tower, IMAGE_TOWERS.get(kind))
    assert tower.kind == kind
    size, patch = tower.image_size, tower.patch_size
    assert size % patch == 0
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)
    assert tower.target_size(45, 70) == (size, size)
    pixels, grid = tower.preprocess(image)
    assert pixels.shape == (3, size, size) and pixels.is_floating_point()
    assert grid == (1, *tower.grid_for(size, size))
    assert tower.tokens_per_image == math.prod(grid) == (size // (patch * opts.get("merge", 1))) ** 2
    with torch.no_grad():
        feats = tower(pixels[None].expand(2, -1, -1, -1))
    assert feats.shape == (2, tower.tokens_per_image, tower.out_dim)
    frames = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    assert tower.preprocess(frames)[1] == (3, *grid[1:])


def test_dynamic_resolution_has_no_fixed_size_and_the_grid_follows_the_image():
    tower = build_image_tokenizer(ImageTokenizerConfig(kind="patchify", size="debug", dynamic=True,
                                                       min_pixels=16 * 16, max_pixels=64 * 64)).eval()
    assert tower.image_size is None and tower.tokens_per_image is None
    pixels, grid = tower.preprocess(torch.zeros(3, 30, 50, dtype=torch.uint8))
    assert pixels.shape[1:] == tower.target_size(30, 50) == (32, 48) and grid == (1, 4, 6)
    with torch.no_grad():
        assert tower(pixels[None]).shape == (1, math.prod(grid), tower.out_dim)


# -- video -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", ["mrope", "qformer"])
def test_video_tokenizer_contract(temporal, tmp_path):
    torch.manual_seed(0)
    image = build_image_tokenizer(ImageTokenizerConfig(kind="patchify", size="debug"))
    video = build_video_tokenizer(VideoTokenizerConfig(num_frames=3, temporal=temporal, num_queries=5,
                                                       qformer_heads=2), image).eval()
    assert isinstance(video, BaseVideoTokenizer)
    assert (video.num_frames, video.fps, video.out_dim) == (3, None, image.out_dim)
    loaded = video.load(tmp_path / "clip.mp4", start=0.5)  # decoded on first use only
    assert isinstance(loaded, Video) and (loaded.num_frames, loaded.fps, loaded.start) == (3, None, 0.5)
    frames = torch.randint(0, 256, (3, 3, 40, 24), dtype=torch.uint8)
    pixels, grid = video.preprocess(frames)
    with torch.no_grad():
        (feats,) = video.encode_pixels([pixels])
    assert video.num_tokens(3, 40, 24) == math.prod(grid) == feats.shape[0]
    assert feats.shape[1] == video.out_dim


# -- audio in --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, opts", _cases(AUDIO_ENCODER_BUILDS))
def test_audio_encoder_contract(kind, opts):
    torch.manual_seed(0)
    enc = audio_encoder(kind, **opts).eval()
    assert isinstance(enc, BaseAudioEncoder) and isinstance(enc, AUDIO_ENCODERS.get(kind))
    logmel = LogMel(n_mels=enc.n_mels)  # the front end every audio encoder reads
    assert enc.sample_rate == logmel.sample_rate and logmel.hop_length == MEL_HOP_LENGTH
    one_second = logmel.num_frames(enc.sample_rate)
    assert enc.num_tokens(one_second) == enc.frame_rate
    for seconds in (1.0, 0.37):
        mel = logmel(0.1 * torch.randn(int(seconds * enc.sample_rate)))
        with torch.no_grad():
            out = enc(mel[None])
        assert out.shape == (1, enc.num_tokens(mel.shape[-1]), enc.out_dim)


# -- audio out -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, build", _cases(CODEC_BUILDS))
def test_codec_contract(kind, build, tmp_path):
    torch.manual_seed(0)
    codec = build()
    assert isinstance(codec, BaseCodec) and isinstance(codec, CODECS.get(kind))
    assert codec.frame_rate == codec.sample_rate / codec.hop_length
    assert codec.num_frames(codec.sample_rate) == math.ceil(codec.frame_rate)
    wave = 0.1 * torch.randn(1000)
    codes = codec.encode(wave)
    assert codes.shape == (codec.num_codebooks, codec.num_frames(1000)) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < codec.cardinality
    assert codec.encode(wave[None].expand(2, -1)).shape == (2, *codes.shape)
    assert codec.decode(codes).shape == (codes.shape[1] * codec.hop_length,)
    assert codec.decode(codes, length=1000).shape == (1000,)
    codec.save(tmp_path / "codec")
    loaded = load_codec(tmp_path / "codec")
    assert type(loaded) is type(codec) and torch.equal(loaded.encode(wave), codes)


def test_load_codec_names_the_registered_kinds(tmp_path):
    AudioCodec("debug").save(tmp_path / "codec")
    meta = tmp_path / "codec" / "config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "kind": "dac"}))
    with pytest.raises(ValueError, match=r"config.json: kind must be one of encodec; got 'dac'"):
        load_codec(tmp_path / "codec")
    with pytest.raises(ValueError, match="not an omni audio codec directory"):
        load_codec(tmp_path / "missing")


# -- one class plus one registry line --------------------------------------------------------


class MeanPoolTower(ImageTokenizer):
    """A toy image tower on the shared implementation: each patch's mean colour."""

    kind = "meanpool"

    def __init__(self, patch_size: int, image_size: int):
        super().__init__(patch_size=patch_size, hidden_dim=3, image_size=image_size)

    @classmethod
    def build(cls, cfg):
        return cls(patch_size=cfg.patch_size or 8, image_size=cfg.image_size or 32)

    def _features(self, pixels):
        p = self.patch_size
        return torch.nn.functional.avg_pool2d(pixels, p).flatten(2).transpose(1, 2), None


class FrameEnergyEncoder(BaseAudioEncoder):
    """A toy audio encoder written against the contract alone: mean mel energy per 4 frames."""

    def __init__(self, n_mels: int = 80):
        super().__init__()
        self._n_mels = n_mels

    sample_rate = property(lambda self: 16000)
    n_mels = property(lambda self: self._n_mels)
    frame_rate = property(lambda self: 16000 / MEL_HOP_LENGTH / 4)
    out_dim = property(lambda self: 1)

    @classmethod
    def build(cls, n_mels: int = 80, **_):
        return cls(n_mels)

    def num_tokens(self, num_frames: int) -> int:
        return -(-num_frames // 4)

    def forward(self, mel):
        return torch.nn.functional.avg_pool1d(mel.mean(1, keepdim=True), 4, ceil_mode=True).transpose(1, 2)


class ToyCodec(BaseCodec):
    """A toy codec: one codebook of 16 levels, the mean of each 80-sample frame."""

    sample_rate = property(lambda self: 8000)
    hop_length = property(lambda self: 80)
    frame_rate = property(lambda self: 100.0)
    num_codebooks = property(lambda self: 1)
    cardinality = property(lambda self: 16)

    def encode(self, wave):
        frames = torch.nn.functional.pad(wave, (0, -wave.shape[-1] % 80)).unflatten(-1, (-1, 80)).mean(-1)
        return ((frames.clamp(-1, 1) + 1) * 7.5).round().long().unsqueeze(-2)

    def decode(self, codes, length=None):
        wave = (codes.squeeze(-2).float() / 7.5 - 1).repeat_interleave(80, dim=-1)
        return wave if length is None else wave[..., :length]

    def save(self, directory):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps({"kind": "toy"}))
        return directory

    @classmethod
    def load(cls, directory, num_codebooks=None):
        return cls()


def test_a_backend_is_one_class_plus_one_registry_line(tmp_path):
    assert "meanpool" not in IMAGE_TOWERS and "energy" not in AUDIO_ENCODERS and "toy" not in CODECS
    IMAGE_TOWERS.register("meanpool", MeanPoolTower)
    AUDIO_ENCODERS.register("energy", FrameEnergyEncoder)
    CODECS.register("toy", ToyCodec)
    try:
        tower = build_image_tokenizer(ImageTokenizerConfig(kind="meanpool", size="debug", image_size=16))
        assert isinstance(tower, MeanPoolTower) and tower.tokens_per_image == 4
        assert tower(tower.preprocess(torch.zeros(3, 9, 9, dtype=torch.uint8))[0][None]).shape == (1, 4, 3)
        enc = audio_encoder("energy", n_mels=40)
        assert isinstance(enc, FrameEnergyEncoder) and enc.n_mels == 40
        assert enc(torch.randn(2, 40, 10)).shape == (2, enc.num_tokens(10), 1)
        ToyCodec().save(tmp_path / "toy")
        codec = load_codec(tmp_path / "toy")
        assert isinstance(codec, ToyCodec) and codec.encode(torch.zeros(200)).tolist() == [[8, 8, 8]]
    finally:
        IMAGE_TOWERS.unregister("meanpool")
        AUDIO_ENCODERS.unregister("energy")
        CODECS.unregister("toy")
    with pytest.raises(ValueError, match="image_tokenizer.kind must be one of patchify, siglip, clip, vit, "
                                         "dinov2, efficientnet; got 'meanpool'"):
        build_image_tokenizer(ImageTokenizerConfig(kind="meanpool"))
    with pytest.raises(ValueError, match="audio encoder kind must be one of whisper_style; "
                                         "got 'energy'"):
        audio_encoder("energy")


def test_a_contract_refuses_a_backend_that_does_not_state_its_rates():
    class NoRates(BaseCodec):
        sample_rate = property(lambda self: 8000)

    with pytest.raises(TypeError, match="abstract"):
        NoRates()


def test_registry_rules():
    reg = Registry("codec", BaseCodec)
    assert reg.register("toy", ToyCodec) is ToyCodec and reg.register("toy", ToyCodec) is ToyCodec
    assert reg.names() == ("toy",) and "toy" in reg and list(reg) == ["toy"] and len(reg) == 1
    with pytest.raises(ValueError, match="codec 'toy' is already registered"):
        reg.register("toy", AudioCodec)
    with pytest.raises(TypeError, match="does not implement BaseCodec"):
        reg.register("tower", MeanPoolTower)
    with pytest.raises(ValueError, match="needs a non-empty name"):
        reg.register("", ToyCodec)
    with pytest.raises(ValueError, match=r"codec kind must be one of toy; got \['x'\]"):
        reg.get(["x"])
    with pytest.raises(ValueError, match="codec.kind must be one of toy; got 'dac'"):
        reg.get("dac", "codec.kind")
    assert reg.unregister("toy") is ToyCodec and len(reg) == 0
    with pytest.raises(ValueError, match=r"must be one of \(none registered\); got 'toy'"):
        reg.unregister("toy")
