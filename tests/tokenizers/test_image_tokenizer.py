"""omni.tokenizers.image: the shared contract, patchify, merge, dynamic resolution, and parity of
the transformers towers loaded from local checkpoints."""

from pathlib import Path

import pytest
import torch

from omni.media.image import Image
from omni.tokenizers.image import (
    TOWER_SIZES,
    ImageTokenizerConfig,
    PatchifyImageTokenizer,
    build_image_tokenizer,
    merge_patches,
    smart_resize,
)

STAMPS = Path("/usr/share/tuxpaint/stamps")


def test_smart_resize_matches_transformers_qwen2_vl():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for h, w in [(1080, 1920), (224, 224), (100, 3000), (37, 61), (4000, 3000), (28, 28), (500, 20)]:
        assert smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280) == reference(h, w, 28, 56 * 56, 28 * 28 * 1280)


def test_smart_resize_budget_and_errors():
    for h, w in [(1, 1), (17, 900), (4000, 4000), (64, 48)]:
        rh, rw = smart_resize(h, w, 16, 32 * 32, 128 * 128)
        assert rh % 16 == 0 and rw % 16 == 0 and rh >= 16 and rw >= 16
        assert 32 * 32 <= rh * rw <= 128 * 128
    assert smart_resize(64, 48, 16, 32 * 32, 128 * 128) == (64, 48)  # already fits: untouched
    with pytest.raises(ValueError, match="aspect ratio of a 1x201 image exceeds 200:1"):
        smart_resize(1, 201, 16, 256, 4096)


def test_merge_patches_concatenates_2x2_neighbours():
    h, w = 2, 4
    x = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)  # feature = patch index
    y = merge_patches(x, h, w, 2)
    assert y.shape == (1, 2, 4)
    assert y[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def _patchify(**kw):
    args = dict(patch_size=4, out_dim=6, image_size=16)
    args.update(kw)
    return PatchifyImageTokenizer(**args)


def test_patchify_is_flattened_patches_through_a_linear_layer():
    torch.manual_seed(0)
    tok = _patchify()
    x = torch.randn(2, 3, 8, 12)  # any multiple of the patch size
    feats = tok(x)
    assert feats.shape == (2, 2 * 3, 6) and tok.out_dim == 6 and tok.tokens_per_image == 16
    patch = x[1, :, 4:8, 8:12].reshape(-1)  # row 1, column 2 -> token 1 * 3 + 2
    torch.testing.assert_close(feats[1, 5], tok.proj(patch))
    with pytest.raises(ValueError, match="not a multiple of patch_size \\* merge = 4"):
        tok(torch.randn(1, 3, 10, 8))


def test_preprocess_resizes_and_normalises():
    tok = _patchify()
    white = torch.full((3, 30, 50), 255, dtype=torch.uint8)
    pixels, grid = tok.preprocess(white)
    assert pixels.shape == (3, 16, 16) and grid == (1, 4, 4)
    torch.testing.assert_close(pixels, torch.ones_like(pixels))  # (1 - 0.5) / 0.5
    frames = torch.zeros(5, 3, 20, 20, dtype=torch.uint8)
    pixels, grid = tok.preprocess(frames)
    assert pixels.shape == (5, 3, 16, 16) and grid == (5, 4, 4) and pixels.unique().tolist() == [-1.0]
    feats, grid = tok.encode(Image(white))
    assert feats.shape == (16, 6) and grid == (1, 4, 4)
    with pytest.raises(ValueError, match="expects an omni Image or uint8"):
        tok.preprocess(white.float())


def test_dynamic_resolution_keeps_aspect_and_merges():
    tok = _patchify(dynamic=True, merge=2, min_pixels=16 * 16, max_pixels=64 * 64)
    assert tok.tokens_per_image is None and tok.factor == 8 and tok.out_dim == 24  # concat: 4 x 6
    pixels, grid = tok.preprocess(torch.zeros(3, 40, 120, dtype=torch.uint8))
    assert pixels.shape == (3, 32, 104) and grid == (1, 4, 13)  # 40x120 -> 4800 px > 4096: scaled down
    feats, grid2 = tok.encode(torch.zeros(3, 40, 120, dtype=torch.uint8))
    assert grid2 == grid and feats.shape == (grid[1] * grid[2], 24)
    lin = _patchify(dynamic=True, merge=2, merge_mode="linear")
    assert lin.out_dim == 6 and lin(torch.randn(1, 3, 16, 8)).shape == (1, 2, 6)


def test_merge_4_puts_each_4x4_block_of_patches_in_one_token():
    torch.manual_seed(0)
    one, four = _patchify(image_size=32), _patchify(image_size=32, merge=4)
    four.load_state_dict(one.state_dict())
    assert (four.factor, four.out_dim, four.tokens_per_image) == (16, 16 * 6, 4)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(four(x), merge_patches(one(x), 8, 8, 4))  # every patch kept, 16 a token
    assert ImageTokenizerConfig(kind="dinov2", precompute=True, merge=4).validate() is None


def _save_siglip(tmp_path, full: bool):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = dict(TOWER_SIZES["debug"])
    if full:
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)))
        ref = model.vision_model
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
        ref = model
    model.save_pretrained(tmp_path)
    return ref.eval()


