"""Inception-ResNet-v2 as research/slim builds it (nets/inception_resnet_v2.py).

The residual Inception blocks are public, for networks of a user's own design (a copy of this net
under another scope with one block changed restores everything else from the published checkpoint):

- `Block35` (35x35 grid, slim's block35), `Block17` (17x17, block17), `Block8` (8x8, block8):
  branches concatenated, a 1x1 conv with bias ('Conv2d_1x1', no batch norm, no activation) back to
  the input width, scaled, added to the input, then the block activation (none for the last
  Block8). With `activation_fn=relu6`, slim clips the scaled residual to [-6, 6] first.
- `RepeatStack`: slim.repeat's 'Repeat/block35_1'... scopes.
- `inception_resnet_v2_body`: the whole body as a list of (module name, end point, module) that
  `slimtune.nets.inception.InceptionNet` runs; edit the list to change a block.

Options are slim's: create_aux_logits, dropout_keep_prob, activation_fn (the blocks' activation:
'relu', 'relu6' or a callable), and the base network's align_feature_maps (SAME instead of VALID
in the stem and reduction layers, so that feature maps align with the input), output_stride (8
makes Mixed_6a stride 1 and the Block17 convs atrous; slim supports it only up to 'PreAuxLogits')
and final_endpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .inception import (_ACTIVATIONS, Activation, HeadSpec, InceptionNet, LayerSpec, MixedBlock, NormFactory,
                        _accepts, _stem, avg_pool, conv, inception_batch_norm, max_pool, relu_, spatial_size)
from .layers import Conv2d
from .registry import register_model

__all__ = ["Block35", "Block17", "Block8", "ResidualInceptionBlock", "RepeatStack", "InceptionResNetV2",
           "inception_resnet_v2_body", "resolve_activation", "inception_resnet_v2"]

ActivationArg = Union[None, str, Callable[[Tensor], Tensor]]


def resolve_activation(activation_fn: ActivationArg) -> tuple[Activation, bool]:
    """(the activation, whether it is relu6) from slim's activation_fn: 'relu', 'relu6', None or a callable."""
    if activation_fn is None or callable(activation_fn):
        return activation_fn, False
    key = str(activation_fn).lower()
    if key not in _ACTIVATIONS:
        raise ConfigError(f"activation_fn must be one of {', '.join(_ACTIVATIONS)}, None or a callable; "
                          f"got {activation_fn!r}")
    return _ACTIVATIONS[key], key == "relu6"


class ResidualInceptionBlock(nn.Module):
    """slim's block35/block17/block8 shape: Inception branches, a 1x1 'Conv2d_1x1' (bias, linear)
    back to the input width, `x + scale * up`, then `activation` (None: linear).

    `branches` are branch specs as in `slimtune.nets.inception` (conv/max_pool/avg_pool/split);
    `rate` is the atrous rate of every conv (Inception-ResNet-v2's output_stride=8 uses 2 in Block17).
    """

    def __init__(self, channels: int, branches: Sequence[Sequence[LayerSpec]], scale: float = 1.0,
                 activation: ActivationArg = "relu", norm: Optional[NormFactory] = None, rate: int = 1) -> None:
        super().__init__()
        norm = norm or inception_batch_norm()
        mixed = MixedBlock(channels, branches, norm, "SAME")
        if rate != 1:
            for module in mixed.modules():
                if isinstance(module, Conv2d):
                    module.rate = (rate, rate)
                    module._static_padding = module._symmetric_static_padding()
        # The branches sit directly under the block's scope (Branch_0, Branch_1, ...).
        for name, branch in mixed.named_children():
            self.add_module(name, branch)
        self.Conv2d_1x1 = Conv2d(mixed.out_channels, channels, 1, activation=None)
        self.scale = float(scale)
        self.activation, self.clip = resolve_activation(activation)
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        """x + scale * Conv2d_1x1(concat(branches)), then the activation."""
        mixed = torch.cat([self._modules[name](x) for name in self._modules if name.startswith("Branch_")], dim=1)
        up = self.Conv2d_1x1(mixed)
        if self.clip:
            out = x + torch.clamp(up * self.scale, -6.0, 6.0)
        else:
            out = x + up * self.scale
        return self.activation(out) if self.activation is not None else out


BLOCK35_BRANCHES = [
    [conv("Conv2d_1x1", 32, 1)],
    [conv("Conv2d_0a_1x1", 32, 1), conv("Conv2d_0b_3x3", 32, 3)],
    [conv("Conv2d_0a_1x1", 32, 1), conv("Conv2d_0b_3x3", 48, 3), conv("Conv2d_0c_3x3", 64, 3)],
]
BLOCK17_BRANCHES = [
    [conv("Conv2d_1x1", 192, 1)],
    [conv("Conv2d_0a_1x1", 128, 1), conv("Conv2d_0b_1x7", 160, (1, 7)), conv("Conv2d_0c_7x1", 192, (7, 1))],
]
BLOCK8_BRANCHES = [
    [conv("Conv2d_1x1", 192, 1)],
    [conv("Conv2d_0a_1x1", 192, 1), conv("Conv2d_0b_1x3", 224, (1, 3)), conv("Conv2d_0c_3x1", 256, (3, 1))],
]


