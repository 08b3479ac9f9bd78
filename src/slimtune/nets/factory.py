"""The front door: `create_model`, with timm's keyword arguments on top of slim's registry.

    model = create_model("resnet_v1_50", pretrained=True)            # slim's published weights
    model = create_model("mobilenet_v2", num_classes=5, in_chans=1)  # new head, grayscale input
    backbone = create_model("resnet_v2_50", features_only=True, out_indices=(2, 3, 4))

`pretrained=True` never downloads: it looks for the registry's published slim tarball (or what it
unpacks to) in a local cache, `cache_dir` or $SLIMTUNE_HOME (default ~/.cache/slimtune), and says
which file to put where when it is not there. Every model carries `pretrained_cfg`, timm's record
of how to feed it (input size, preprocessing, mean/std, crop, classes, label offset, heads).
"""

from __future__ import annotations

import inspect
import math
import os
import re
import tarfile
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..preprocessing.pretrained import PREFIX as PRETRAINED_PREFIX
from ..preprocessing.pretrained import parse_name as parse_preprocessing
from ..utils.home import slimtune_home
from .base import SlimNet
from .registry import ModelSpec, get_model_spec

#: create_model's own keyword arguments (the rest go to the net's builder).
FRONT_DOOR_OPTIONS = ("pretrained", "num_classes", "checkpoint_path", "in_chans", "features_only",
                      "out_indices", "cache_dir")

# Mean/std in timm's convention (images in [0, 1], x' = (x - mean) / std) for the preprocessing
# functions whose normalization is a fixed affine map; cifarnet's per-image standardization has none.
_NORMALIZATION = {
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),                       # x * 2 - 1
    "vgg": ((123.68 / 255, 116.78 / 255, 103.94 / 255), (1 / 255, 1 / 255, 1 / 255)),  # x*255 - mean
    "lenet": ((128 / 255,), (128 / 255,)),                                 # (x*255 - 128) / 128
}
# Fraction of the image the eval preprocessing keeps: inception's central crop, vgg's 224 of 256.
_CROP_PCT = {"inception": 0.875, "vgg": 224 / 256, "lenet": 1.0, "cifarnet": 1.0}


def pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """timm's `pretrained_cfg` for a registered net: how its published checkpoint wants its input."""
    mean, std = _NORMALIZATION.get(spec.preprocessing, (None, None))
    crop_pct, interpolation = _CROP_PCT.get(spec.preprocessing), "bilinear"
    if spec.preprocessing.startswith(PRETRAINED_PREFIX):  # timm / torchvision: their own config
        options = parse_preprocessing(spec.preprocessing)
        mean, std, crop_pct, interpolation = (options["mean"], options["std"], options["crop_pct"],
                                              options["interpolation"])
    classes = spec.checkpoint_num_classes
    return {
        "architecture": spec.name,
        "input_size": (spec.in_channels, spec.default_image_size, spec.default_image_size),
        "min_input_size": (spec.in_channels, spec.min_image_size, spec.min_image_size),
        "preprocessing": spec.preprocessing,
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "num_classes": classes,
        # slim's 1001-class ImageNet checkpoints keep class 0 for 'background'.
        "label_offset": 1 if classes == 1001 else 0,
        "classifier": spec.classifier_scopes[0] if spec.classifier_scopes else "",
        "classifier_scopes": tuple(spec.classifier_scopes),
        "first_conv": spec.first_conv,
        "file": spec.published_checkpoint,
        "scope": spec.scope,
    }


def accepted_options(spec: ModelSpec) -> Optional[list[str]]:
    """The builder's keyword arguments (None when they cannot be listed: a builder taking **kwargs
    that it does not document through a return annotation)."""
    names: list[str] = []
    open_ended = False
    for callable_ in _builder_chain(spec.builder):
        if callable_ is None:
            open_ended = True
            break
        params = inspect.signature(callable_).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    else:
        open_ended = True
    if open_ended:
        return None
    skip = {"self", "num_classes", "variant"}
    if not spec.sized_by_input:
        skip.add("image_size")
    return sorted({n for n in names if n not in skip} | set(spec.defaults))


