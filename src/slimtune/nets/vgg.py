"""VGG as slim builds it (nets/vgg.py): vgg_a, vgg_16, vgg_19 with their fully connected layers
written as convolutions (fc6 7x7, fc7 and fc8 1x1; the head alexnet_v2 and overfeat share, in
`conv_fc_head`).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..errors import ConfigError
from .conv_fc_head import FC_DEPTH, FullyConvolutionalBody, FullyConvolutionalNet, relu_inplace, xavier_zero_bias_init
from .layers import Conv2d, MaxPool2d, check_keep_prob
from .registry import register_model

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
        self.build_head(channels, 7, FC_DEPTH, fc_conv_padding, num_classes, dropout_keep_prob,
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
        self.classifier_scopes = (self.classifier_scope,)
        # Five 2x2/2 VALID pools floor the size to H//32; fc6 (7x7) then needs 7 pixels unless SAME.
        self.min_input_size = 32 * (7 if padding == "VALID" else 1)
        if padding == "VALID":
            self.min_input_hint = " (fc_conv_padding='SAME' accepts inputs down to 32x32)"
        keep_prob = check_keep_prob(variant, dropout_keep_prob)
        self.add_module(variant, _VGGBody(variant, num_classes, keep_prob, spatial_squeeze, padding,
                                          global_pool, in_channels))


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_a",
                classifier_scopes=("vgg_a/fc8",), first_conv="vgg_a/conv1/conv1_1", min_image_size=224)
def vgg_a(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 11-layer configuration A (slim nets/vgg.py vgg_a); no published slim checkpoint."""
    return VGG("vgg_a", num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_16",
                classifier_scopes=("vgg_16/fc8",), first_conv="vgg_16/conv1/conv1_1", min_image_size=224,
                published_checkpoint="vgg_16_2016_08_28.tar.gz")
def vgg_16(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 16-layer configuration D (slim nets/vgg.py vgg_16), Caffe-converted 1000-class checkpoint."""
    return VGG("vgg_16", num_classes, **kwargs)


@register_model(default_image_size=224, preprocessing="vgg", checkpoint_num_classes=1000, scope="vgg_19",
                classifier_scopes=("vgg_19/fc8",), first_conv="vgg_19/conv1/conv1_1", min_image_size=224,
                published_checkpoint="vgg_19_2016_08_28.tar.gz")
def vgg_19(num_classes: int = 1000, **kwargs) -> VGG:
    """VGG 19-layer configuration E (slim nets/vgg.py vgg_19), Caffe-converted 1000-class checkpoint."""
    return VGG("vgg_19", num_classes, **kwargs)