class Block35(ResidualInceptionBlock):
    """slim's block35 (35x35 grid): three branches (1x1; 1x1-3x3; 1x1-3x3-3x3), scale 0.17 in the net."""

    def __init__(self, channels: int = 320, scale: float = 1.0, activation: ActivationArg = "relu",
                 norm: Optional[NormFactory] = None) -> None:
        super().__init__(channels, BLOCK35_BRANCHES, scale, activation, norm)


class Block17(ResidualInceptionBlock):
    """slim's block17 (17x17 grid): 1x1 and 1x1-1x7-7x1 branches, scale 0.10 in the net."""

    def __init__(self, channels: int = 1088, scale: float = 1.0, activation: ActivationArg = "relu",
                 norm: Optional[NormFactory] = None, rate: int = 1) -> None:
        super().__init__(channels, BLOCK17_BRANCHES, scale, activation, norm, rate)


class Block8(ResidualInceptionBlock):
    """slim's block8 (8x8 grid): 1x1 and 1x1-1x3-3x1 branches, scale 0.20 in the net (1.0, linear, last)."""

    def __init__(self, channels: int = 2080, scale: float = 1.0, activation: ActivationArg = "relu",
                 norm: Optional[NormFactory] = None) -> None:
        super().__init__(channels, BLOCK8_BRANCHES, scale, activation, norm)


