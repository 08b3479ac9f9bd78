"""LeNet as slim builds it (nets/lenet.py): two 5x5 convs, two fully connected layers, 28x28 input."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import Tensor, nn

from .base import SlimNet
from .layers import Conv2d, Linear, MaxPool2d, dropout_module, flatten_nhwc, truncated_normal_
from .registry import register_model


class _LeNetBody(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout_keep_prob: float, image_size: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(in_channels, 32, 5)
        self.pool1 = MaxPool2d(2, 2)
        self.conv2 = Conv2d(32, 64, 5)
        self.pool2 = MaxPool2d(2, 2)
        # slim flattens whatever the two VALID 2x2 pools leave: fc3's width follows the input size.
        side = image_size // 2 // 2
        self.fc3 = Linear(side * side * 64, 1024)
        self.dropout3 = dropout_module(dropout_keep_prob)
        self.fc4 = _fc4(num_classes)
        for module in (self.conv1, self.conv2, self.fc3, self.fc4):
            if module is not None:  # lenet_arg_scope: truncated_normal(stddev=0.1)
                truncated_normal_(module.weight, 0.1)


def _fc4(num_classes: int) -> Optional[Linear]:
    """The 'LeNet/fc4' classifier (none when headless), before lenet_arg_scope's init."""
    return Linear(1024, num_classes, activation=None) if num_classes else None


class LeNet(SlimNet):
    """slim's lenet: conv1-pool1-conv2-pool2-flatten-fc3-dropout3-fc4 under the scope 'LeNet'."""

    scope = "LeNet"
    classifier_scope = "LeNet/fc4"
    classifier_scopes = (classifier_scope,)
    num_features = 1024

    def __init__(self, num_classes: int = 10, dropout_keep_prob: float = 0.5, in_channels: int = 1,
                 image_size: int = 28) -> None:
        super().__init__(num_classes)
        self.LeNet = _LeNetBody(in_channels, num_classes, dropout_keep_prob, image_size)

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1, pool1, conv2, pool2, Flatten, fc3: the [N, 1024] features."""
        body = self.LeNet
        net = end_points["conv1"] = body.conv1(x)
        net = end_points["pool1"] = body.pool1(net)
        net = end_points["conv2"] = body.conv2(net)
        net = end_points["pool2"] = body.pool2(net)
        net = end_points["Flatten"] = flatten_nhwc(net)
        net = end_points["fc3"] = body.fc3(net)
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """dropout3, Logits, Predictions (fc3's features when headless or pre_logits)."""
        body = self.LeNet
        if body.fc4 is None or pre_logits:
            return features
        net = end_points["dropout3"] = body.dropout3(features)
        logits = end_points["Logits"] = body.fc4(net)
        end_points["Predictions"] = logits.softmax(dim=-1)
        return logits

    def _build_classifier(self, num_classes: int) -> None:
        fc4 = _fc4(num_classes)
        if fc4 is not None:
            truncated_normal_(fc4.weight, 0.1)
        self.LeNet.fc4 = fc4


@register_model(default_image_size=28, preprocessing="lenet", checkpoint_num_classes=10, scope="LeNet",
                in_channels=1, sized_by_input=True,
                classifier_scopes=("LeNet/fc4",), first_conv="LeNet/conv1", min_image_size=4)
def lenet(num_classes: int = 10, **kwargs) -> LeNet:
    """LeNet (slim nets/lenet.py), grayscale 28x28 input (`image_size` sets another fixed size)."""
    return LeNet(num_classes, **kwargs)
