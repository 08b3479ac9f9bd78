"""VGG as slim builds it (nets/vgg.py): vgg_a, vgg_16, vgg_19 with their fully connected layers
written as convolutions (fc6 7x7, fc7 and fc8 1x1).

This file also holds the fully-convolutional classifier head that slim's alexnet_v2 and overfeat
share with VGG (fc6 conv, VALID by default, dropout6, fc7 1x1, optional global_pool, dropout7, fc8 1x1,
squeeze), so the three families behave identically in headless, global_pool and dense modes.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, new_end_points, pooled_features
from .layers import Conv2d, MaxPool2d, dropout_module, reduce_mean_hw, truncated_normal_, xavier_uniform_
from .registry import register_model

# The output of conv+bias is not needed by the conv's backward pass, so the ReLU may overwrite it.
relu_inplace = functools.partial(F.relu, inplace=True)

_FC_DEPTH = 4096


def check_keep_prob(name: str, dropout_keep_prob: float) -> float:
    """Validate slim's dropout keep probability (0 < p <= 1)."""
    if not 0.0 < float(dropout_keep_prob) <= 1.0:
        raise ConfigError(f"{name}: dropout_keep_prob must be in (0, 1], got {dropout_keep_prob}")
    return float(dropout_keep_prob)


def xavier_zero_bias_init(layer: Conv2d, is_logits: bool = False) -> None:
    """slim.conv2d's default xavier (Glorot uniform) weights with zero biases (vgg/overfeat arg scopes)."""
    xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def truncated_fc_init(layer: Conv2d, is_logits: bool) -> None:
    """alexnet_v2/overfeat fc6..fc8: truncated_normal(0.005) weights, biases 0.1 except fc8's zeros."""
    truncated_normal_(layer.weight, 0.005)
    nn.init.constant_(layer.bias, 0.0 if is_logits else 0.1)


class FullyConvolutionalBody(nn.Module):
    """A slim scope ending in slim's conv-as-FC head: fc6, dropout6, fc7, [global_pool,] dropout7, fc8.

    Subclasses build their feature layers first, then call `build_head`, so the parameters are
    registered (and listed in state_dict) in slim's layer order.
    """

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope_name = scope

    def features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """The convolution and pooling layers before fc6, recording their end points."""
        raise NotImplementedError

    def build_head(self, in_channels: int, fc6_kernel: int, fc6_depth: int, fc6_padding: str,
                   num_classes: int, dropout_keep_prob: float, global_pool: bool, spatial_squeeze: bool,
                   fc_init: Optional[Callable[[Conv2d, bool], None]] = None) -> None:
        """Create fc6..fc8; `fc_init(layer, is_logits)` overrides the initialization of each."""
        self.fc6 = Conv2d(in_channels, fc6_depth, fc6_kernel, padding=fc6_padding, activation=relu_inplace)
        self.dropout6 = dropout_module(dropout_keep_prob)
        self.fc7 = Conv2d(fc6_depth, _FC_DEPTH, 1, activation=relu_inplace)
        self.global_pool = bool(global_pool)
        self.spatial_squeeze = bool(spatial_squeeze)
        if num_classes:
            self.dropout7 = dropout_module(dropout_keep_prob)
            self.fc8 = Conv2d(_FC_DEPTH, num_classes, 1, activation=None)
        else:
            self.dropout7 = self.fc8 = None
        if fc_init is not None:
            for layer in (self.fc6, self.fc7, self.fc8):
                if layer is not None:
                    fc_init(layer, layer is self.fc8)
        self._fc6_name, self._fc7_name, self._fc8_name = (f"{self.scope_name}/fc{i}" for i in (6, 7, 8))

    def head(self, net: Tensor,
             end_points: "OrderedDict[str, Tensor]") -> tuple[Tensor, "OrderedDict[str, Tensor]"]:
        """Run fc6..fc8 on the pooled feature map; headless nets return pooled features [N, C]."""
        net = end_points[self._fc6_name] = self.fc6(net)
        net = self.dropout6(net)
        net = end_points[self._fc7_name] = self.fc7(net)
        if self.global_pool:
            net = end_points["global_pool"] = reduce_mean_hw(net)
        if self.fc8 is None:
            return pooled_features(net), end_points
        logits = self.fc8(self.dropout7(net))
        if self.spatial_squeeze:
            height, width = logits.shape[-2:]
            if height != 1 or width != 1:
                raise ConfigError(
                    f"{self._fc8_name} is {height}x{width}, not 1x1, so it cannot be squeezed: feed the "
                    "net's default image size, or pass global_pool=True, or spatial_squeeze=False for "
                    "a dense [N, classes, H, W] prediction map")
            logits = logits.flatten(1)
        end_points[self._fc8_name] = logits
        return logits, end_points


