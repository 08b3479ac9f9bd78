"""timm and torchvision backbones in slimtune's workflow: ``--model_name timm:resnet50`` / ``torchvision:resnet50``.

A foreign net is wrapped in `ForeignNet`, a `SlimNet` whose children are the library model's own
children under their own names, so its state_dict keys are the library's (``fc.weight``,
``layer4.1.conv2.weight``): a timm / torchvision state-dict file restores with no name map, and
``--checkpoint_exclude_scopes fc`` / ``--trainable_scopes layer4`` mean what those users expect.
End points are module names: the body's top-level children and the items of its containers
(``layer3``, ``layer4.1``, ``blocks.5``), then ``global_pool`` (the pooled features) and ``Logits``.

Nothing is ever downloaded: the library builds with ``pretrained=False`` / ``weights=None`` and the
weights come from ``--checkpoint_path``. The preprocessing is the one the library's pretrained
config names (mean, std, size, interpolation, crop), see `preprocessing.pretrained`.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelNotFoundError
from ..preprocessing.pretrained import format_name
from .base import SlimNet, check_num_classes

#: --model_name prefixes of foreign model sources.
SOURCES = ("timm", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision families whose forward is "body children in order, then pool, flatten, classifier":
# class name -> (pooling child or None for a global average, flatten before the classifier?, classifier child).
# Others (Inception's aux head, DenseNet's functional tail, ViT's class token) do not split that way.
_TORCHVISION_LAYOUTS: dict[str, tuple[Optional[str], bool, str]] = {
    "ResNet": ("avgpool", True, "fc"),
    "RegNet": ("avgpool", True, "fc"),
    "MobileNetV2": (None, True, "classifier"),
    "MobileNetV3": ("avgpool", True, "classifier"),
    "EfficientNet": ("avgpool", True, "classifier"),
    "VGG": ("avgpool", True, "classifier"),
    "AlexNet": ("avgpool", True, "classifier"),
    "ConvNeXt": ("avgpool", False, "classifier"),
    "SwinTransformer": ("avgpool", True, "head"),
}
#: torchvision model-name prefixes of those families (what `slimtune models --source torchvision` lists).
_TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet", "regnet_", "mobilenet_v2", "mobilenet_v3",
                         "efficientnet_", "vgg", "alexnet", "convnext_", "swin_")


def split_name(name: str) -> Optional[tuple[str, str]]:
    """'timm:resnet50' -> ('timm', 'resnet50'); None when the name has no foreign prefix."""
    source, sep, arch = name.partition(":")
    if sep and source in SOURCES:
        return source, arch
    return None


def _import(source: str) -> Any:
    """The library module, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(source)
    except ImportError:
        raise ConfigError(f"--model_name {source}:...: {source} is not installed; "
                          f"pip install 'slimtune[{source}]'") from None


def list_foreign(source: str, pattern: Optional[str] = None) -> list[str]:
    """Architectures of `source` ('timm' or 'torchvision') matching a glob, without the prefix."""
    if source not in SOURCES:
        raise ConfigError(f"--source {source!r}: use one of slim, {', '.join(SOURCES)}")
    library = _import(source)
    if source == "timm":
        names = library.list_models(pattern or "*")
    else:
        names = [n for n in library.models.list_models(module=library.models) if n.startswith(_TORCHVISION_PREFIXES)]
        names = [n for n in names if not pattern or fnmatch.fnmatchcase(n, pattern)]
    return sorted(names)


def describe(source: str, arch: str) -> tuple[int, str, float]:
    """(image size, interpolation, crop_pct) of an architecture's pretrained config, for listings."""
    library = _import(source)
    if source == "torchvision":
        return _torchvision_eval(library, arch)
    cfg = library.models.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else dict(cfg or {})
    return int(cfg.get("input_size", (3, 224, 224))[-1]), cfg.get("interpolation") or "bicubic", \
        float(cfg.get("crop_pct") or 0.875)


def _unknown(source: str, arch: str) -> ModelNotFoundError:
    known = list_foreign(source)
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = (f"did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close
            else f"run `slimtune models --source {source}` to list them")
    return ModelNotFoundError(f"unknown {source} model {arch!r}; {hint}")


