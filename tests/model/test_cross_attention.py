"""Cross-attention fusion: media features as a memory the backbone's cross-attention blocks read
(Whisper's decoder, Flamingo's gated blocks) instead of tokens in the sequence."""

import pytest
import torch

from omni.model.backbone import Backbone, Memory, backbone_config
from omni.model.omni_model import OmniModel, build_model
from omni.pipeline import Pipeline
from omni.sequence import Message, Sample, Segment, pack, render

FEAT = 24  # 48 mel frames through the conv stem (stride 2)


def _model(text_tokenizer, **xa):
    cfg = backbone_config("debug", max_seq_len=128, cross_attention={"every": 1, **xa})
    media = {"audio": {"encoder": {"kind": "whisper_style", "size": "debug"}, "connector": {"kind": "mlp"}}}
    return Pipeline(build_model(cfg, text_tokenizer.vocab, seed=0, media=media), tokenizer=text_tokenizer)


def _sample(mel, text="turn on the light"):
    return Sample([Message("user", [Segment("audio", data=mel, grid=(FEAT, 1, 1)),
                                    Segment(text="Transcribe.")]),
                   Message("assistant", [Segment(text=text)])])


def test_config_validates_and_counts_parameters():
    cfg = backbone_config("debug", cross_attention={"every": 2, "gated": True, "ffn": True})
    assert (cfg.cross_layers() == [0]
            and cfg.to_dict()["cross_attention"] == {"every": 2, "gated": True, "ffn": True, "media": None})
    assert cfg.num_params() == sum(p.numel() for p in Backbone(cfg).parameters())
    assert backbone_config("debug", cross_attention={}).to_dict()["cross_attention"] == {
        "every": 1, "gated": False, "ffn": False, "media": None}
    for bad in ({"every": 0}, {"evry": 1}, {"gated": "yes"}, [1], {"media": []}, {"media": "audio"}):
        with pytest.raises(ValueError, match="cross_attention"):
            backbone_config("debug", cross_attention=bad)


def test_video_read_through_cross_attention_must_carry_time_in_its_features(text_tokenizer):
    cfg = backbone_config("debug", max_seq_len=128, cross_attention={"every": 1})
    tower = {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16}
    for temporal, ok in (("mrope", False), ("qformer", True)):
        media = {"video": {"tokenizer": tower, "video": {"num_frames": 4, "temporal": temporal}}}
        if ok:
            Pipeline(build_model(cfg, text_tokenizer.vocab, media=media), tokenizer=text_tokenizer)
        else:
            with pytest.raises(ValueError, match="temporal: qformer"):
                Pipeline(build_model(cfg, text_tokenizer.vocab, media=media), tokenizer=text_tokenizer)
    # read as tokens (cross-attention for audio only), the frames keep their time positions
    media = {"video": {"tokenizer": tower, "video": {"num_frames": 4, "temporal": "mrope"}}}
    audio_only = backbone_config("debug", max_seq_len=128, cross_attention={"every": 1, "media": ["audio"]})
    assert not Pipeline(build_model(audio_only, text_tokenizer.vocab,
                           media=media), tokenizer=text_tokenizer).reads_by_cross_attention("video")


def test_media_spans_hold_no_feature_tokens(text_tokenizer):
    mel = torch.randn(80, 48)
    full = render(_sample(mel), text_tokenizer)
    short = render(_sample(mel), text_tokenizer, media_tokens=False)
    assert len(full) - len(short) == FEAT
    (slot,) = short.media
    vocab = text_tokenizer.vocab
    assert slot.length == FEAT and short.ids[slot.start] == vocab.id("<|/audio|>")
    assert short.ids[slot.start - 1] == vocab.id("<|audio|>")
    assert short.positions[0, slot.start] == short.positions[0, slot.start - 1] + 1  # no room for features