def _builder_chain(builder: Any) -> list[Any]:
    """The builder, then (if it forwards **kwargs) the class its return annotation names."""
    chain = [builder]
    try:
        returned = typing.get_type_hints(builder).get("return")
    except Exception:  # an unresolvable annotation: the options cannot be listed
        returned = None
    chain.append(returned.__init__ if inspect.isclass(returned) else None)
    return chain


def _check_options(spec: ModelSpec, kwargs: dict[str, Any]) -> None:
    accepted = accepted_options(spec)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{spec.name}: unknown option(s) {', '.join(unknown)}; accepted: "
                          f"{', '.join(list(FRONT_DOOR_OPTIONS) + accepted)}")


def _check_image_size(spec: ModelSpec, kwargs: dict[str, Any]) -> None:
    size = kwargs.get("image_size")
    # The registry's minimum is the default architecture's; options (no aux head, global_pool, a
    # final_endpoint) can lower it, and then the net's own check decides.
    if set(kwargs) - {"image_size"}:
        return
    if size is not None and spec.sized_by_input and int(size) < spec.min_image_size:
        raise ConfigError(f"{spec.name}: image_size={size} is too small; the net needs at least "
                          f"{spec.min_image_size}x{spec.min_image_size}")


def find_pretrained(spec: ModelSpec, cache_dir: Optional[str] = None) -> str:
    """The local checkpoint of `spec`'s published weights (unpacking its tarball if only that is
    there), or a one-line ConfigError naming the tarball and the directory to put it in."""
    tarball = spec.published_checkpoint
    if not tarball:
        raise ConfigError(f"{spec.name}: slim published no checkpoint for this net; train it or pass "
                          "checkpoint_path=")
    home = slimtune_home(cache_dir)
    stem = re.sub(r"\.(tar\.gz|tgz|tar)$", "", tarball)
    found = _find_checkpoint(home, stem, spec)
    if found is None and (home / tarball).is_file():
        _unpack(home / tarball, home / stem)
        found = _find_checkpoint(home, stem, spec)
    if found is None:
        raise ConfigError(f"{spec.name}: pretrained weights not found; download {tarball} (slim's model zoo, "
                          f"research/slim/README.md) into {home} (set SLIMTUNE_HOME or cache_dir=)")
    return found


def _find_checkpoint(home: Path, stem: str, spec: ModelSpec) -> Optional[str]:
    """A checkpoint prefix named like the tarball (with or without its date) or the net."""
    undated = re.sub(r"_\d{4}_\d{2}_\d{2}$", "", stem)
    names = [stem, undated, spec.name, spec.scope]
    for folder in (home / stem, home):
        if not folder.is_dir():
            continue
        for name in names:
            for candidate in (folder / f"{name}.ckpt", folder / name):
                if candidate.is_file() or Path(f"{candidate}.index").is_file():
                    return str(candidate)
    return None


def _unpack(tarball: Path, target: Path) -> None:
    """Unpack a local slim tarball; members may not leave `target` (tarfile's 'data' filter)."""
    try:
        with tarfile.open(tarball) as archive:
            target.mkdir(parents=True, exist_ok=True)
            archive.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ConfigError(f"cannot unpack {tarball}: {error}; download it again") from None


def _restore(model: SlimNet, spec: ModelSpec, path: str, in_chans: int, built_classes: int) -> None:
    """Load a checkpoint, leaving out a head of another class count and adapting the first conv."""
    from ..checkpoint.names import InputChannelsAdapter
    from ..checkpoint.reader import read_checkpoint
    from ..checkpoint.restore import restore

    exclude: list[str] = []
    reader: Any = read_checkpoint(path)
    try:
        names = set(reader.keys())
        head_rows = _checkpoint_classes(reader, model)
        # restore maps ImageNet's 1001 rows (with background) onto 1000 and back; any other
        # class count gets a new head that keeps its fresh initialization.
        if built_classes and head_rows not in (None, built_classes) and {head_rows, built_classes} != {1000, 1001}:
            exclude += list(model.classifier_scopes)
        checkpoint: Any = reader
        if in_chans != spec.in_channels:
            if not spec.first_conv:
                raise ConfigError(f"{spec.name}: in_chans={in_chans} needs the registry's first_conv scope")
            kernel = f"{spec.first_conv}/weights"
            if kernel not in names:
                kernel = f"{spec.first_conv.replace('/', '.')}.weight"
            checkpoint = InputChannelsAdapter(reader, kernel, in_chans)
        restore(model, checkpoint, exclude_scopes=exclude)
    finally:
        closer = getattr(reader, "close", None)
        if callable(closer):
            closer()