@functools.lru_cache(maxsize=None)
def foreign_spec(source: str, arch: str) -> Any:
    """The ModelSpec of a timm / torchvision architecture (its pretrained config as registry fields)."""
    from .registry import ModelSpec

    library = _import(source)
    if source == "timm":
        if not library.is_model(arch):
            raise _unknown(source, arch)
        cfg = library.models.get_pretrained_cfg(arch)
        cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else dict(cfg or {})
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        classifier = cfg.get("classifier") or "classifier"
        heads = tuple(classifier) if isinstance(classifier, (tuple, list)) else (classifier,)
        preprocessing = format_name(cfg.get("interpolation") or "bicubic", cfg.get("crop_pct") or 0.875,
                                    cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD)
        spec_args = dict(default_image_size=size, checkpoint_num_classes=int(cfg.get("num_classes") or 1000),
                         in_channels=int(cfg.get("input_size", (3,))[0]), first_conv=cfg.get("first_conv") or "",
                         classifier_scopes=heads, layer_depths=timm_layer_depths)
    else:
        if arch not in list_foreign(source):
            raise _unknown(source, arch)
        size, interpolation, crop_pct = _torchvision_eval(library, arch)
        heads = (_torchvision_classifier(library, arch),)
        preprocessing = format_name(interpolation, crop_pct, IMAGENET_MEAN, IMAGENET_STD)
        spec_args = dict(default_image_size=size, checkpoint_num_classes=1000, in_channels=3, first_conv="",
                         classifier_scopes=heads, layer_depths=module_order_depths)
    name = f"{source}:{arch}"
    return ModelSpec(name=name, builder=functools.partial(build_foreign, source, arch),
                     preprocessing=preprocessing, scope="", description=f"{source} {arch} (weights from "
                     "--checkpoint_path)", **spec_args)


def _torchvision_eval(library: Any, arch: str) -> tuple[int, str, float]:
    """Size, interpolation and crop of the default weights' eval transform (read, never downloaded)."""
    try:
        weights = library.models.get_model_weights(arch).DEFAULT
        transform = weights.transforms()
        size = transform.crop_size[0]
        interpolation = transform.interpolation.value
        return int(size), interpolation, size / transform.resize_size[0]
    except (ValueError, AttributeError, IndexError, TypeError):
        return 224, "bilinear", 224 / 256  # torchvision's ImageClassification defaults


def _torchvision_classifier(library: Any, arch: str) -> str:
    """Name of the last Linear of a torchvision model (built on the meta device where it can be: no memory, no time)."""
    try:
        with torch.device("meta"):
            model = library.models.get_model(arch, weights=None)
    except (NotImplementedError, RuntimeError):  # RegNet computes its widths from tensor values
        model = library.models.get_model(arch, weights=None)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def build_foreign(source: str, arch: str, num_classes: int, image_size: Optional[int] = None,
                  **options: Any) -> "ForeignNet":
    """Build `arch` from `source` with fresh weights (never downloaded) and wrap it for slimtune."""
    del image_size  # the nets pool globally: parameter shapes do not follow the input size
    num_classes = check_num_classes(num_classes)
    library = _import(source)
    try:
        if source == "timm":
            model = library.create_model(arch, pretrained=False, num_classes=num_classes, **options)
        else:
            model = library.models.get_model(arch, weights=None, num_classes=num_classes or 1000, **options)
    except TypeError as error:
        raise ConfigError(f"{source}:{arch}: {error}") from None
    return ForeignNet(model, source, arch, num_classes)


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList))


