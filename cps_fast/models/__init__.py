"""DeepLabv3+ with dilated ResNet backbones, as the reference CPS network.

Public API::

    deeplabv3plus(backbone="resnet50", num_classes=21, output_stride=16, deep_stem=True,
                  pretrained=None, **kwargs) -> DeepLabV3Plus
    CPSModel(backbone, num_classes, output_stride, deep_stem, pretrained, seeds=(0, 1), **kwargs)
    param_groups(model, weight_decay=1e-4) -> list of {"params", "weight_decay", "name"}
    convert_sync_batchnorm(model)
    load_backbone_weights(resnet, path) -> LoadResult

See docs/models.md.
"""
from .cps_model import CPSModel, convert_sync_batchnorm, param_groups
from .deeplabv3plus import ASPP, DeepLabHead, DeepLabV3Plus, deeplabv3plus, init_head_
from .resnet import RESNET_SPECS, BasicBlock, Bottleneck, ResNet, resnet
from .weights import (
    LoadResult,
    PretrainedWeightsError,
    convert_reference_checkpoint,
    detect_layout,
    load_backbone_weights,
    read_state_dict,
)

__all__ = [
    "ASPP",
    "BasicBlock",
    "Bottleneck",
    "CPSModel",
    "DeepLabHead",
    "DeepLabV3Plus",
    "LoadResult",
    "PretrainedWeightsError",
    "RESNET_SPECS",
    "ResNet",
    "convert_reference_checkpoint",
    "convert_sync_batchnorm",
    "deeplabv3plus",
    "detect_layout",
    "init_head_",
    "load_backbone_weights",
    "param_groups",
    "read_state_dict",
    "resnet",
]