def test_gated_blocks_start_as_the_backbone_alone():
    torch.manual_seed(0)
    plain = Backbone(backbone_config("debug"))
    plain.reset_parameters()
    gated = Backbone(backbone_config("debug", cross_attention={"every": 1, "gated": True, "ffn": True}))
    gated.reset_parameters()
    gated.load_state_dict(plain.state_dict(), strict=False)
    x, pos = torch.randn(2, 10, 64), torch.arange(10).expand(2, 10)
    memory = Memory(torch.randn(2, 5, 64), torch.zeros(2, 5, dtype=torch.long))
    assert torch.equal(gated(x, pos, memory=memory), plain(x, pos))
    for block in gated.cross.values():  # opening a gate lets the memory in
        block.attn_gate.data.fill_(0.5)
    assert not torch.allclose(gated(x, pos, memory=memory), plain(x, pos))


def test_a_token_reads_the_latest_span_before_it_in_its_own_document():
    start = torch.tensor([[2, 2, 5, 5, 5]])
    mask, reads = Memory(torch.zeros(1, 5, 4), start, torch.tensor([[0, 0, 0, 0, 0]])).mask(
        0, 8, torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]]))
    visible = mask[0, 0] & reads[0]
    assert visible[:2].sum() == 0  # before any media
    assert visible[2:5].tolist() == [[True, True, False, False, False]] * 3
    assert visible[5].tolist() == [False, False, True, True, True]
    assert visible[6:].sum() == 0  # the next packed document has no media of its own


def test_packed_rows_keep_each_documents_memory_apart(text_tokenizer):
    model = _model(text_tokenizer).eval()
    a, b = torch.randn(80, 48), torch.randn(80, 48)
    ra = render(_sample(a), text_tokenizer, **model.render_options())
    rb = render(_sample(b, "what time is it"), text_tokenizer, **model.render_options())
    (row,) = pack([ra, rb], 96, text_tokenizer.vocab.pad_id, split_across_rows=False)
    out = model(row.ids[None], positions=row.positions[0][None], doc_ids=row.doc_ids[None],
                media=[(0, s) for s in row.media]).logits[0]
    alone = model(rb.ids[None], media=[(0, s) for s in rb.media]).logits[0]
    n = len(ra)
    assert torch.allclose(out[n:n + len(rb)], alone, atol=1e-5)


def test_cached_decoding_matches_the_full_forward_and_the_model_learns(tmp_path, text_tokenizer):
    model = _model(text_tokenizer)
    mel = torch.randn(80, 48)
    r = render(_sample(mel), text_tokenizer, **model.render_options())
    media = [(0, s) for s in r.media]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        out = model(r.ids[None], targets=r.targets[None], media=media)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss < 0.05
    model.eval()
    prompt = render(Sample(_sample(mel).messages[:1]), text_tokenizer, **model.render_options(),
                    add_generation_prompt=True)
    new = model.generate(prompt.ids[None], media=[(0, s) for s in prompt.media], max_new_tokens=20)
    assert text_tokenizer.decode(new[0].tolist()).startswith("turn on the light")
    # each cached step picked what a full forward over prompt + the tokens so far picks
    ids = torch.cat([prompt.ids, new[0]])[None]
    full = model(ids, media=[(0, s) for s in prompt.media]).logits[0, len(prompt) - 1:-1].argmax(-1)
    stop = int((new[0] == text_tokenizer.vocab.specials["<|eot|>"]).nonzero()[0]) + 1
    assert torch.equal(full[:stop], new[0, :stop])
    # saved and loaded, it is the same model
    model.save_pretrained(tmp_path / "ckpt")
    again = OmniModel.from_pretrained(tmp_path / "ckpt")
    assert again.config.backbone.to_dict()["cross_attention"] == {"every": 1, "gated": False, "ffn": False,
                                                                  "media": None}
    assert torch.equal(Pipeline(again).generate(prompt.ids[None], media=[(0, s) for s in prompt.media],
                                                max_new_tokens=20), new)


def test_text_only_input_runs_and_a_memory_needs_cross_attention_blocks():
    bb = Backbone(backbone_config("debug"))
    x, pos = torch.randn(1, 4, 64), torch.arange(4)[None]
    with pytest.raises(ValueError, match="no cross-attention blocks"):
        bb(x, pos, memory=Memory(torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.long)))
    xa = Backbone(backbone_config("debug", cross_attention={"every": 1}))
    assert xa(x, pos).shape == (1, 4, 64)