def _checkpoint_classes(reader: Any, model: SlimNet) -> Optional[int]:
    """The class count of the checkpoint's main classifier, if the checkpoint has it."""
    if not model.classifier_scope:
        return None
    for name in (f"{model.classifier_scope}/biases", f"{model.classifier_scope.replace('/', '.')}.bias"):
        if name in reader:
            shape = reader.shape(name) if callable(getattr(reader, "shape", None)) else reader[name].shape
            return int(shape[-1])
    return None


def _adapt_first_conv(model: SlimNet, spec: ModelSpec, in_chans: int) -> None:
    """Give a built net `in_chans` inputs by adapting its first conv's kernel (timm's rule)."""
    from ..checkpoint.names import adapt_input_channels

    if not spec.first_conv:
        raise ConfigError(f"{spec.name}: in_chans={in_chans} needs the registry's first_conv scope")
    conv = model.get_submodule(spec.first_conv.replace("/", "."))
    kernel_name = getattr(conv, "kernel_name", "weight")
    kernel = getattr(conv, kernel_name)
    if getattr(conv, "groups", 1) != 1:
        raise ConfigError(f"{spec.name}: the first conv is grouped; in_chans cannot adapt it")
    with torch.no_grad():
        adapted = adapt_input_channels(kernel.detach(), in_chans).contiguous()
    setattr(conv, kernel_name, nn.Parameter(adapted, requires_grad=kernel.requires_grad))
    conv.in_channels = in_chans


