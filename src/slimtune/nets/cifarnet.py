"""CifarNet as slim builds it (nets/cifarnet.py): two 5x5 convs with LRN, three fully connected layers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from .base import SlimNet
from .layers import (Conv2d, Linear, MaxPool2d, dropout_module, flatten_nhwc, local_response_norm,
                     truncated_normal_)
from .registry import register_model


def _lrn(x: Tensor) -> Tensor:
    return local_response_norm(x, depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)


class _CifarNetBody(nn.Module):
    def __init__(self, num_classes: int, dropout_keep_prob: float, image_size: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(3, 64, 5)
        self.pool1 = MaxPool2d(2, 2)
        self.conv2 = Conv2d(64, 64, 5)
        self.pool2 = MaxPool2d(2, 2)
        side = image_size // 2 // 2  # fc3's width follows the input size, as slim's flatten does
        self.fc3 = Linear(side * side * 64, 384)
        self.dropout3 = dropout_module(dropout_keep_prob)
        self.fc4 = Linear(384, 192)
        self.logits = _logits(num_classes)
        # cifarnet_arg_scope: conv stddev 5e-2, fc stddev 0.04, biases 0.1; logits stddev 1/192, bias 0.
        for module, stddev in ((self.conv1, 5e-2), (self.conv2, 5e-2), (self.fc3, 0.04), (self.fc4, 0.04)):
            truncated_normal_(module.weight, stddev)
            nn.init.constant_(module.bias, 0.1)
        if self.logits is not None:
            truncated_normal_(self.logits.weight, 1 / 192.0)


def _logits(num_classes: int) -> Optional[Linear]:
    """The 'CifarNet/logits' layer (none when headless), before cifarnet_arg_scope's init."""
    return Linear(192, num_classes, activation=None) if num_classes else None


class CifarNet(SlimNet):
    """slim's cifarnet under the scope 'CifarNet' (32x32 RGB input)."""

    scope = "CifarNet"
    classifier_scope = "CifarNet/logits"
    classifier_scopes = (classifier_scope,)
    num_features = 192

    def __init__(self, num_classes: int = 10, dropout_keep_prob: float = 0.5, image_size: int = 32) -> None:
        super().__init__(num_classes)
        self.CifarNet = _CifarNetBody(num_classes, dropout_keep_prob, image_size)

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """conv1 ... fc4 (slim's end points): the [N, 192] features."""
        body = self.CifarNet
        net = end_points["conv1"] = body.conv1(x)
        net = end_points["pool1"] = body.pool1(net)
        net = _lrn(net)
        net = end_points["conv2"] = body.conv2(net)
        net = _lrn(net)
        net = end_points["pool2"] = body.pool2(net)
        net = end_points["Flatten"] = flatten_nhwc(net)
        net = end_points["fc3"] = body.fc3(net)
        net = body.dropout3(net)
        net = end_points["fc4"] = body.fc4(net)
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """Logits and Predictions (fc4's features when headless or pre_logits)."""
        logits_layer = self.CifarNet.logits
        if logits_layer is None or pre_logits:
            return features
        logits = end_points["Logits"] = logits_layer(features)
        end_points["Predictions"] = torch.softmax(logits, dim=-1)
        return logits

    def _build_classifier(self, num_classes: int) -> None:
        logits = _logits(num_classes)
        if logits is not None:
            truncated_normal_(logits.weight, 1 / 192.0)
        self.CifarNet.logits = logits


@register_model(default_image_size=32, preprocessing="cifarnet", checkpoint_num_classes=10, scope="CifarNet",
                sized_by_input=True, classifier_scopes=("CifarNet/logits",), first_conv="CifarNet/conv1",
                min_image_size=4)
def cifarnet(num_classes: int = 10, **kwargs) -> CifarNet:
    """CifarNet (slim nets/cifarnet.py), 32x32 RGB input (`image_size` sets another fixed size)."""
    return CifarNet(num_classes, **kwargs)
