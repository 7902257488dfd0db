"""DeepLabv3+ as in the reference CPS code (TorchSemiSeg ``network.py``).

Module and parameter names follow the reference (``backbone``, ``head.aspp.map_convs``,
``head.aspp.map_bn``, ``head.aspp.global_pooling_conv`` ..., ``head.reduce``,
``head.last_conv``, ``classifier``), so the state dict of one reference branch
(``branch1.*`` with the prefix removed) loads into :class:`DeepLabV3Plus`
built with ``backbone="resnet50", stem_width=64``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet, resnet

__all__ = ["ASPP", "DeepLabHead", "DeepLabV3Plus", "deeplabv3plus", "init_head_"]

NormLayer = Callable[[int], nn.Module]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of the reference.

    Four branches (1x1 and three dilated 3x3) are concatenated, normalised with
    one BN over all of them, LeakyReLU, reduced by a 1x1 convolution to
    ``out_channels``; the image-pooling branch (global mean, 1x1, BN,
    LeakyReLU, 1x1) is *added* to that (broadcast over space), then BN and
    LeakyReLU.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 hidden_channels: int = 256, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP rates={tuple(rates)!r}; expected three dilation rates")
        self.rates = tuple(int(r) for r in rates)
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False) for r in self.rates]
        )
        self.map_bn = norm_layer(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_layer(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_layer(out_channels)
        self.leak_relu = nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.leak_relu(self.map_bn(out)))
        # avg_pool2d over the whole map rather than x.mean((2, 3)) (or adaptive_avg_pool2d, which
        # becomes a mean): the mean's expanded gradient comes back NCHW and turns the summed layer4
        # gradient into an NCHW copy; avg_pool2d's backward keeps channels_last.
        pool = F.avg_pool2d(x, kernel_size=x.shape[-2:])
        pool = self.leak_relu(self.global_pooling_bn(self.global_pooling_conv(pool)))
        pool = self.pool_red_conv(pool)
        # Broadcast add = the reference's pool.repeat(1, 1, H, W) followed by +=, without materialising the repeat.
        out = out + pool
        return self.leak_relu(self.red_bn(out))


class DeepLabHead(nn.Module):
    """ASPP over the last feature map plus the DeepLabv3+ decoder.

    The low-level (layer1) features are reduced to 48 channels (1x1, BN, ReLU);
    the ASPP output is upsampled to their size (bilinear, align_corners=True),
    concatenated (256 + 48 = 304 channels) and passed through two 3x3x256
    conv-BN-ReLU. Returns the 256-channel decoder features. ``channels`` (256)
    and ``low_out`` (48) are the reference's widths; narrower heads are for
    CPU-sized experiments such as the demo.
    """

    def __init__(self, in_channels: int, low_channels: int, rates: Sequence[int] = (6, 12, 18),
                 norm_layer: NormLayer = nn.BatchNorm2d, channels: int = 256, low_out: int = 48):
        super().__init__()
        self.channels = channels
        self.aspp = ASPP(in_channels, channels, rates, hidden_channels=channels, norm_layer=norm_layer)
        self.reduce = nn.Sequential(
            nn.Conv2d(low_channels, low_out, 1, bias=False),
            norm_layer(low_out),
            nn.ReLU(inplace=True),
        )
        self.last_conv = nn.Sequential(
            nn.Conv2d(channels + low_out, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low = features[0]
        f = self.aspp(features[-1])
        low = self.reduce(low)
        f = F.interpolate(f, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((f, low), dim=1))


def init_head_(module: nn.Module, bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
    """The reference ``init_weight`` on the head and classifier: Kaiming-normal
    (fan_in, ReLU) convolution weights; every BatchNorm gets weight 1, bias 0,
    ``eps=bn_eps`` and ``momentum=bn_momentum``. Convolution biases keep
    PyTorch's default initialisation, as in the reference."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.eps = bn_eps
            m.momentum = bn_momentum
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class DeepLabV3Plus(nn.Module):
    """One CPS branch: ResNet backbone, DeepLabv3+ head, 1x1 classifier.

    ``forward(x)`` returns logits of shape ``(N, num_classes, H, W)`` for an
    ``(N, 3, H, W)`` input (bilinear, align_corners=True), in the input's memory
    format. ``forward(x, return_low=True)`` (or ``upsample=False`` at
    construction) returns the logits at the decoder's resolution instead (the
    layer1 size, ``ceil(ceil(H/2)/2)`` by ``ceil(ceil(W/2)/2)``), for a loss
    that fuses the upsampling.
    """

    def __init__(self, backbone: ResNet, num_classes: int = 21, *, rates: Sequence[int] = (6, 12, 18),
                 upsample: bool = True, norm_layer: NormLayer | None = None, head_channels: int = 256):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}; expected a positive integer")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.backbone = backbone
        self.head = DeepLabHead(backbone.out_channels[-1], backbone.out_channels[0], rates, norm_layer,
                                channels=head_channels, low_out=48 if head_channels >= 256 else max(8, head_channels // 4))
        self.classifier = nn.Conv2d(head_channels, num_classes, 1, bias=True)
        self.num_classes = num_classes
        self.upsample = upsample

    def forward(self, x: torch.Tensor, return_low: bool | None = None) -> torch.Tensor:
        """Logits at the input size, or at the decoder size when ``return_low``
        (default: ``not self.upsample``)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV3Plus input has shape {tuple(x.shape)}; expected (N, 3, H, W)")
        logits = self.classifier(self.head(self.backbone(x)))
        if return_low if return_low is not None else not self.upsample:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def deeplabv3plus(backbone: str = "resnet50", num_classes: int = 21, output_stride: int = 16,
                  deep_stem: bool = True, pretrained: str | None = None, *, stem_width: int = 64,
                  multi_grid: Sequence[int] = (1, 2, 4), avg_down: bool = False,
                  aspp_rates: Sequence[int] | None = None, upsample: bool = True,
                  bn_eps: float = 1e-5, bn_momentum: float = 0.1, seed: int | None = None,
                  norm_layer: NormLayer | None = None, head_channels: int = 256) -> DeepLabV3Plus:
    """Builds one DeepLabv3+ branch as the reference CPS network.

    Args:
        backbone: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"`` (also 34/152).
        num_classes: output channels of the classifier.
        output_stride: 16 (layer4 dilated, rates 2/4/8, ASPP 6/12/18 as the
            reference) or 8 (layer3 dilated 2, layer4 4/8/16, ASPP 12/24/36;
            the reference only has 16, this doubles every rate as DeepLabv3 does).
        deep_stem: the reference "v1c" stem (three 3x3 convs) or the 7x7 stem.
        pretrained: path of a local ResNet state-dict file loaded into the
            backbone (see :func:`cps_fast.models.load_backbone_weights`);
            ``None`` for random initialisation. Nothing is ever downloaded.
        stem_width: deep-stem width (reference 64; timm ``resnet*c/d`` 32).
        multi_grid: dilation multipliers of layer4's blocks.
        avg_down: average-pool shortcuts (to use timm ``resnet*d`` weights).
        aspp_rates: override the ASPP dilation rates.
        upsample: return input-size logits (``False``: decoder-size logits).
        bn_eps, bn_momentum: of every BatchNorm (reference config: 1e-5, 0.1).
        seed: if given, the random initialisation is drawn from
            ``torch.manual_seed(seed)`` inside a forked RNG (global state untouched).
        norm_layer: normalisation factory overriding BatchNorm2d.
        head_channels: width of ASPP and decoder (reference 256; the low-level
            projection is 48, or a quarter of a narrower head).
    """
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride={output_stride!r}; expected 16 or 8")
    if norm_layer is None:
        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)
    if aspp_rates is None:
        aspp_rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)

    def build() -> DeepLabV3Plus:
        body = resnet(backbone, deep_stem=deep_stem, stem_width=stem_width, output_stride=output_stride,
                      multi_grid=multi_grid, avg_down=avg_down, norm_layer=norm_layer)
        model = DeepLabV3Plus(body, num_classes, rates=aspp_rates, upsample=upsample, norm_layer=norm_layer,
                              head_channels=head_channels)
        init_head_(model.head, bn_eps, bn_momentum)
        init_head_(model.classifier, bn_eps, bn_momentum)
        return model

    if seed is None:
        model = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
    if pretrained is not None:
        from .weights import load_backbone_weights

        load_backbone_weights(model.backbone, pretrained)
    return model
