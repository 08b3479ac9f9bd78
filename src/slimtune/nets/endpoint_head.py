"""A linear classifier on one end point of a backbone: what `slimtune probe` saves as its best model.

The backbone's own modules are registered under their own names, so the state_dict keeps slim's
variable names (a probe checkpoint restores into the plain net like any other); the head lives
under ``probe/<end point>`` (``probe.block2.weight``) and is the only classifier.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import pooled_features
from .registry import ModelSpec

#: Scope of the probe's linear head; the end point's name follows ('probe/resnet_v1_50/block2').
HEAD_SCOPE = "probe"


def head_scope(endpoint: str) -> str:
    """The classifier scope of a probe head on `endpoint`."""
    return f"{HEAD_SCOPE}/{endpoint}"


class EndpointHead(nn.Module):
    """`backbone`'s `endpoint`, averaged over space, into a linear layer of `num_classes`."""

    def __init__(self, backbone: nn.Module, endpoint: str, num_classes: int, num_features: int) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_endpoints", None)):
            raise ConfigError(f"{type(backbone).__name__} has no forward_endpoints(x); a probe head needs a slimtune net")
        # Not a child: its children are ours under their own names, so the keys stay slim's.
        object.__setattr__(self, "backbone", backbone)
        for name, child in backbone.named_children():
            self.add_module(name, child)
        self.endpoint = endpoint
        self.num_classes = num_classes
        self.num_features = num_features
        self.classifier_scope = head_scope(endpoint)
        self.classifier_scopes = (self.classifier_scope,)
        self.spec = getattr(backbone, "spec", None)
        head = nn.Linear(num_features, num_classes)
        parent: nn.Module = self
        parts = self.classifier_scope.split("/")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], head)

    def train(self, mode: bool = True) -> EndpointHead:
        """Train/eval mode for the head and the backbone (whose non-child state follows too)."""
        super().train(mode)
        self.backbone.train(mode)
        return self

    def get_classifier(self) -> nn.Module:
        """The probe's linear head."""
        return self.get_submodule(self.classifier_scope.replace("/", "."))

    def features(self, x: Tensor) -> tuple[Tensor, OrderedDict]:
        """The pooled end point [N, num_features] and the backbone's end points."""
        _, end_points = self.backbone.forward_endpoints(x)
        if self.endpoint not in end_points:
            raise ConfigError(f"the backbone has no end point {self.endpoint!r}")
        return pooled_features(end_points[self.endpoint]).flatten(1), end_points

    def forward_endpoints(self, x: Tensor) -> tuple[Tensor, OrderedDict]:
        """(logits, end points): the backbone's end points up to the probed one, then Logits/Predictions."""
        features, backbone_points = self.features(x)
        end_points: OrderedDict = OrderedDict()
        for name, value in backbone_points.items():
            end_points[name] = value
            if name == self.endpoint:
                break
        logits = self.get_classifier()(features)
        end_points["Logits"] = logits
        end_points["Predictions"] = torch.softmax(logits, dim=-1)
        return logits, end_points

    def forward(self, x: Tensor, with_end_points: bool = False):
        """Logits, or (logits, end points) when asked (slimtune's training call)."""
        logits, end_points = self.forward_endpoints(x)
        return (logits, end_points) if with_end_points else logits


def is_probe_checkpoint(metadata: dict[str, str]) -> bool:
    """True for the metadata of a checkpoint `slimtune probe` saved."""
    return bool(metadata.get("probe_endpoint"))


def build_probe_model(spec: ModelSpec, metadata: dict[str, str], image_size: int | None = None) -> EndpointHead:
    """The (untrained) model a probe checkpoint holds, from its metadata: load its weights next."""
    try:
        endpoint, classes = metadata["probe_endpoint"], int(metadata["num_classes"])
        features = int(metadata["probe_num_features"])
    except (KeyError, ValueError) as error:
        raise ConfigError(f"probe checkpoint metadata is incomplete ({error})") from error
    return EndpointHead(spec.build(0, image_size=image_size), endpoint, classes, features)
