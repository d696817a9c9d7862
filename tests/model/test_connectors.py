"""omni.model.connectors: shapes, grids, masks, options, and that each connector can learn."""

import pytest
import torch

from omni.model.connectors import CONNECTORS, ConnectorConfig, build_connector

KW = {"linear": {}, "mlp": {"hidden_dim": 24},
      "perceiver": {"num_queries": 5, "num_layers": 2, "num_heads": 2, "hidden_dim": 16},
      "qformer": {"num_queries": 5, "num_layers": 2, "num_heads": 2, "hidden_dim": 16},
      "attnpool": {"num_queries": 5, "num_heads": 2, "hidden_dim": 16}}
RESAMPLERS = ("perceiver", "qformer", "attnpool")
LEARNED = [k for k in CONNECTORS if k != "identity"]


def test_identity_passes_features_through_at_the_same_width():
    x = torch.randn(2, 7, 12)
    c = build_connector("identity", 12, 12)
    assert c(x) is x and c.grid((7, 1, 1)) == (7, 1, 1) and not list(c.parameters())
    with pytest.raises(ValueError, match="identity needs"):
        build_connector("identity", 12, 20)


@pytest.mark.parametrize("kind", LEARNED)
def test_shapes_and_grids(kind):
    torch.manual_seed(0)
    c = build_connector(kind, 12, 20, **KW[kind])
    x = torch.randn(3, 16, 12)
    y = c(x)
    m = 5 if kind in RESAMPLERS else 16
    assert y.shape == (3, m, 20) and c.num_tokens(16) == m
    assert c.grid((4, 2, 2)) == ((5, 1, 1) if kind in RESAMPLERS else (4, 2, 2))
    assert c.in_dim == 12 and c.out_dim == 20


@pytest.mark.parametrize("kind", RESAMPLERS)
def test_mask_hides_padding(kind):
    torch.manual_seed(0)
    c = build_connector(kind, 8, 8, **KW[kind]).eval()
    x = torch.randn(1, 6, 8)
    padded = torch.cat([x, 100 * torch.randn(1, 4, 8)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    torch.testing.assert_close(c(padded, mask), c(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(c(padded), c(x), atol=1e-3)  # without the mask, the padding matters


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from threads, and on a loaded machine two spinning threads are 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", LEARNED)
def test_each_connector_learns(kind, one_thread):
    """Regress fixed random targets from fixed inputs: the loss falls by more than 90% in 150 steps."""
    torch.manual_seed(0)
    c = build_connector(kind, 32, 16, **KW[kind])
    x = torch.randn(2, 8, 32)
    target = torch.randn(2, c.num_tokens(8), 16)
    opt = torch.optim.Adam(c.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(c(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, (kind, first, loss.item())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="one of identity, linear, mlp, perceiver, qformer, attnpool; got"):
        build_connector("conv", 4, 4)
    with pytest.raises(ValueError, match="connector 'linear' has no option 'num_queries'; allowed: none"):
        build_connector("linear", 4, 4, num_queries=3)
    with pytest.raises(ValueError, match=r"hidden_dim \(10\) must be divisible by num_heads \(4\)"):
        build_connector("qformer", 4, 10)
    with pytest.raises(ValueError, match="connector.num_layers does not apply to kind 'attnpool'"):
        ConnectorConfig(kind="attnpool", num_layers=2).validate()
    with pytest.raises(ValueError, match="connector.num_queries must be >= 1"):
        ConnectorConfig(kind="qformer", num_queries=0).validate()
    c = ConnectorConfig(kind="perceiver", num_queries=3, num_heads=2).build(8, 6)
    assert c(torch.randn(1, 4, 8)).shape == (1, 3, 6)


def test_config_loads_through_from_dict():
    from omni.config import from_dict

    cfg = from_dict(ConnectorConfig, {"kind": "qformer", "num_queries": 4})
    assert cfg.options() == {"num_queries": 4}


@pytest.mark.parametrize("kind", LEARNED)
def test_norm_holds_the_tokens_at_the_gain_it_is_given(kind):
    c = ConnectorConfig(kind=kind, norm=True, **KW[kind]).build(8, 6)
    c.match_scale(0.25)
    x = 100 * torch.randn(2, 7, 8)  # features far off scale: the tokens are not
    rms = c(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.25), rtol=1e-3, atol=1e-4)
    assert c.grid((7, 1, 1)) == build_connector(kind, 8, 6, **KW[kind]).grid((7, 1, 1))
    with pytest.raises(ValueError, match="connector.norm does not apply to kind 'identity'"):
        ConnectorConfig(kind="identity", norm=True).validate()


def test_a_model_sets_its_normed_connectors_to_the_embedding_scale(text_tokenizer):
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model

    media = {"image": {"tokenizer": {"kind": "vit", "size": "debug"},
                       "connector": {"kind": "mlp", "norm": True}}}
    model = build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0, media=media)
    with torch.no_grad():
        model.embed.weight.mul_(3.0)  # as loading a pretrained LM changes the embeddings
    model.match_media_scale()
    emb_rms = model.embed.weight[:model.config.vocab.text_size].pow(2).mean().sqrt()
    out = model.encoders["image"].connector(torch.randn(1, 4, model.encoders["image"].connector.in_dim))
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), emb_rms.expand(1, 4), rtol=1e-3, atol=1e-5)
