"""OverFeat (fast model) as slim builds it (nets/overfeat.py): fully connected layers written as
convolutions (fc6 6x6 VALID with 3072 outputs, fc7 1x1 with 4096, fc8 1x1), 231x231 input.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor

from .conv_fc_head import (FullyConvolutionalBody, FullyConvolutionalNet, relu_inplace, truncated_fc_init,
                           xavier_zero_bias_init)
from .layers import Conv2d, MaxPool2d, check_keep_prob
from .registry import register_model

# conv1 11x11/4 VALID, 2x2/2 pools and conv2 5x5 VALID: the smallest input giving fc6 its 6x6 map.
OVERFEAT_MIN_INPUT_SIZE = 231


class _OverFeatBody(FullyConvolutionalBody):
    """The 'overfeat' variable scope: conv1..conv5, pool1/2/5, fc6..fc8."""

    def __init__(self, num_classes: int, dropout_keep_prob: float, spatial_squeeze: bool, global_pool: bool,
                 in_channels: int) -> None:
        super().__init__("overfeat")
        self.conv1 = Conv2d(in_channels, 64, 11, stride=4, padding="VALID", activation=relu_inplace)
        self.pool1 = MaxPool2d(2, 2)
        self.conv2 = Conv2d(64, 256, 5, padding="VALID", activation=relu_inplace)
        self.pool2 = MaxPool2d(2, 2)
        self.conv3 = Conv2d(256, 512, 3, activation=relu_inplace)
        self.conv4 = Conv2d(512, 1024, 3, activation=relu_inplace)
        self.conv5 = Conv2d(1024, 1024, 3, activation=relu_inplace)
        self.pool5 = MaxPool2d(2, 2)
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            xavier_zero_bias_init(layer)  # overfeat_arg_scope: zero biases
        self.build_head(1024, 6, 3072, "VALID", num_classes, dropout_keep_prob, global_pool, spatial_squeeze,
                        fc_init=truncated_fc_init)

    def features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1..pool5, recording every conv and pool output."""
        net = end_points["overfeat/conv1"] = self.conv1(x)
        net = end_points["overfeat/pool1"] = self.pool1(net)
        net = end_points["overfeat/conv2"] = self.conv2(net)
        net = end_points["overfeat/pool2"] = self.pool2(net)
        net = end_points["overfeat/conv3"] = self.conv3(net)
        net = end_points["overfeat/conv4"] = self.conv4(net)
        net = end_points["overfeat/conv5"] = self.conv5(net)
        net = end_points["overfeat/pool5"] = self.pool5(net)
        return net


class OverFeat(FullyConvolutionalNet):
    """slim's overfeat under the scope 'overfeat' (no BatchNorm).

    Needs inputs of at least 231x231 (231 gives 1x1 logits); larger inputs need global_pool=True
    or spatial_squeeze=False. slim has no 'Predictions' end point here.
    """

    scope = "overfeat"
    classifier_scope = "overfeat/fc8"
    classifier_scopes = (classifier_scope,)
    min_input_size = OVERFEAT_MIN_INPUT_SIZE

    def __init__(self, num_classes: int = 1000, dropout_keep_prob: float = 0.5, spatial_squeeze: bool = True,
                 global_pool: bool = False, in_channels: int = 3) -> None:
        super().__init__(num_classes)
        keep_prob = check_keep_prob(self.scope, dropout_keep_prob)
        self.overfeat = _OverFeatBody(num_classes, keep_prob, spatial_squeeze, global_pool, in_channels)


@register_model(default_image_size=231, preprocessing="vgg", checkpoint_num_classes=1000, scope="overfeat",
                classifier_scopes=("overfeat/fc8",), first_conv="overfeat/conv1",
                min_image_size=OVERFEAT_MIN_INPUT_SIZE)
def overfeat(num_classes: int = 1000, **kwargs) -> OverFeat:
    """OverFeat (slim nets/overfeat.py), 231x231; slim names no preprocessing for it, 'vgg' fills the gap."""
    return OverFeat(num_classes, **kwargs)
