"""The network contract every slimtune model follows (slim's uniform signature, in torch)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from torch import Tensor, nn

EndPoints = "OrderedDict[str, Tensor]"


class SlimNet(nn.Module):
    """Base of slimtune's networks: slim-named parameters and end points.

    Subclasses build their layers under a child module named after slim's variable scope (so
    state_dict keys equal slim variable names with '/' -> '.') and implement `forward_endpoints`.
    ``model(x)`` returns logits [N, num_classes]; with ``num_classes=0`` it returns the pooled
    features [N, num_features] instead (a headless backbone).
    """

    #: slim's variable scope, e.g. 'vgg_16' or 'MobilenetV1'.
    scope: str = ""
    #: scope of the classifier layer, e.g. 'vgg_16/fc8' (replaced when fine-tuning to new classes).
    classifier_scope: str = ""
    #: width of the pooled features that feed the classifier.
    num_features: int = 0

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)

    def forward_endpoints(self, x: Tensor) -> tuple[Tensor, "OrderedDict[str, Tensor]"]:
        """Return (logits, end_points) with slim's end-point names; x is NCHW, preprocessed."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes], or pooled features [N, num_features] when headless."""
        return self.forward_endpoints(x)[0]


def pooled_features(x: Tensor) -> Tensor:
    """Flatten a [N, C, 1, 1] (or any spatial) feature map into [N, C] by averaging space."""
    if x.dim() == 4:
        if x.shape[2] != 1 or x.shape[3] != 1:
            x = x.mean(dim=(2, 3))
        else:
            x = x.flatten(1)
    return x


def new_end_points() -> "OrderedDict[str, Tensor]":
    """An ordered end-point dict (insertion order = network order)."""
    return OrderedDict()


def maybe_dropout(module: Optional[nn.Module], x: Tensor) -> Tensor:
    """Apply an optional dropout module."""
    return module(x) if module is not None else x