@pytest.mark.parametrize("full", [False, True], ids=["vision_only", "full_siglip"])
def test_siglip_loaded_from_local_checkpoint_matches_transformers(tmp_path, full):
    ref = _save_siglip(tmp_path, full)
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="siglip", path=str(tmp_path))).eval()
    assert tok.patch_size == 8 and tok.image_size == 32 and tok.tokens_per_image == 16 and tok.out_dim == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state
        torch.testing.assert_close(tok(x), expected, atol=0, rtol=0)
    img = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)
    feats, grid = tok.encode(img)
    assert feats.shape == (16, 32) and grid == (1, 4, 4)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_clip_and_vit_drop_the_cls_token(kind):
    torch.manual_seed(0)
    tok = build_image_tokenizer(ImageTokenizerConfig(kind=kind, size="debug")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = tok.tower(pixel_values=x).last_hidden_state
        assert full.shape[1] == 17
        torch.testing.assert_close(tok(x), full[:, 1:], atol=0, rtol=0)
    assert tok.tokens_per_image == 16 and tok.has_positions


def test_global_feature_puts_the_cls_token_or_the_patch_mean_in_every_token():
    torch.manual_seed(0)
    cfg = ImageTokenizerConfig(kind="vit", size="debug", merge=2, global_feature=True)
    vit = build_image_tokenizer(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = vit.tower(pixel_values=x).last_hidden_state  # (2, 1 + 16, 32)
        out = vit(x)
    assert vit.out_dim == 4 * 32 + 32 and out.shape == (2, 4, 160) and vit.tokens_per_image == 4
    torch.testing.assert_close(out[..., :128], merge_patches(full[:, 1:], 4, 4, 2), atol=0, rtol=0)
    torch.testing.assert_close(out[..., 128:], full[:, :1].expand(-1, 4, -1), atol=0, rtol=0)
    cfg = ImageTokenizerConfig(kind="siglip", size="debug", global_feature=True)
    siglip = build_image_tokenizer(cfg).eval()
    with torch.no_grad():
        patches = siglip.tower(pixel_values=x).last_hidden_state  # SigLIP has no CLS: the mean stands in
        out = siglip(x)
    assert siglip.out_dim == 64 and out.shape == (2, 16, 64)
    torch.testing.assert_close(out[..., 32:], patches.mean(1, keepdim=True).expand(-1, 16, -1))


def test_image_feature_is_the_cls_token_or_the_patch_mean_before_any_merge():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)
    for kind in ("vit", "siglip"):  # ViT has a CLS token, SigLIP has none: the patches' mean
        tok = build_image_tokenizer(ImageTokenizerConfig(kind=kind, size="debug", merge=2)).eval()
        with torch.no_grad():
            hidden = tok.tower(pixel_values=tok.preprocess(image)[0][None]).last_hidden_state[0]
        expected = hidden[0] if kind == "vit" else hidden.mean(0)
        assert tok.image_feature(image).shape == (tok.hidden_dim,)
        torch.testing.assert_close(tok.image_feature(Image(image)), expected)


def test_tower_merge_freeze_and_train_mode():
    cfg = ImageTokenizerConfig(kind="siglip", size="debug", merge=2, merge_mode="linear", freeze=True)
    tok = build_image_tokenizer(cfg)
    assert tok.tokens_per_image == 4 and tok.out_dim == 32
    tok.train()
    assert not tok.tower.training and tok.training
    loss = tok(torch.randn(1, 3, 32, 32)).square().mean()
    loss.backward()
    assert all(p.grad is None for p in tok.tower.parameters())
    assert tok.merger.weight.grad is not None
    with pytest.raises(ValueError, match="takes 32x32 pixels, got 16x16"):
        tok(torch.randn(1, 3, 16, 16))


def test_checkpoint_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        build_image_tokenizer(ImageTokenizerConfig(kind="siglip", path=str(tmp_path)))
    _save_siglip(tmp_path, full=False)
    with pytest.raises(ValueError, match="model_type is 'siglip_vision_model', which is not a clip tower"):
        build_image_tokenizer(ImageTokenizerConfig(kind="clip", path=str(tmp_path)))


def test_a_tower_built_from_its_config_alone_names_a_wrong_one():
    from omni.tokenizers.image import tower_from_config

    vit = {"model_type": "vit", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="vit", tower=vit))
    assert (tok.image_size, tok.patch_size, tok.out_dim, tok.tokens_per_image) == (32, 16, 16, 4)
    with pytest.raises(ValueError, match="tower: model_type is 'siglip_vision_model', which is not a clip"):
        tower_from_config("clip", {"model_type": "siglip_vision_model"})