def create_model(name: str, pretrained: bool = False, num_classes: Optional[int] = None,
                 checkpoint_path: Optional[str] = None, in_chans: Optional[int] = None,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None,
                 cache_dir: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build a registered net, timm-style.

    num_classes: default the published checkpoint's (1000/1001); 0 is a headless backbone.
    pretrained: load slim's published weights from the local cache (see `find_pretrained`); a
    head of another class count is left freshly initialized. checkpoint_path: load this file.
    in_chans: input channels, None for the net's own (3; lenet 1); with weights, the first conv is
    adapted timm's way (1: sum of the RGB kernels). features_only: a `FeatureNet` returning the
    `out_indices` feature maps, with `feature_info`. Other keyword arguments are the net's own
    (slim's: dropout_keep_prob, output_stride, ...); an unknown one is a one-line ConfigError.
    """
    spec = get_model_spec(name)
    _check_options(spec, kwargs)
    _check_image_size(spec, kwargs)
    if pretrained and checkpoint_path:
        raise ConfigError("give pretrained=True or checkpoint_path=, not both")
    if num_classes is None:
        num_classes = spec.checkpoint_num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes must be an integer >= 0 (0: headless), got {num_classes!r}")
    if in_chans is None:
        in_chans = spec.in_channels
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    path = find_pretrained(spec, cache_dir) if pretrained else checkpoint_path
    build_options = dict(kwargs)
    new_inputs = in_chans != spec.in_channels
    if new_inputs and "in_channels" in (accepted_options(spec) or ()):
        build_options["in_channels"] = in_chans  # built for its input, with slim's init
        new_inputs = False
    model = _build(spec, num_classes, build_options)
    if new_inputs:  # a builder without in_channels: adapt the first conv it built
        _adapt_first_conv(model, spec, in_chans)
    if path is not None:
        # A checkpoint's first-conv kernel is adapted the same way on its way in.
        _restore(model, spec, os.fspath(path), in_chans, num_classes)
    cfg = pretrained_cfg(spec)
    cfg["input_size"] = (in_chans,) + cfg["input_size"][1:]
    cfg["min_input_size"] = (in_chans,) + cfg["min_input_size"][1:]
    model.pretrained_cfg = cfg
    model.in_chans = in_chans
    if features_only:
        return FeatureNet(model, out_indices, in_chans)
    return model


def _build(spec: ModelSpec, num_classes: int, options: dict[str, Any]) -> nn.Module:
    try:
        return spec.build(num_classes, **options)
    except TypeError as error:
        # Only the builder's signature can raise this here; its own message names no choices.
        if "argument" not in str(error):
            raise
        accepted = accepted_options(spec)
        listed = f"; accepted: {', '.join(list(FRONT_DOOR_OPTIONS) + accepted)}" if accepted else ""
        raise ConfigError(f"{spec.name}: {error}{listed}") from None


class FeatureInfo(list):
    """timm's feature_info: one dict per returned map (num_chs, reduction, module = slim end point)."""

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_names(self) -> list[str]:
        return [info["module"] for info in self]


def feature_stages(model: SlimNet, image_size: int, in_chans: int) -> list[dict[str, Any]]:
    """The net's feature stages: for each stride, the last 4-D top-level end point of the body.

    Found by running the body once on the meta device (shapes only, no values, no cost): a
    top-level end point is one without a '/' once the net's own scope is stripped (ResNet's
    'block2', MobileNet's 'layer_7', VGG's 'pool3'; not a unit's inner convs).
    """
    end_points: dict[str, Tensor] = {}
    meta_twin = _meta_twin(model)
    meta_twin._forward_features(torch.empty(1, in_chans, image_size, image_size, device="meta"), end_points)
    prefix = f"{model.scope}/"
    stages: dict[int, dict[str, Any]] = {}
    for name, value in end_points.items():
        short = name[len(prefix):] if name.startswith(prefix) else name
        if value.dim() != 4 or "/" in short:
            continue
        # Nearest power of two: VALID layers (alexnet's 11x11/4) make the exact ratio uneven.
        reduction = 2 ** max(0, round(math.log2(image_size / value.shape[-1])))
        stages[reduction] = {"num_chs": int(value.shape[1]), "reduction": reduction, "module": name}
    return [stages[r] for r in sorted(stages)]


def _meta_twin(model: SlimNet) -> SlimNet:
    """The same net with meta tensors (a deep copy would copy the weights' storage)."""
    import copy

    memo = {id(t): torch.empty_like(t, device="meta") for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    return twin


class FeatureNet(nn.Module):
    """A headless slim net that returns feature maps (timm's features_only).

    Its state_dict keys are the net's own slim names (the net's modules are its children), so slim
    checkpoints load into it as into the net. forward(x) -> [maps at out_indices], shallow to deep.
    """

    def __init__(self, model: SlimNet, out_indices: Optional[Sequence[int]], in_chans: int) -> None:
        super().__init__()
        model.reset_classifier(0)
        spec = getattr(model, "spec", None)
        size = spec.default_image_size if spec is not None else 224
        stages = feature_stages(model, size, in_chans)
        indices = tuple(range(len(stages))) if out_indices is None else tuple(out_indices)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not -len(stages) <= index < len(stages):
                raise ConfigError(f"{model.scope}: out_indices {tuple(out_indices or ())} out of range; this net "
                                  f"has {len(stages)} feature stages (0..{len(stages) - 1}): "
                                  f"{', '.join(s['module'] for s in stages)}")
        chosen = [stages[i] for i in indices]
        self.feature_info = FeatureInfo(chosen)
        self.out_indices = indices
        self._names = tuple(info["module"] for info in chosen)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})
        self.scope = model.scope
        object.__setattr__(self, "net", model)  # not a child: the net's modules are, under slim's names
        for child_name, child in model.named_children():
            self.add_module(child_name, child)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The chosen end points of the body, in feature_info's order."""
        end_points: dict[str, Tensor] = {}
        self.net._forward_features(x, end_points)
        return [end_points[name] for name in self._names]

    def train(self, mode: bool = True) -> "FeatureNet":
        super().train(mode)
        self.net.training = mode
        return self