class RepeatStack(nn.Module):
    """slim.repeat's scope ('Repeat', 'Repeat_1', ...): children '<prefix>_1'... run in order."""

    def __init__(self, prefix: str, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        for index, block in enumerate(blocks, start=1):
            self.add_module(f"{prefix}_{index}", block)
        self.out_channels = getattr(blocks[-1], "out_channels", 0) if blocks else 0

    def forward(self, x: Tensor) -> Tensor:
        """Run the repeated blocks."""
        for block in self.children():
            x = block(x)
        return x

    def output_size(self, size: int) -> int:
        """Spatial size after the stack."""
        for block in self.children():
            size = spatial_size(block, size)
        return size


def inception_resnet_v2_body(in_channels: int = 3, align_feature_maps: bool = False, output_stride: int = 16,
                             activation_fn: ActivationArg = "relu", norm: Optional[NormFactory] = None,
                             ) -> list[tuple[str, Optional[str], nn.Module]]:
    """slim's inception_resnet_v2_base as (module name, end point or None, module) rows, in order.

    End points: Conv2d_1a_3x3 ... MaxPool_5a_3x3, Mixed_5b, Mixed_6a, PreAuxLogits (after the
    Block17 stack), Mixed_7a, Conv2d_7b_1x1.
    """
    if output_stride not in (8, 16):
        raise ConfigError(f"InceptionResnetV2: output_stride must be 8 or 16, got {output_stride}")
    norm = norm or inception_batch_norm()
    padding = "SAME" if align_feature_maps else "VALID"
    atrous = output_stride == 8
    body, channels = _stem(in_channels, [
        conv("Conv2d_1a_3x3", 32, 3, 2, padding), conv("Conv2d_2a_3x3", 32, 3, 1, padding),
        conv("Conv2d_2b_3x3", 64, 3), max_pool("MaxPool_3a_3x3", 3, 2, padding),
        conv("Conv2d_3b_1x1", 80, 1, 1, padding), conv("Conv2d_4a_3x3", 192, 3, 1, padding),
        max_pool("MaxPool_5a_3x3", 3, 2, padding)], norm, "SAME", lambda d: d)
    mixed_5b = MixedBlock(channels, [
        [conv("Conv2d_1x1", 96, 1)],
        [conv("Conv2d_0a_1x1", 48, 1), conv("Conv2d_0b_5x5", 64, 5)],
        [conv("Conv2d_0a_1x1", 64, 1), conv("Conv2d_0b_3x3", 96, 3), conv("Conv2d_0c_3x3", 96, 3)],
        [avg_pool("AvgPool_0a_3x3", 3, 1, "SAME"), conv("Conv2d_0b_1x1", 64, 1)],
    ], norm, "SAME")
    body.append(("Mixed_5b", "Mixed_5b", mixed_5b))
    activation = activation_fn
    body.append(("Repeat", None, RepeatStack("block35", [Block35(320, 0.17, activation, norm) for _ in range(10)])))
    stride = 1 if atrous else 2
    mixed_6a = MixedBlock(320, [
        [conv("Conv2d_1a_3x3", 384, 3, stride, padding)],
        [conv("Conv2d_0a_1x1", 256, 1), conv("Conv2d_0b_3x3", 256, 3), conv("Conv2d_1a_3x3", 384, 3, stride, padding)],
        [max_pool("MaxPool_1a_3x3", 3, stride, padding)],
    ], norm, "SAME")
    body.append(("Mixed_6a", "Mixed_6a", mixed_6a))
    body.append(("Repeat_1", "PreAuxLogits", RepeatStack(
        "block17", [Block17(1088, 0.10, activation, norm, rate=2 if atrous else 1) for _ in range(20)])))
    if atrous:
        return body  # slim: output_stride 8 is only supported up to PreAuxLogits
    mixed_7a = MixedBlock(1088, [
        [conv("Conv2d_0a_1x1", 256, 1), conv("Conv2d_1a_3x3", 384, 3, 2, padding)],
        [conv("Conv2d_0a_1x1", 256, 1), conv("Conv2d_1a_3x3", 288, 3, 2, padding)],
        [conv("Conv2d_0a_1x1", 256, 1), conv("Conv2d_0b_3x3", 288, 3), conv("Conv2d_1a_3x3", 320, 3, 2, padding)],
        [max_pool("MaxPool_1a_3x3", 3, 2, padding)],
    ], norm, "SAME")
    body.append(("Mixed_7a", "Mixed_7a", mixed_7a))
    body.append(("Repeat_2", None, RepeatStack("block8", [Block8(2080, 0.20, activation, norm) for _ in range(9)])))
    body.append(("Block8", None, Block8(2080, 1.0, None, norm)))
    final = Conv2d(2080, 1536, 1, normalizer=norm, activation=relu_)
    body.append(("Conv2d_7b_1x1", "Conv2d_7b_1x1", final))
    return body


class InceptionResNetV2(InceptionNet):
    """slim's inception_resnet_v2 (scope 'InceptionResnetV2'): 299 px, AuxLogits on PreAuxLogits
    ('Conv2d_2a_5x5' sized to the pooled map, fully connected 'AuxLogits/Logits'), an average pool
    over the whole final map ('global_pool'), flatten, dropout ('PreLogitsFlatten') and fully
    connected 'Logits/Logits'. `body` replaces the body rows (see `inception_resnet_v2_body`)."""

    aux_source = "PreAuxLogits"
    default_final_endpoint = "Conv2d_7b_1x1"

    def __init__(self, num_classes: int = 1001, dropout_keep_prob: float = 0.8, create_aux_logits: bool = True,
                 activation_fn: ActivationArg = "relu", align_feature_maps: bool = False, output_stride: int = 16,
                 final_endpoint: Optional[str] = None, in_channels: int = 3, image_size: Optional[int] = None,
                 scope: str = "InceptionResnetV2",
                 body: Optional[Sequence[tuple[str, Optional[str], nn.Module]]] = None) -> None:
        resolve_activation(activation_fn)  # refuse a bad name before building anything
        norm = inception_batch_norm()
        if body is None:
            body = inception_resnet_v2_body(in_channels, align_feature_maps, output_stride, activation_fn, norm)
        if output_stride == 8 and final_endpoint in (None, "Mixed_7a", "Conv2d_7b_1x1"):
            raise ConfigError("InceptionResnetV2: output_stride=8 is only supported up to final_endpoint="
                              "'PreAuxLogits' (as in slim); pass that and num_classes=0")
        self.align_feature_maps, self.output_stride = bool(align_feature_maps), output_stride
        head = HeadSpec(pool="full", logits_as_conv=False, logits_name="Logits", pre_logits="PreLogitsFlatten",
                        flatten_before_dropout=True)
        aux = {"logits_name": "Logits", "logits_as_conv": False, "conv_name_format": "Conv2d_2a_5x5"}
        super().__init__(num_classes, scope, list(body), head, norm, image_size, final_endpoint,
                         create_aux_logits=create_aux_logits, dropout_keep_prob=dropout_keep_prob, aux_layout=aux)


_ARGS = ("dropout_keep_prob", "create_aux_logits", "activation_fn", "align_feature_maps", "output_stride",
         "final_endpoint", "in_channels", "image_size")


@register_model(default_image_size=299, preprocessing="inception", checkpoint_num_classes=1001,
                scope="InceptionResnetV2", published_checkpoint="inception_resnet_v2_2016_08_30.tar.gz",
                published_top1=80.4, published_top5=95.3,
                classifier_scopes=("InceptionResnetV2/Logits", "InceptionResnetV2/AuxLogits"),
                first_conv="InceptionResnetV2/Conv2d_1a_3x3", min_image_size=107, sized_by_input=True)
def inception_resnet_v2(num_classes: int = 1001, **kwargs: Any) -> InceptionResNetV2:
    """Inception-ResNet-v2 (slim nets/inception_resnet_v2.py, scope 'InceptionResnetV2'); 299 px, 1001 classes."""
    _accepts("inception_resnet_v2", kwargs, _ARGS)
    return InceptionResNetV2(num_classes, **kwargs)
