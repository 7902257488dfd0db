"""Dilated ResNet backbones with the reference CPS ("v1c") deep stem.

The module layout (and therefore the state-dict names) is the torchvision one,
with the deep stem stored as ``conv1 = Sequential(conv, bn, relu, conv, bn,
relu, conv)`` followed by ``bn1``, which is also how the reference CPS code
(TorchSemiSeg ``furnace`` ResNet), timm's ``resnet*c/d/s`` and the published
``resnet50_v1c.pth`` files name it::

    conv1.0  conv1.1  conv1.3  conv1.4  conv1.6  bn1  layer1.0.conv1 ...

Dilation follows the reference ``_nostride_dilate``: every stride-2
convolution of a dilated stage gets stride 1, and every 3x3 convolution of
block ``i`` gets dilation ``rate * multi_grid[i]``. With output stride 16 the
reference dilates layer4 with rates 2, 4, 8 (multi-grid 1, 2, 4 on rate 2).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "resnet"]

NormLayer = Callable[[int], nn.Module]

# depth -> (block type, blocks per stage)
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck, stride on the 3x3 (ResNet "v1b", as the reference)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature extractor returning the outputs of layer1..layer4.

    Args:
        depth: 18, 34, 50, 101 or 152.
        deep_stem: three 3x3 convolutions (3 -> w, w -> w, w -> 2w, the first
            with stride 2; ``w = stem_width``) instead of one 7x7 convolution;
            both followed by BN, ReLU and a 3x3 stride-2 max-pool.
        stem_width: ``w`` above. The reference CPS code uses 64 (stem output
            128 channels, ``resnet50_v1c.pth``); timm's ``resnet*c/d`` use 32.
        output_stride: 32 (no dilation), 16 (layer4 dilated) or 8 (layer3 and
            layer4 dilated).
        multi_grid: per-block dilation multipliers of the last dilated stage
            (the reference: (1, 2, 4), i.e. rates 2, 4, 8 at output stride 16).
        avg_down: downsample shortcuts as average pooling + stride-1 1x1
            convolution (timm ``resnet*d``); the reference uses strided 1x1.
        norm_layer: normalisation factory ``f(channels)``; BatchNorm2d with
            eps 1e-5 and momentum 0.1 (the reference's bn_eps / bn_momentum).
    """

    def __init__(self, depth: int = 50, *, deep_stem: bool = True, stem_width: int = 64,
                 output_stride: int = 16, multi_grid: Sequence[int] = (1, 2, 4),
                 avg_down: bool = False, norm_layer: NormLayer | None = None):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"ResNet depth={depth!r} is not supported; expected one of {sorted(RESNET_SPECS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={output_stride!r}; expected 8, 16 or 32")
        if not multi_grid or any(int(g) < 1 for g in multi_grid):
            raise ValueError(f"multi_grid={tuple(multi_grid)!r}; expected positive integers")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        kind, layers = RESNET_SPECS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.block_kind = kind
        self.layers_spec = layers
        self.deep_stem = deep_stem
        self.stem_width = stem_width if deep_stem else 64
        self.output_stride = output_stride
        self.avg_down = avg_down
        self._norm_layer = norm_layer

        stem_out = 2 * stem_width if deep_stem else 64
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_out, 3, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        # (stride, per-block dilations) of layer2..layer4 for each output stride
        grid = [int(g) for g in multi_grid]
        if output_stride == 32:
            plan = [(2, None), (2, None), (2, None)]
        elif output_stride == 16:
            plan = [(2, None), (2, None), (1, [2 * g for g in grid])]
        else:
            plan = [(2, None), (1, [2] * layers[2]), (1, [4 * g for g in grid])]

        self.inplanes = stem_out
        self.layer1 = self._make_layer(block, 64, layers[0], 1, None)
        self.layer2 = self._make_layer(block, 128, layers[1], *plan[0])
        self.layer3 = self._make_layer(block, 256, layers[2], *plan[1])
        self.layer4 = self._make_layer(block, 512, layers[3], *plan[2])
        self.out_channels = (64 * block.expansion, 128 * block.expansion,
                             256 * block.expansion, 512 * block.expansion)
        self.reset_parameters()

    def _make_layer(self, block, planes: int, blocks: int, stride: int,
                    dilations: list[int] | None) -> nn.Sequential:
        norm_layer = self._norm_layer
        if dilations is None:
            dilations = [1] * blocks
        elif len(dilations) < blocks:  # multi-grid shorter than the stage: repeat its last rate
            dilations = dilations + [dilations[-1]] * (blocks - len(dilations))
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            out = planes * block.expansion
            if self.avg_down:
                pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                        if stride != 1 else nn.Identity())
                downsample = nn.Sequential(pool, nn.Conv2d(self.inplanes, out, 1, bias=False), norm_layer(out))
            else:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                           norm_layer(out))
        mods = [block(self.inplanes, planes, stride, dilations[0], downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            mods.append(block(self.inplanes, planes, 1, dilations[i], None, norm_layer))
        return nn.Sequential(*mods)

    def reset_parameters(self) -> None:
        """Random initialisation used when no pretrained file is given
        (Kaiming-normal fan_out for convolutions, BN weight 1 and bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def name(self) -> str:
        return f"resnet{self.depth}"

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns ``[layer1, layer2, layer3, layer4]`` features (strides 4, 8, then per output stride)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def resnet(name: str, **kwargs) -> ResNet:
    """Builds a backbone from a name such as ``"resnet50"`` (keywords as :class:`ResNet`)."""
    if not isinstance(name, str) or not name.startswith("resnet") or not name[6:].isdigit():
        raise ValueError(f"backbone={name!r}; expected one of "
                         f"{', '.join(f'resnet{d}' for d in sorted(RESNET_SPECS))}")
    return ResNet(int(name[6:]), **kwargs)
