"""The network contract every slimtune model follows (slim's uniform signature, in torch).

Every registered net is a `SlimNet` and honours this contract; `tests/test_models.py` checks it
over the whole registry:

- **Names.** Layers live under a child module named after slim's variable scope, so state_dict keys
  are slim's variable names with '/' -> '.' and the leaf renamed (weights -> weight, biases -> bias,
  BatchNorm gamma/beta/moving_mean/moving_variance -> weight/bias/running_mean/running_var).
- **Classes.** The constructor's first argument is `num_classes`; 0 builds a headless backbone.
- **Two hooks, four entry points.** A net implements `_forward_features(x, end_points)` (the body:
  every end point up to the last feature map, in slim's order; auxiliary heads that branch off the
  body record `AuxLogits` here) and `_forward_head(features, end_points, pre_logits)` (pooling,
  dropout, classifier, squeeze, `Logits`/`Predictions`). The base class composes them:
    * `forward_endpoints(x) -> (out, end_points)`: slim's `(logits, end_points)`;
    * `forward_features(x) -> Tensor`: the final feature map before the net's pooling and head;
    * `forward_head(features, pre_logits=False) -> Tensor`: logits, or the pooled features
      [N, num_features] with pre_logits=True (or when headless);
    * `forward(x, with_end_points=False)`: logits [N, num_classes] (pooled features
      [N, num_features] when headless), or `(out, end_points)` when asked. Training calls
      `model(x, with_end_points=True)` so that a DDP wrapper sees the same call as a bare net.
  `forward(x) == forward_head(forward_features(x))` for every net.
- **Heads.** `_build_classifier(num_classes)` creates every classifier layer under slim's scope
  names (or removes them for 0); the constructor and `reset_classifier` both call it, so a reset
  head is built exactly like a new one. `classifier_scopes` lists the scopes that hold heads (the
  main one first, auxiliary ones after it): what `--checkpoint_exclude_scopes heads` excludes.
  `get_classifier()` returns the main classifier layer (`nn.Identity()` when headless).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Optional, Union

from torch import Tensor, nn

from ..errors import ConfigError

EndPoints = "OrderedDict[str, Tensor]"


class SlimNet(nn.Module):
    """Base of slimtune's networks: slim-named parameters and end points (see the module docstring)."""

    #: slim's variable scope, e.g. 'vgg_16' or 'MobilenetV1'.
    scope: str = ""
    #: the main classifier layer, e.g. 'vgg_16/fc8' or 'MobilenetV1/Logits/Conv2d_1c_1x1'.
    classifier_scope: str = ""
    #: the scopes holding classifier heads, main first (e.g. ('InceptionV3/Logits', 'InceptionV3/AuxLogits')).
    classifier_scopes: tuple[str, ...] = ()
    #: width of the pooled features that feed the classifier (the headless output).
    num_features: int = 0

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)

    # The two hooks a net implements --------------------------------------------------------
    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        """The body: record slim's end points in order and return the final feature map."""
        raise NotImplementedError

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        """Pool, classify, record Logits/Predictions; pooled features [N, num_features] when
        pre_logits or headless."""
        raise NotImplementedError

    def _build_classifier(self, num_classes: int) -> None:
        """Create (or, for 0, remove) every classifier layer under slim's scope names."""
        raise NotImplementedError

    # The uniform entry points --------------------------------------------------------------
    def forward_endpoints(self, x: Tensor) -> tuple[Tensor, "OrderedDict[str, Tensor]"]:
        """Return (logits, end_points) with slim's end-point names; x is NCHW, preprocessed."""
        end_points = new_end_points()
        features = self._forward_features(x, end_points)
        return self._forward_head(features, end_points), end_points

    def forward_features(self, x: Tensor) -> Tensor:
        """The final feature map before the net's pooling and classifier."""
        return self._forward_features(x, new_end_points())

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits from `forward_features`' output, or pooled features [N, num_features] with pre_logits."""
        return self._forward_head(features, new_end_points(), pre_logits)

    def forward(self, x: Tensor, with_end_points: bool = False) -> Union[Tensor, tuple[Tensor, "OrderedDict[str, Tensor]"]]:
        """Logits [N, num_classes] (pooled features [N, num_features] when headless), or
        (that, end_points) with with_end_points=True."""
        out, end_points = self.forward_endpoints(x)
        return (out, end_points) if with_end_points else out

    def set_training_step(self, step: int) -> None:
        """The global step about to run (the training loop calls this before each step): nets whose
        training depends on progress, like NASNet's drop path, read it; the others ignore it."""
        self.training_step = int(step)

    def get_classifier(self) -> nn.Module:
        """The main classifier layer (timm's name), or nn.Identity() when headless."""
        if not self.num_classes or not self.classifier_scope:
            return nn.Identity()
        return self.get_submodule(self.classifier_scope.replace("/", "."))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace every classifier head for `num_classes` (0: headless), keeping slim's scope names."""
        num_classes = check_num_classes(num_classes)
        reference = next(self.parameters(), None)
        self._build_classifier(num_classes)
        self.num_classes = num_classes
        if reference is not None:
            # The new head lives where the body does (GPU, meta, bfloat16), as timm's reset does.
            for scope in self.classifier_scopes or (self.classifier_scope,):
                head = _get_submodule_or_none(self, scope.replace("/", "."))
                if head is not None:
                    head.to(device=reference.device, dtype=reference.dtype)


def _get_submodule_or_none(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def check_num_classes(num_classes: int) -> int:
    """num_classes as an int >= 0, or a ConfigError."""
    try:
        value = operator.index(num_classes)  # ints and numpy integers; not floats or strings
    except TypeError:
        value = -1
    if isinstance(num_classes, bool) or value < 0:
        raise ConfigError(f"num_classes must be an integer >= 0 (0: headless), got {num_classes!r}")
    return value


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