@pytest.mark.parametrize("kw, problem", [
    (dict(kind="dino"), "kind must be one of patchify, siglip, clip, vit"),
    (dict(size="huge"), "size must be one of debug, tiny, small, base"),
    (dict(merge=3), "merge must be one of 1, 2, 4"),
    (dict(merge_mode="mean"), "merge_mode must be one of concat, linear"),
    (dict(kind="siglip", dynamic=True), "dynamic applies to kind 'patchify' only"),
    (dict(kind="patchify", path="x"), "path applies to pretrained towers"),
    (dict(kind="siglip", path="x", image_size=64), "image_size comes from the checkpoint"),
    (dict(kind="patchify", tower={"model_type": "vit"}), "tower applies to pretrained towers"),
    (dict(kind="vit", path="x", tower={"model_type": "vit"}), "path and image_tokenizer.tower both give"),
    (dict(kind="vit", tower={"model_type": "vit"}, patch_size=8), "patch_size comes from image_tokenizer"),
    (dict(min_pixels=10_000, max_pixels=100), "min_pixels .* exceeds max_pixels"),
    (dict(std=[0.5, 0.0, 0.5]), "std must be 3 numbers > 0"),
    (dict(kind="siglip", precompute=True), "precompute needs a frozen tower"),
    (dict(kind="dinov2", freeze=False, precompute=True), "precompute needs a frozen tower"),
    (dict(kind="patchify", precompute=True), "precompute needs a frozen tower"),
    (dict(kind="dinov2", precompute=True, merge=2, merge_mode="linear"), "use merge_mode: concat"),
    (dict(kind="dinov2", path="x", patch_size=14), "patch_size comes from the checkpoint"),
])
def test_config_errors(kw, problem):
    with pytest.raises(ValueError, match=problem):
        ImageTokenizerConfig(**kw).validate()


def test_config_from_dict_and_patchify_sizes():
    from omni.config import from_dict

    cfg = from_dict(ImageTokenizerConfig, {"kind": "patchify", "size": "debug", "merge": 2})
    tok = build_image_tokenizer(cfg)
    assert (tok.patch_size, tok.image_size, tok.out_dim, tok.tokens_per_image) == (8, 32, 128, 4)
    with pytest.raises(ValueError, match="must be a multiple of patch_size \\* merge = 16"):
        build_image_tokenizer(ImageTokenizerConfig(kind="patchify", size="debug", merge=2, image_size=40))


@pytest.mark.skipif(not STAMPS.is_dir(),
                    reason="Tux Paint stamps not installed (apt-get install tuxpaint-stamps-default)")
def test_real_stamp_through_a_tiny_siglip():
    torch.manual_seed(0)
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="siglip", size="tiny")).eval()
    with torch.no_grad():
        feats, grid = tok.encode(Image(STAMPS / "animals" / "amphibians" / "frog.png"))
    assert grid == (1, 8, 8) and feats.shape == (64, 64) and torch.isfinite(feats).all()
