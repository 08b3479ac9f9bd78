"""One decorator registers a network with everything the factory needs.

slim kept three maps (networks_map, arg_scopes_map, preprocessing_fn_map) that drifted apart;
here a network is one function and one `@register_model(...)` line carrying its default image
size, preprocessing, the class count of its published checkpoint and its variable scope.

A user's own network needs no edit of the package: ``path/to/my_net.py:kk_v2`` or
``my_pkg.nets:kk_v2`` imports the file or module and uses the function named after the colon.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from ..errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelSpec:
    """Everything the factory knows about one registered network."""

    name: str
    builder: Callable[..., nn.Module]
    default_image_size: int
    preprocessing: str
    checkpoint_num_classes: int
    scope: str
    in_channels: int = 3
    published_checkpoint: Optional[str] = None
    description: str = ""
    #: True when parameter shapes depend on the input size (slim's lenet/cifarnet flatten).
    sized_by_input: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    #: scopes holding the classifier heads, main first ('InceptionV3/Logits', 'InceptionV3/AuxLogits'):
    #: what `--checkpoint_exclude_scopes heads` excludes when fine-tuning to new classes.
    classifier_scopes: tuple[str, ...] = ()
    #: scope of the first convolution (what `in_chans` adapts), e.g. 'InceptionV3/Conv2d_1a_3x3'.
    first_conv: str = ""
    #: the published checkpoint's ImageNet top-1 / top-5 accuracy (%) from slim's model-zoo table.
    published_top1: Optional[float] = None
    published_top5: Optional[float] = None
    #: the smallest square input the net accepts (smaller inputs get one line naming this size).
    min_image_size: int = 1
    #: parameter name -> depth (0 = stem ... max = classifier heads), for --layer_decay; None: the generic rule of nets/depth.py
    layer_depths: Optional[Callable[[nn.Module], dict[str, int]]] = None

    def build(self, num_classes: int, image_size: Optional[int] = None, **kwargs: Any) -> nn.Module:
        """Build the network, then attach this spec to it as `model.spec`.

        image_size only reaches builders whose parameter shapes depend on it (`sized_by_input`).
        """
        options = {**self.defaults, **{k: v for k, v in kwargs.items() if v is not None}}
        if image_size is not None and self.sized_by_input:
            options["image_size"] = image_size
        model = self.builder(num_classes=num_classes, **options)
        model.spec = self
        return model


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False


def register_model(name: Optional[str] = None, *, default_image_size: int, preprocessing: str,
                   checkpoint_num_classes: int, scope: str, in_channels: int = 3,
                   published_checkpoint: Optional[str] = None, description: str = "",
                   sized_by_input: bool = False, classifier_scopes: tuple[str, ...] = (), first_conv: str = "",
                   published_top1: Optional[float] = None, published_top5: Optional[float] = None,
                   min_image_size: int = 1, **defaults: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a network builder `fn(num_classes, **kwargs) -> nn.Module` under `name`.

    Extra keyword arguments become the builder's default options (e.g. depth_multiplier=0.5
    for mobilenet_v1_050), so one builder can register several slim names.
    """
    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        spec = ModelSpec(name=key, builder=builder, default_image_size=default_image_size,
                         preprocessing=preprocessing, checkpoint_num_classes=checkpoint_num_classes,
                         scope=scope, in_channels=in_channels, published_checkpoint=published_checkpoint,
                         description=description or (inspect.getdoc(builder) or "").split("\n")[0],
                         sized_by_input=sized_by_input, defaults=dict(defaults),
                         classifier_scopes=tuple(classifier_scopes), first_conv=first_conv,
                         published_top1=published_top1, published_top5=published_top5,
                         min_image_size=min_image_size)
        _REGISTRY[key] = spec
        specs = getattr(builder, "slimtune_specs", [])
        builder.slimtune_specs = specs + [spec]  # type: ignore[attr-defined]
        return builder
    return decorate


def _load_builtins() -> None:
    """Import slimtune's own network files so that their decorators run."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("slimtune.nets.zoo")


def _import_user_target(target: str) -> ModelSpec:
    """Resolve 'file.py:fn' or 'package.module:fn' to a ModelSpec."""
    location, _, function_name = target.rpartition(":")
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"--model_name {target}: no file {path}")
        module_name = f"slimtune_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            if module_spec is None or module_spec.loader is None:
                raise ModelNotFoundError(f"--model_name {target}: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ModelNotFoundError(f"--model_name {target}: cannot import module {location} ({error})") from error
    builder = getattr(module, function_name, None)
    if builder is None or not callable(builder):
        raise ModelNotFoundError(f"--model_name {target}: {location} has no function {function_name!r}")
    specs = [s for s in getattr(builder, "slimtune_specs", []) if s.name == function_name]
    specs = specs or getattr(builder, "slimtune_specs", [])
    if specs:
        return specs[-1]
    # An undecorated builder still works; its metadata can be given as function attributes.
    # Its preprocessing is never guessed: without one, --preprocessing_name is required.
    return ModelSpec(name=function_name, builder=builder,
                     default_image_size=getattr(builder, "default_image_size", 224),
                     preprocessing=getattr(builder, "preprocessing", ""),
                     checkpoint_num_classes=getattr(builder, "checkpoint_num_classes", 1000),
                     scope=getattr(builder, "scope", function_name),
                     # A builder with an image_size parameter gets the training/eval size, as
                     # registered nets whose parameter shapes follow the input (Inception's aux head).
                     sized_by_input=getattr(builder, "sized_by_input", _takes_image_size(builder)))


def _takes_image_size(builder: Callable[..., nn.Module]) -> bool:
    try:
        return "image_size" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def get_model_spec(name: str) -> ModelSpec:
    """Look a network up by registered name, 'file.py:fn' or 'module:fn'."""
    if ":" in name and not (len(name) > 1 and name[1] == ":" and name[2:3] in ("\\", "/")):
        return _import_user_target(name)
    _load_builtins()
    spec = _REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `slimtune models` to list them"
        raise ModelNotFoundError(f"unknown model {name!r}{hint}")
    return spec


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Registered network names, sorted, optionally filtered by a glob pattern."""
    _load_builtins()
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def create_model(name: str, pretrained: bool = False, num_classes: Optional[int] = None,
                 checkpoint_path: Optional[str] = None, in_chans: Optional[int] = None,
                 features_only: bool = False, out_indices: Optional[Any] = None, **kwargs: Any) -> nn.Module:
    """Build a registered network, timm-style (the front door lives in `slimtune.nets.factory`).

    num_classes defaults to the class count of the net's published checkpoint (1000 or 1001);
    0 gives a headless backbone returning pooled features. See `factory.create_model`.
    """
    from .factory import create_model as front_door
    return front_door(name, pretrained=pretrained, num_classes=num_classes, checkpoint_path=checkpoint_path,
                      in_chans=in_chans, features_only=features_only, out_indices=out_indices, **kwargs)