class ForeignNet(SlimNet):
    """A timm / torchvision model under slimtune's contract, keeping the library's parameter names."""

    scope = ""

    def __init__(self, net: nn.Module, source: str, arch: str, num_classes: int) -> None:
        super().__init__(num_classes)
        object.__setattr__(self, "net", net)  # not a child: its children are ours, under their own names
        self.source, self.arch = source, arch
        if source == "timm":
            classifier = net.pretrained_cfg.get("classifier") or "classifier"
            self._heads = tuple(classifier) if isinstance(classifier, (tuple, list)) else (classifier,)
            # the pooled width that feeds the classifier (MobileNetV3 has a conv after pooling)
            self.num_features = int(getattr(net, "head_hidden_size", None) or net.num_features)
        else:
            layout = _TORCHVISION_LAYOUTS.get(type(net).__name__)
            if layout is None:
                raise ConfigError(f"torchvision:{arch} ({type(net).__name__}) does not split into body and head; "
                                  f"supported families: {', '.join(_TORCHVISION_LAYOUTS)}")
            self._layout = layout
            linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            self._heads = (linears[-1],)
            self.num_features = int(net.get_submodule(linears[-1]).in_features)
            if num_classes == 0:
                self._set_head(nn.Identity())
        self._adopt()
        self._set_head_names()

    # Shared modules with the library model -------------------------------------------------
    def _adopt(self) -> None:
        """Make the library model's children, root parameters and buffers ours (same objects)."""
        self._modules.clear()
        for name, child in self.net.named_children():
            self.add_module(name, child)
        for name, parameter in self.net._parameters.items():
            self._parameters[name] = parameter
        for name, buffer in self.net._buffers.items():
            self._buffers[name] = buffer

    def _apply(self, fn: Callable, recurse: bool = True) -> "ForeignNet":
        super()._apply(fn, recurse)
        # .to() / .half() replace root tensors (ViT's pos_embed, cls_token): hand them back to the library model
        for name in self.net._parameters:
            self.net._parameters[name] = self._parameters[name]
        for name in self.net._buffers:
            self.net._buffers[name] = self._buffers[name]
        return self

    def train(self, mode: bool = True) -> "ForeignNet":
        super().train(mode)
        self.net.training = mode
        return self

    def _set_head_names(self) -> None:
        heads = self._heads if self.num_classes else ()
        self.classifier_scope = heads[0] if heads else ""
        self.classifier_scopes = tuple(heads)

    def _set_head(self, module: nn.Module) -> None:
        parent_name, _, leaf = self._heads[0].rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        setattr(parent, leaf, module)

    # The contract's hooks ------------------------------------------------------------------
    def _end_point_modules(self) -> list[tuple[str, nn.Module]]:
        """Top-level children and the items of containers: the modules whose outputs are end points."""
        found: list[tuple[str, nn.Module]] = []
        for name, child in self.net.named_children():
            found.append((name, child))
            if _is_container(child):
                found += [(f"{name}.{item}", sub) for item, sub in child.named_children()]
        return found

    def _forward_features(self, x: Tensor, end_points: "OrderedDict[str, Tensor]") -> Tensor:
        if self.source == "timm":
            handles = []

            def record(name: str) -> Callable:
                def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                    if isinstance(output, Tensor):
                        end_points[name] = output
                return hook
            try:
                handles = [module.register_forward_hook(record(name)) for name, module in self._end_point_modules()]
                return self.net.forward_features(x)
            finally:
                for handle in handles:
                    handle.remove()
        pool, _, classifier = self._layout
        for name, child in self.net.named_children():
            if name in (pool, classifier) or isinstance(child, nn.Flatten):
                continue
            if _is_container(child):
                for item, sub in child.named_children():
                    x = sub(x)
                    end_points[f"{name}.{item}"] = x
            else:
                x = child(x)
            end_points[name] = x
        return x

    def _forward_head(self, features: Tensor, end_points: "OrderedDict[str, Tensor]",
                      pre_logits: bool = False) -> Tensor:
        if self.source == "timm":
            pooled = self.net.forward_head(features, pre_logits=True)
            end_points["global_pool"] = pooled
            if pre_logits or not self.num_classes:
                return pooled
            logits = self.net.forward_head(features)
        else:
            pool, flatten, classifier = self._layout
            x = self.net.get_submodule(pool)(features) if pool else nn.functional.adaptive_avg_pool2d(features, 1)
            if flatten:
                x = torch.flatten(x, 1)
            head = self.net.get_submodule(classifier)
            last = self.net.get_submodule(self._heads[0])
            # everything of the classifier block but its last Linear: the pre-logits features
            layers = list(head.children()) if _is_container(head) else [head]
            for layer in layers:
                if layer is last:
                    break
                x = layer(x)
            end_points["global_pool"] = x
            if pre_logits or not self.num_classes:
                return x
            logits = last(x)
        end_points["Logits"] = logits
        return logits

    def forward(self, x: Tensor, with_end_points: bool = False):
        """Logits (pooled features when headless), or (that, end points) with with_end_points=True.

        Without end points the library's own forward runs: no hooks, so it exports as the library's does.
        """
        if with_end_points or self.source != "timm":
            return super().forward(x, with_end_points)
        return self.net(x)

    def get_classifier(self) -> nn.Module:
        """The main classifier layer (nn.Identity() when headless)."""
        return self.net.get_submodule(self._heads[0]) if self.num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """A new head for `num_classes` (0: headless) where the library puts it, on the body's device."""
        num_classes = check_num_classes(num_classes)
        reference = next(self.parameters(), None)
        if self.source == "timm":
            self.net.reset_classifier(num_classes)
        else:
            head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
            if reference is not None:
                head.to(device=reference.device, dtype=reference.dtype)
            self._set_head(head)
        self.num_classes = num_classes
        self._adopt()
        self._set_head_names()
        if reference is not None:
            for scope in self.classifier_scopes:
                self.get_submodule(scope).to(device=reference.device, dtype=reference.dtype)


def timm_layer_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth from timm's own group_matcher (stem 0 ... classifier last), as timm's layer decay."""
    from timm.models import group_parameters

    net = getattr(model, "net", model)
    if not hasattr(net, "group_matcher"):
        return module_order_depths(model)
    return dict(group_parameters(net, net.group_matcher(coarse=False), reverse=True))


def module_order_depths(model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth by module order: the stem's children 0, then each container item (block) one
    deeper, the classifier heads deepest."""
    net = getattr(model, "net", model)
    heads = tuple(getattr(model, "classifier_scopes", ()) or ())
    depths: dict[str, int] = {}
    depth, seen_block = 0, False
    for name, child in net.named_children():
        units = [(f"{name}.{i}", sub) for i, sub in child.named_children()] if _is_container(child) else [(name, child)]
        for unit_name, unit in units:
            if _is_container(child) or seen_block:
                depth += 1
                seen_block = True
            for param_name, _ in unit.named_parameters():
                depths[f"{unit_name}.{param_name}"] = depth
    top = max(depths.values(), default=0) + 1
    for name in depths:
        if any(name == h or name.startswith(h + ".") for h in heads):
            depths[name] = top
    for name, _ in net.named_parameters(recurse=False):
        depths[name] = 0
    return depths