class FullyConvolutionalNet(SlimNet):
    """A slim classifier whose body is a `FullyConvolutionalBody` under the attribute `scope`.

    ``forward_endpoints`` returns slim's fc8 output as logits: [N, classes] when spatial_squeeze
    (the default), slim's 4-D map (NCHW here) when spatial_squeeze=False. Headless nets
    (num_classes=0) return fc7 (or global_pool) averaged over space, [N, 4096].
    """

    num_features = _FC_DEPTH
    #: Smallest height/width the VALID layers accept (slim fails on smaller inputs too).
    min_input_size: int = 1
    #: What else the user can do about a too-small input (appended to the error).
    min_input_hint: str = ""

    def check_input(self, x: Tensor) -> None:
        """Raise a ConfigError naming the smallest usable size when `x` is too small for the net."""
        if x.dim() != 4:
            raise ConfigError(f"{self.scope} expects a 4-D NCHW image batch, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height < self.min_input_size or width < self.min_input_size:
            raise ConfigError(
                f"{self.scope}: a {height}x{width} input is too small; this configuration needs at least "
                f"{self.min_input_size}x{self.min_input_size}{self.min_input_hint}")

    def forward_endpoints(self, x: Tensor) -> tuple[Tensor, "OrderedDict[str, Tensor]"]:
        """Logits and slim's end points ('<scope>/conv1…', '<scope>/fc7', ['global_pool',] '<scope>/fc8')."""
        self.check_input(x)
        body, end_points = getattr(self, self.scope), new_end_points()
        return body.head(body.features(x, end_points), end_points)


# Number of 3x3 convolutions in each of the five blocks (slim.repeat counts).
VGG_LAYOUTS: dict[str, tuple[int, ...]] = {
    "vgg_a": (1, 1, 2, 2, 2),
    "vgg_16": (2, 2, 3, 3, 3),
    "vgg_19": (2, 2, 4, 4, 4),
}
_VGG_DEPTHS = (64, 128, 256, 512, 512)


class _VGGBody(FullyConvolutionalBody):
    """The 'vgg_*' variable scope: conv1..conv5 (each an nn.ModuleDict of conv<i>_<j>), pool1..pool5, fc6..fc8."""

    def __init__(self, scope: str, num_classes: int, dropout_keep_prob: float, spatial_squeeze: bool,
                 fc_conv_padding: str, global_pool: bool, in_channels: int) -> None:
        super().__init__(scope)
        plan = []
        channels = in_channels
        for block, (repeats, depth) in enumerate(zip(VGG_LAYOUTS[scope], _VGG_DEPTHS), start=1):
            convs = nn.ModuleDict()
            for index in range(1, repeats + 1):
                convs[f"conv{block}_{index}"] = Conv2d(channels, depth, 3, activation=relu_inplace)
                xavier_zero_bias_init(convs[f"conv{block}_{index}"])
                channels = depth
            self.add_module(f"conv{block}", convs)
            self.add_module(f"pool{block}", MaxPool2d(2, 2))
            plan.append((f"conv{block}", tuple(f"{scope}/conv{block}/{name}" for name in convs),
                         f"pool{block}", f"{scope}/pool{block}"))
        # Names only (no module references), so copies made by DataParallel/deepcopy stay correct.
        self._plan = tuple(plan)
        self.build_head(channels, 7, _FC_DEPTH, fc_conv_padding, num_classes, dropout_keep_prob,
                        global_pool, spatial_squeeze, fc_init=xavier_zero_bias_init)

    def features(self, net: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1..pool5, recording every conv and pool output."""
        for block_name, conv_end_points, pool_name, pool_end_point in self._plan:
            for conv, end_point in zip(getattr(self, block_name).values(), conv_end_points):
                net = end_points[end_point] = conv(net)
            net = end_points[pool_end_point] = getattr(self, pool_name)(net)
        return net


class VGG(FullyConvolutionalNet):
    """slim's vgg_a / vgg_16 / vgg_19 under the scope of the same name (no BatchNorm, biases everywhere).

    fc_conv_padding='VALID' (slim's default) needs inputs of at least 224x224 and gives a
    (H/32 - 6)-wide fc8 map; 'SAME' accepts 32x32 and up and keeps H/32 (dense prediction).
    global_pool=True averages fc7, so every accepted size gives [N, classes]. slim's VGG has no
    'Predictions' end point; its last one is '<scope>/fc8'.
    """

    def __init__(self, variant: str = "vgg_16", num_classes: int = 1000, dropout_keep_prob: float = 0.5,
                 spatial_squeeze: bool = True, fc_conv_padding: str = "VALID", global_pool: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__(num_classes)
        if variant not in VGG_LAYOUTS:
            raise ConfigError(f"unknown VGG variant {variant!r}; use one of {', '.join(VGG_LAYOUTS)}")
        padding = str(fc_conv_padding).upper()
        if padding not in ("VALID", "SAME"):
            raise ConfigError(f"{variant}: fc_conv_padding must be 'VALID' or 'SAME', got {fc_conv_padding!r}")
        self.scope = variant
        self.classifier_scope = f"{variant}/fc8"
        # Five 2x2/2 VALID pools floor the size to H//32; fc6 (7x7) then needs 7 pixels unless SAME.
        self.min_input_size = 32 * (7 if padding == "VALID" else 1)
        if padding == "VALID":
            self.min_input_hint = " (fc_conv_padding='SAME' accepts inputs down to 32x32)"
        keep_prob = check_keep_prob(variant, dropout_keep_prob)
        self.add_module(variant, _VGGBody(variant, num_classes, keep_prob, spatial_squeeze, padding,
                                          global_pool, in_channels))


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_a")
def vgg_a(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 11-layer configuration A (slim nets/vgg.py vgg_a); no published slim checkpoint."""
    return VGG("vgg_a", num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_16",
                published_checkpoint="vgg_16_2016_08_28.tar.gz")
def vgg_16(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 16-layer configuration D (slim nets/vgg.py vgg_16), Caffe-converted 1000-class checkpoint."""
    return VGG("vgg_16", num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_19",
                published_checkpoint="vgg_19_2016_08_28.tar.gz")
def vgg_19(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 19-layer configuration E (slim nets/vgg.py vgg_19), Caffe-converted 1000-class checkpoint."""
    return VGG("vgg_19", num_classes, **kwargs)
