"""slim's fully connected layers written as convolutions, shared by vgg, alexnet_v2 and overfeat.

All three slim files end the same way: fc6 (a k x k conv, VALID by default), dropout6, fc7 (1x1),
an optional global_pool, dropout7, fc8 (1x1) and a spatial squeeze. Keeping that head here, in one
place, makes the three families behave identically in headless, global_pool and dense modes and
gives them one implementation of the model contract (see `slimtune.nets`):

- `forward_features(x)` is the body up to its last pool (pool5), as timm does for VGG;
- `forward_head(f, pre_logits=True)` runs fc6/fc7 and averages the fc7 map: [N, 4096];
- `reset_classifier(n)` rebuilds dropout7 and fc8 (slim's 'fc8' scope) with the family's init.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, pooled_features
from .layers import Conv2d, dropout_module, reduce_mean_hw, truncated_normal_, xavier_uniform_

# The output of conv+bias is not needed by the conv's backward pass, so the ReLU may overwrite it.
relu_inplace = functools.partial(F.relu, inplace=True)

#: fc7's width in every slim conv-as-FC net (the headless output's width).
FC_DEPTH = 4096

FcInit = Callable[[Conv2d, bool], None]


def xavier_zero_bias_init(layer: Conv2d, is_logits: bool = False) -> None:
    """slim.conv2d's default xavier (Glorot uniform) weights with zero biases (vgg/overfeat arg scopes)."""
    if layer.weight.is_meta:  # shape-only builds carry no values to initialize
        return
    xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def truncated_fc_init(layer: Conv2d, is_logits: bool) -> None:
    """alexnet_v2/overfeat fc6..fc8: truncated_normal(0.005) weights, biases 0.1 except fc8's zeros."""
    if layer.weight.is_meta:
        return
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
        self._fc_init: Optional[FcInit] = None
        self._keep_prob = 1.0

    def features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """The convolution and pooling layers before fc6, recording their end points."""
        raise NotImplementedError

    def build_head(self, in_channels: int, fc6_kernel: int, fc6_depth: int, fc6_padding: str,
                   num_classes: int, dropout_keep_prob: float, global_pool: bool, spatial_squeeze: bool,
                   fc_init: Optional[FcInit] = None) -> None:
        """Create fc6..fc8; `fc_init(layer, is_logits)` overrides the initialization of each."""
        self._fc_init, self._keep_prob = fc_init, dropout_keep_prob
        self.fc6 = Conv2d(in_channels, fc6_depth, fc6_kernel, padding=fc6_padding, activation=relu_inplace)
        self.dropout6 = dropout_module(dropout_keep_prob)
        self.fc7 = Conv2d(fc6_depth, FC_DEPTH, 1, activation=relu_inplace)
        self.global_pool = bool(global_pool)
        self.spatial_squeeze = bool(spatial_squeeze)
        if fc_init is not None:
            fc_init(self.fc6, False)
            fc_init(self.fc7, False)
        self._fc6_name, self._fc7_name, self._fc8_name = (f"{self.scope_name}/fc{i}" for i in (6, 7, 8))
        self.build_classifier(num_classes)

    def build_classifier(self, num_classes: int) -> None:
        """(Re)create dropout7 and fc8 for `num_classes`; 0 removes them (headless)."""
        if num_classes:
            self.dropout7 = dropout_module(self._keep_prob)
            self.fc8 = Conv2d(FC_DEPTH, num_classes, 1, activation=None)
            if self._fc_init is not None:
                self._fc_init(self.fc8, True)
        else:
            self.dropout7 = self.fc8 = None

    def head(self, net: Tensor, end_points: "OrderedDict[str, Tensor]", pre_logits: bool = False) -> Tensor:
        """fc6..fc8 on the pool5 map; pooled fc7 (or global_pool) [N, 4096] when headless or pre_logits."""
        net = end_points[self._fc6_name] = self.fc6(net)
        net = self.dropout6(net)
        net = end_points[self._fc7_name] = self.fc7(net)
        if self.global_pool:
            net = end_points["global_pool"] = reduce_mean_hw(net)
        if self.fc8 is None or pre_logits:
            return pooled_features(net)
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
        return logits


class FullyConvolutionalNet(SlimNet):
    """A slim classifier whose body is a `FullyConvolutionalBody` under the attribute `scope`.

    ``forward_endpoints`` returns slim's fc8 output as logits: [N, classes] when spatial_squeeze
    (the default), slim's 4-D map (NCHW here) when spatial_squeeze=False. Headless nets
    (num_classes=0) return fc7 (or global_pool) averaged over space, [N, 4096].
    """

    num_features = FC_DEPTH
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

    def _body(self) -> FullyConvolutionalBody:
        return self._modules[self.scope]  # type: ignore[return-value]

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1 ... pool5 with slim's end points ('<scope>/conv1', ..., '<scope>/pool5')."""
        self.check_input(x)
        return self._body().features(x, end_points)

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """fc6, fc7, ['global_pool',] fc8 (end points '<scope>/fc6' ... '<scope>/fc8')."""
        return self._body().head(features, end_points, pre_logits)

    def _build_classifier(self, num_classes: int) -> None:
        self._body().build_classifier(num_classes)
