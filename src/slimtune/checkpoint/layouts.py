"""Known foreign checkpoint layouts whose networks compute differently from slim's, not just
under other names.

`--checkpoint_name_map auto` pairs tensors by order and shape, so torchvision's ResNet-50 loads
into slim's resnet_v1_50 without a missing tensor. The nets still differ: where the stride sits,
how the stem pools, what pixels they expect. A restore plan lists those differences (instead of
"No problems") when the checkpoint's names show one of the layouts below and the net is the slim
family it resembles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn


@dataclass(frozen=True)
class ForeignLayout:
    """A checkpoint layout recognised by its tensor names, and how it differs from slim families."""

    name: str
    pattern: re.Pattern
    min_matches: int
    #: slim family prefix (a registry name or net scope such as 'resnet_v1') -> differences
    differences: dict[str, Callable[[str], list[str]]]


def _torchvision_preprocessing(preprocessing: str) -> str:
    if preprocessing == "vgg":
        expected = "subtracts the ImageNet mean from 0-255 pixels (no scaling by the standard deviation)"
    elif preprocessing == "inception":
        expected = "scales pixels to [-1, 1]"
    elif preprocessing:
        expected = f"is '{preprocessing}'"
    else:
        expected = "is whatever --preprocessing_name says"
    return ("preprocessing: torchvision's weights expect RGB scaled to [0, 1] and normalized by the ImageNet "
            f"mean and standard deviation; this net's preprocessing {expected}")


def _resnet_v1(preprocessing: str) -> list[str]:
    return [
        "stride placement: torchvision's ResNet strides in the first unit of layer2-4, slim's resnet_v1 in the "
        "last unit of block1-3, so the same kernels run at other resolutions",
        "padding: slim's stem max pool pads as TF's 'SAME' (only bottom/right at even sizes), torchvision's "
        "pads every side by 1",
        _torchvision_preprocessing(preprocessing),
    ]


def _resnet_v2(preprocessing: str) -> list[str]:
    return ["unit structure: torchvision's ResNet is post-activation (v1), slim's resnet_v2 pre-activation: "
            "BatchNorm and ReLU sit elsewhere"] + _resnet_v1(preprocessing)


def _mobilenet_v2(preprocessing: str) -> list[str]:
    return [
        "padding: slim's strided convs pad as TF's 'SAME' (only bottom/right at even sizes), torchvision's "
        "pad every side by 1",
        _torchvision_preprocessing(preprocessing),
    ]


def _vgg(preprocessing: str) -> list[str]:
    return [
        "classifier: torchvision's fc6 is a Linear layer over features flattened channel-first, slim's a 7x7 "
        "conv over height x width x channels: reshaped by position its inputs come in another order",
        _torchvision_preprocessing(preprocessing),
    ]


LAYOUTS: tuple[ForeignLayout, ...] = (
    ForeignLayout("torchvision ResNet", re.compile(r"^layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.\d)\."), 8,
                  {"resnet_v1": _resnet_v1, "resnet_v2": _resnet_v2}),
    ForeignLayout("torchvision MobileNetV2", re.compile(r"^features\.\d+\.conv\.\d+\."), 8,
                  {"mobilenet_v2": _mobilenet_v2}),
    ForeignLayout("torchvision VGG", re.compile(r"^(features|classifier)\.\d+\.(weight|bias)$"), 8,
                  {"vgg": _vgg}),
)


def _net_family_names(model: nn.Module) -> list[str]:
    spec = getattr(model, "spec", None)
    names = [getattr(spec, "name", ""), getattr(spec, "scope", ""), getattr(model, "scope", "")]
    return [str(n).lower() for n in names if isinstance(n, str) and n]


def architecture_differences(checkpoint_names: Sequence[str], model: nn.Module) -> tuple[str, list[str]]:
    """(layout name, differences) when the checkpoint's names show a known foreign layout that
    computes differently from the slim family of `model`; ('', []) otherwise."""
    families = _net_family_names(model)
    if not families:
        return "", []
    spec = getattr(model, "spec", None)
    preprocessing: Optional[str] = getattr(spec, "preprocessing", "") if spec is not None else ""
    for layout in LAYOUTS:
        if sum(1 for name in checkpoint_names if layout.pattern.search(name)) < layout.min_matches:
            continue
        for family, differences in layout.differences.items():
            if any(name.startswith(family) for name in families):
                return layout.name, differences(preprocessing or "")
    return "", []