def test_per_modality_fusion_reads_audio_by_cross_attention_and_places_images_as_tokens(text_tokenizer):
    """cross_attention.media: [audio]: speech is a memory, an image's patches sit in the sequence."""
    cfg = backbone_config("debug", max_seq_len=128, cross_attention={"every": 1, "media": ["audio"]})
    media = {"audio": {"encoder": {"kind": "whisper_style", "size": "debug"}, "connector": {"kind": "mlp"}},
             "image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
                       "connector": {"kind": "mlp"}}}
    model = Pipeline(build_model(cfg, text_tokenizer.vocab, seed=0, media=media), tokenizer=text_tokenizer)
    assert model.reads_by_cross_attention("audio") and not model.reads_by_cross_attention("image")
    pixels = torch.rand(3, 32, 32)
    sample = Sample([Message("user", [Segment("audio", data=torch.randn(80, 48), grid=(FEAT, 1, 1)),
                                      Segment("image", data=pixels, grid=(4, 1, 1)), Segment(text="Both?")]),
                     Message("assistant", [Segment(text="a frog")])])
    r = render(sample, text_tokenizer, **model.render_options())
    feat = text_tokenizer.vocab.id("<|feat|>")
    assert int((r.ids == feat).sum()) == 4  # the image's 2x2 patches, no audio feature tokens
    row = pack([r], 128, text_tokenizer.vocab.pad_id)[0]
    batch = dict(positions=row.positions[0][None], targets=row.targets[None], doc_ids=row.doc_ids[None],
                 media=[(0, s) for s in row.media])
    out = model(row.ids[None], **batch)
    out.loss.backward()  # both encoders are reached: one through the memory, one through the tokens
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (model.encoders["audio"].connector.parameters().__next__(),
                         model.encoders["image"].connector.parameters().__next__()))
    with pytest.raises(ValueError, match="cross_attention.media names 'video'"):
        from omni.config import ModelConfig

        ModelConfig(media=media, cross_attention={"media": ["video"]}).validate()


def test_one_span_read_from_the_start_attends_unmasked_with_the_same_outputs():
    """Whisper's memory (one span, visible from the first token): Memory.mask gives (None, None)
    once every query is at or after the span's start, and the blocks compute what the mask would."""
    memory = Memory(torch.randn(2, 5, 64), torch.full((2, 5), 3, dtype=torch.long))
    assert memory.mask(3, 4, None) == (None, None)
    assert memory.mask(2, 4, None)[0] is not None  # query 2 comes before the span
    packed = Memory(memory.features, memory.start, torch.zeros(2, 5, dtype=torch.long))
    assert packed.mask(3, 1, torch.zeros(2, 1, dtype=torch.long))[0] is not None  # documents: masked
    assert Memory(memory.features, torch.tensor([[0, 0, 2, 2, 2]] * 2)).mask(4, 1, None)[0] is not None
    torch.manual_seed(0)
    bb = Backbone(backbone_config("debug", cross_attention={"every": 1})).eval()
    bb.reset_parameters()
    x, pos = torch.randn(2, 6, 64), torch.arange(6).expand(2, 6)
    zero = Memory(memory.features, torch.zeros(2, 5, dtype=torch.long))
    full = bb(x, pos, memory=zero)
    forced = Memory(memory.features, torch.zeros(2, 5, dtype=torch.long))
    forced._one_start = -1  # as if the starts differed: the masked path
    torch.testing.assert_close(full, bb(x, pos, memory=forced))


def test_memory_keys_and_values_are_contiguous_heads():
    """Cached once, read at every decoding step: (B, H, M, hd), contiguous (SDPA's fast read)."""
    bb = Backbone(backbone_config("debug", cross_attention={"every": 1}))
    memory = torch.randn(2, 7, 64)
    k, v = bb.cross["0"].memory_kv(memory)
    assert k.shape == v.shape == (2, 4, 7, 16) and k.is_contiguous() and v.is_contiguous()
    kv = bb.cross["0"].attn.wkv(bb.cross["0"].memory_norm(memory)).view(2, 7, 2, 4, 16)
    torch.testing.assert_close(k, kv[:, :, 0].transpose(1, 2))
    torch.testing.assert_close(v, kv[:, :, 1].transpose(1, 2))
