"""AlexNet v2 as slim builds it (nets/alexnet.py): the "one weird trick" AlexNet without LRN,
fully connected layers written as convolutions (fc6 5x5 VALID, fc7 and fc8 1x1).

alexnet_v2_arg_scope has no normalizer: every layer has a bias and none has BatchNorm.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .conv_fc_head import FullyConvolutionalBody, FullyConvolutionalNet, relu_inplace, truncated_fc_init
from .layers import Conv2d, MaxPool2d, check_keep_prob, xavier_uniform_
from .registry import register_model

# conv1 11x11/4 VALID, then three 3x3/2 VALID pools: the smallest input giving fc6 its 5x5 map.
ALEXNET_MIN_INPUT_SIZE = 195


def _conv_init(layer: Conv2d) -> None:
    # alexnet_v2_arg_scope: slim's default xavier weights, biases 0.1.
    xavier_uniform_(layer.weight)
    nn.init.constant_(layer.bias, 0.1)


class _AlexNetV2Body(FullyConvolutionalBody):
    """The 'alexnet_v2' variable scope: conv1..conv5, pool1/2/5, fc6..fc8."""

    def __init__(self, num_classes: int, dropout_keep_prob: float, spatial_squeeze: bool, global_pool: bool,
                 in_channels: int) -> None:
        super().__init__("alexnet_v2")
        self.conv1 = Conv2d(in_channels, 64, 11, stride=4, padding="VALID", activation=relu_inplace)
        self.pool1 = MaxPool2d(3, 2)
        self.conv2 = Conv2d(64, 192, 5, activation=relu_inplace)
        self.pool2 = MaxPool2d(3, 2)
        self.conv3 = Conv2d(192, 384, 3, activation=relu_inplace)
        self.conv4 = Conv2d(384, 384, 3, activation=relu_inplace)
        self.conv5 = Conv2d(384, 256, 3, activation=relu_inplace)
        self.pool5 = MaxPool2d(3, 2)
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            _conv_init(layer)
        self.build_head(256, 5, 4096, "VALID", num_classes, dropout_keep_prob, global_pool, spatial_squeeze,
                        fc_init=truncated_fc_init)

    def features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1..pool5, recording every conv and pool output."""
        net = end_points["alexnet_v2/conv1"] = self.conv1(x)
        net = end_points["alexnet_v2/pool1"] = self.pool1(net)
        net = end_points["alexnet_v2/conv2"] = self.conv2(net)
        net = end_points["alexnet_v2/pool2"] = self.pool2(net)
        net = end_points["alexnet_v2/conv3"] = self.conv3(net)
        net = end_points["alexnet_v2/conv4"] = self.conv4(net)
        net = end_points["alexnet_v2/conv5"] = self.conv5(net)
        net = end_points["alexnet_v2/pool5"] = self.pool5(net)
        return net


class AlexNetV2(FullyConvolutionalNet):
    """slim's alexnet_v2 under the scope 'alexnet_v2' (no LRN, no BatchNorm).

    Needs inputs of at least 195x195 (224 gives fc6 a 5x5 map and 1x1 logits); larger inputs
    need global_pool=True or spatial_squeeze=False. slim has no 'Predictions' end point here.
    """

    scope = "alexnet_v2"
    classifier_scope = "alexnet_v2/fc8"
    classifier_scopes = (classifier_scope,)
    min_input_size = ALEXNET_MIN_INPUT_SIZE

    def __init__(self, num_classes: int = 1000, dropout_keep_prob: float = 0.5, spatial_squeeze: bool = True,
                 global_pool: bool = False, in_channels: int = 3) -> None:
        super().__init__(num_classes)
        keep_prob = check_keep_prob(self.scope, dropout_keep_prob)
        self.alexnet_v2 = _AlexNetV2Body(num_classes, keep_prob, spatial_squeeze, global_pool, in_channels)


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="alexnet_v2",
                classifier_scopes=("alexnet_v2/fc8",), first_conv="alexnet_v2/conv1",
                min_image_size=ALEXNET_MIN_INPUT_SIZE)
def alexnet_v2(num_classes: int = 1000, **kwargs) -> AlexNetV2:
    """AlexNet v2 (slim nets/alexnet.py), 224x224; slim names no preprocessing for it, 'vgg' fills the gap."""
    return AlexNetV2(num_classes, **kwargs)
