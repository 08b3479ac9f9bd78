"""MobileNet v1 as research/slim builds it (nets/mobilenet_v1.py).

`Conv2d_0` (3x3/2 conv) and 13 depthwise-separable layers `Conv2d_N_depthwise` (3x3 depthwise) +
`Conv2d_N_pointwise` (1x1), each followed by BN (gamma, epsilon 0.001, decay 0.9997) and ReLU6
(mobilenet_v1_arg_scope); depths max(int(d * depth_multiplier), min_depth). The classifier sits in
the scope `Logits`: `AvgPool_1a` (a 7x7 VALID average pool with slim's default stride 2, shrunk for
small maps) or, with global_pool, a mean over the map; dropout; the 1x1 conv `Conv2d_1c_1x1`;
squeeze; softmax.

slim's factory registers no preprocessing for the depth variants; they use 'inception' like
mobilenet_v1. The published checkpoints (1001 classes) exist for every multiplier at 224, 192,
160 and 128 pixels (mobilenet_v1_<multiplier>_<size>.tgz); the registry names the 224 ones, which
match slim's default_image_size. slim's README headlines 0.50_160 and 0.25_128: evaluate those at
their own size (the net accepts any input size).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import SlimNet, pooled_features
from .layers import Conv2d, DepthwiseConv2d, batch_norm_factory, check_keep_prob, reduce_mean_hw
from .mobilenet_common import LogitsHead, check_depth_multiplier, init_truncated_normal, relu6_
from .registry import register_model

#: slim's MOBILENETV1_CONV_DEFS: (stride, depth) of Conv2d_0, then of each separable layer.
CONV_DEFS: tuple[tuple[int, int], ...] = (
    (2, 32),
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)

# mobilenet_v1_arg_scope's batch norm and initializer.
BATCH_NORM_DECAY = 0.9997
BATCH_NORM_EPSILON = 0.001
WEIGHTS_STDDEV = 0.09


class MobileNetV1(LogitsHead, SlimNet):
    """slim's mobilenet_v1 under the scope 'MobilenetV1'.

    Keyword arguments are slim's: depth_multiplier, min_depth (8), dropout_keep_prob (0.999),
    spatial_squeeze, global_pool; plus mobilenet_v1_base's output_stride (8, 16, 32: atrous beyond
    it) and use_explicit_padding (symmetric pre-padding + VALID instead of TF's 'SAME'), which
    slim's mobilenet_v1() does not forward but its base network takes.
    """

    scope = "MobilenetV1"
    classifier_scope = "MobilenetV1/Logits/Conv2d_1c_1x1"
    classifier_scopes = ("MobilenetV1/Logits",)

    def __init__(self, num_classes: int = 1001, depth_multiplier: float = 1.0, min_depth: int = 8,
                 dropout_keep_prob: float = 0.999, spatial_squeeze: bool = True, global_pool: bool = False,
                 output_stride: Optional[int] = None, use_explicit_padding: bool = False,
                 in_channels: int = 3) -> None:
        super().__init__(num_classes)
        self.depth_multiplier = check_depth_multiplier(self.scope, depth_multiplier)
        if output_stride is not None and output_stride not in (8, 16, 32):
            raise ConfigError(f"MobilenetV1: output_stride={output_stride}; use 8, 16, 32 or None")
        self.spatial_squeeze = bool(spatial_squeeze)
        self.global_pool = bool(global_pool)
        self.output_stride = output_stride
        self.use_explicit_padding = bool(use_explicit_padding)
        padding = "EXPLICIT" if use_explicit_padding else "SAME"
        norm = batch_norm_factory(eps=BATCH_NORM_EPSILON, decay=BATCH_NORM_DECAY, scale=True)

        def depth(d: int) -> int:
            return max(int(d * self.depth_multiplier), min_depth)

        body = nn.Module()
        stride, depth_0 = CONV_DEFS[0]
        body.Conv2d_0 = Conv2d(in_channels, depth(depth_0), 3, stride, padding=padding, normalizer=norm,
                               activation=relu6_)
        channels = depth(depth_0)
        names = ["Conv2d_0"]
        current_stride, rate = stride, 1
        for index, (stride, base_depth) in enumerate(CONV_DEFS[1:], start=1):
            # slim's output_stride bookkeeping: past the target, strides turn into atrous rates.
            if output_stride is not None and current_stride == output_stride:
                layer_stride, layer_rate = 1, rate
                rate *= stride
            else:
                layer_stride, layer_rate = stride, 1
                current_stride *= stride
            depthwise, pointwise = f"Conv2d_{index}_depthwise", f"Conv2d_{index}_pointwise"
            body.add_module(depthwise, DepthwiseConv2d(channels, 3, layer_stride, padding=padding, rate=layer_rate,
                                                       normalizer=norm, activation=relu6_))
            body.add_module(pointwise, Conv2d(channels, depth(base_depth), 1, padding="VALID", normalizer=norm,
                                              activation=relu6_))
            channels = depth(base_depth)
            names += [depthwise, pointwise]
        self._layer_names = tuple(names)
        self.num_features = channels
        self._keep_prob = check_keep_prob(self.scope, dropout_keep_prob)
        self._init_stddev = WEIGHTS_STDDEV
        self.add_module(self.scope, body)
        self._make_head(num_classes)
        init_truncated_normal(self, WEIGHTS_STDDEV)

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """slim's mobilenet_v1_base: Conv2d_0 ... Conv2d_13_pointwise, each an end point."""
        body = self._modules[self.scope]
        net = x
        for name in self._layer_names:
            net = end_points[name] = body._modules[name](net)
        return net

    def _pool(self, net: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        if self.global_pool:
            net = end_points["global_pool"] = reduce_mean_hw(net)
            return net
        # slim's AvgPool_1a: a 7x7 window shrunk to small maps, VALID, avg_pool2d's default stride 2.
        height, width = net.shape[-2:]
        kernel = (min(height, 7), min(width, 7))
        net = end_points["AvgPool_1a"] = F.avg_pool2d(net, kernel, 2)
        return net

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """AvgPool_1a (or global_pool), Logits, Predictions; the pooled features when headless or pre_logits."""
        net = self._pool(features, end_points)
        if not self.num_classes or pre_logits:
            return pooled_features(net)
        net = self.dropout(net)
        logits = self._modules[self.scope].Logits.Conv2d_1c_1x1(net)
        if self.spatial_squeeze:
            if logits.shape[2] != 1 or logits.shape[3] != 1:
                raise ConfigError(f"MobilenetV1: spatial_squeeze needs 1x1 logits but they are "
                                  f"{logits.shape[2]}x{logits.shape[3]} (feature map "
                                  f"{features.shape[2]}x{features.shape[3]}); "
                                  "pass global_pool=True or spatial_squeeze=False")
            logits = logits.flatten(1)
        end_points["Logits"] = logits
        # slim's softmax normalizes the last (class) axis: dim 1 in NCHW.
        end_points["Predictions"] = torch.softmax(logits, dim=1)
        return logits


def _register(name: str, depth_multiplier: float, published: str):
    """Register one slim mobilenet_v1 depth variant."""
    def build(num_classes: int = 1001, **kwargs) -> MobileNetV1:
        return MobileNetV1(num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"MobileNet v1, depth multiplier {depth_multiplier} (slim nets/mobilenet_v1.py, "
                     "scope 'MobilenetV1'); Inception preprocessing, 1001-class checkpoints.")
    return register_model(name, default_image_size=224, preprocessing="inception", checkpoint_num_classes=1001,
                          scope="MobilenetV1", published_checkpoint=published,
                          classifier_scopes=("MobilenetV1/Logits",), first_conv="MobilenetV1/Conv2d_0",
                          depth_multiplier=depth_multiplier)(build)


mobilenet_v1 = _register("mobilenet_v1", 1.0, "mobilenet_v1_1.0_224.tgz")
mobilenet_v1_075 = _register("mobilenet_v1_075", 0.75, "mobilenet_v1_0.75_224.tgz")
mobilenet_v1_050 = _register("mobilenet_v1_050", 0.50, "mobilenet_v1_0.5_224.tgz")
mobilenet_v1_025 = _register("mobilenet_v1_025", 0.25, "mobilenet_v1_0.25_224.tgz")
