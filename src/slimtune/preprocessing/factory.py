"""get_preprocessing: slim's preprocessing_factory for uint8 CHW torch tensors.

Names are the four preprocessing families ('vgg', 'inception', 'cifarnet', 'lenet') plus slim's
model names, mapped exactly as slim's preprocessing_fn_map maps them. Which preprocessing a
network *should* use is the model registry's business; note that slim maps every resnet_v2 name
to vgg preprocessing although the published ResNet-v2 checkpoints expect inception at 299.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, NamedTuple, Optional

import torch

from ..errors import ConfigError
from . import cifarnet, inception, lenet, pretrained, vgg

PREPROCESSING_MODULES: dict[str, ModuleType] = {
    "cifarnet": cifarnet,
    "inception": inception,
    "lenet": lenet,
    # timm / torchvision weights: 'pretrained:interpolation=...,crop_pct=...,mean=...,std=...'
    "pretrained": pretrained,
    "vgg": vgg,
}

# slim's preprocessing_fn_map (final upstream version): model name -> preprocessing family.
SLIM_MODEL_PREPROCESSING: dict[str, str] = {
    **{name: "inception" for name in (
        "inception_v1", "inception_v2", "inception_v3", "inception_v4", "inception_resnet_v2",
        "mobilenet_v1", "mobilenet_v2", "mobilenet_v2_035", "mobilenet_v2_140",
        "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v3_small_minimalistic",
        "mobilenet_v3_large_minimalistic", "mobilenet_edgetpu", "mobilenet_edgetpu_075",
        "nasnet_mobile", "nasnet_large", "pnasnet_mobile", "pnasnet_large")},
    **{name: "vgg" for name in (
        "vgg_a", "vgg_16", "vgg_19",
        "resnet_v1_50", "resnet_v1_101", "resnet_v1_152", "resnet_v1_200",
        "resnet_v2_50", "resnet_v2_101", "resnet_v2_152", "resnet_v2_200")},
}

Preprocessor = Callable[..., torch.Tensor]


class TrainPlan(NamedTuple):
    """One image's training randomness, drawn from its size before decoding (PreprocessingFn.plan)."""

    params: Any                      # the family's train parameters (VggTrainParams, InceptionTrainParams)
    image_size: tuple[int, int]      # (height, width) of the full image the draws were made for
    decode_size: tuple[int, int]     # the smallest (height, width) a reduced-size decode may have


@dataclass(frozen=True)
class PreprocessingFn:
    """A picklable ``fn(image, height, width, **kwargs)`` bound to a family and a mode."""

    name: str
    is_training: bool
    use_grayscale: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def __call__(self, image: torch.Tensor, height: int, width: int,
                 generator: Optional[torch.Generator] = None, **kwargs: Any) -> torch.Tensor:
        """Preprocess one uint8 CHW image to a float32 CHW tensor of the requested size.

        Training draws come from `generator` (named in the signature so loaders can tell that
        they may pass one), else from torch's global RNG.
        """
        return PREPROCESSING_MODULES[self.name].preprocess_image(
            image, height, width, is_training=self.is_training, use_grayscale=self.use_grayscale,
            **self._options(generator, kwargs))

    def _options(self, generator: Optional[torch.Generator], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Defaults, then call options, then the call's generator (when given) on top."""
        options = {**self.defaults, **kwargs}
        if generator is not None:
            options["generator"] = generator
        return options

    def plan(self, image_height: int, image_width: int, height: int, width: int,
             generator: Optional[torch.Generator] = None, **kwargs: Any) -> Optional[TrainPlan]:
        """Draw a training call's randomness from the image size alone; None where it needs pixels.

        vgg and inception training draw only geometry and colour factors, so a loader can call
        this on a JPEG header, decode at any size >= ``plan.decode_size`` and finish with
        ``apply_plan``: for the same generator state that equals ``fn(image, height, width,
        **kwargs)`` on the full image (exactly, when the decode is full size).
        """
        module = PREPROCESSING_MODULES[self.name]
        if not self.is_training or not hasattr(module, "plan_train"):
            return None
        params, decode_size = module.plan_train(image_height, image_width, height, width,
                                                **self._options(generator, kwargs))
        return TrainPlan(params, (image_height, image_width), decode_size)

    def apply_plan(self, image: torch.Tensor, height: int, width: int, plan: TrainPlan) -> torch.Tensor:
        """Finish a planned call on the decoded image (full size or a reduced decode of it)."""
        module = PREPROCESSING_MODULES[self.name]
        return module.apply_train(image, height, width, plan.params, use_grayscale=self.use_grayscale,
                                  source_size=plan.image_size)


def list_preprocessing() -> list[str]:
    """The preprocessing family names: ['cifarnet', 'inception', 'lenet', 'vgg']."""
    return sorted(PREPROCESSING_MODULES)


def resolve_preprocessing_name(name: str) -> str:
    """Map a family or slim model name to its family; ConfigError naming the valid ones otherwise."""
    if not name:  # a module:fn / file.py:fn network that says nothing about its input
        raise ConfigError(f"no preprocessing was chosen: this network does not name one (a module:fn or "
                          f"file.py:fn without a `preprocessing` attribute); pass --preprocessing_name, one of "
                          f"{', '.join(list_preprocessing())}")
    if name in PREPROCESSING_MODULES:
        return name
    if str(name).startswith(pretrained.PREFIX):
        pretrained.parse_name(name)  # a malformed config is one line here, not an error per image
        return "pretrained"
    if name in SLIM_MODEL_PREPROCESSING:
        return SLIM_MODEL_PREPROCESSING[name]
    known = sorted(PREPROCESSING_MODULES) + sorted(SLIM_MODEL_PREPROCESSING)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown preprocessing '{name}'{hint}: use one of {', '.join(list_preprocessing())} "
                      "or a slim model name such as inception_v3 or resnet_v1_50 "
                      "(set --preprocessing_name for models slim never mapped, e.g. alexnet_v2)")


def get_preprocessing(name: str, is_training: bool, use_grayscale: bool = False,
                      **defaults: Any) -> PreprocessingFn:
    """slim's get_preprocessing: ``fn(image_uint8_chw, height, width, **kwargs) -> float32 CHW``.

    Keyword arguments given here (e.g. ``fast_mode=False``) become defaults of every call; the
    call itself may add or override them (inception: bbox, fast_mode; vgg: resize_side_min,
    resize_side_max; all: generator).
    """
    family = resolve_preprocessing_name(name)
    if family == "pretrained" and str(name).startswith(pretrained.PREFIX):
        defaults = {**pretrained.parse_name(name), **defaults}
    return PreprocessingFn(family, bool(is_training), bool(use_grayscale), dict(defaults))
