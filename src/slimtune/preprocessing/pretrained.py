"""Preprocessing driven by a pretrained config (timm / torchvision weights): mean, std, crop, interpolation.

A foreign backbone (``timm:resnet50``, ``torchvision:resnet50``) was trained on inputs made by its
own library's transforms, not slim's; feeding it vgg or inception preprocessing costs accuracy. The
registry names its preprocessing as one self-describing string, recorded in every checkpoint so that
eval, predict and export rebuild the same inputs without the library:

    pretrained:interpolation=bicubic,crop_pct=0.95,mean=0.485/0.456/0.406,std=0.229/0.224/0.225

Eval is timm's ``transforms_imagenet_eval`` (crop_mode 'center'): resize the shorter side to
floor(size / crop_pct) with the interpolation (antialiased, as PIL does), centre crop, scale to
[0, 1], normalize. Train is timm's default: RandomResizedCrop (scale 0.08..1, ratio 3/4..4/3),
a random mirror, normalize.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import ops

#: The preprocessing name's prefix; the options follow it.
PREFIX = "pretrained:"
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_KEYS = ("interpolation", "crop_pct", "mean", "std")


def format_name(interpolation: str, crop_pct: float, mean: Sequence[float], std: Sequence[float]) -> str:
    """The preprocessing name for a pretrained config (what the registry records for a foreign net)."""
    def floats(values: Sequence[float]) -> str:
        return "/".join(f"{float(v):.6g}" for v in values)
    return (f"{PREFIX}interpolation={interpolation},crop_pct={float(crop_pct):.6g},mean={floats(mean)},"
            f"std={floats(std)}")


def parse_name(name: str) -> dict[str, Any]:
    """'pretrained:interpolation=...,crop_pct=...,mean=a/b/c,std=a/b/c' -> the options of `preprocess_image`."""
    body = name[len(PREFIX):] if name.startswith(PREFIX) else name
    options: dict[str, Any] = {}
    usage = f"{PREFIX}interpolation=bicubic,crop_pct=0.875,mean=0.485/0.456/0.406,std=0.229/0.224/0.225"
    for piece in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = piece.partition("=")
        if not sep or key not in _KEYS:
            raise ConfigError(f"preprocessing {name!r}: unknown option {piece!r}; options are {', '.join(_KEYS)} "
                              f"(e.g. {usage})")
        try:
            if key == "interpolation":
                if value not in INTERPOLATIONS:
                    raise ValueError(f"one of {', '.join(INTERPOLATIONS)}")
                options[key] = value
            elif key == "crop_pct":
                options[key] = float(value)
                if not 0 < options[key] <= 1:
                    raise ValueError("in (0, 1]")
            else:
                options[key] = tuple(float(v) for v in value.split("/"))
        except ValueError as error:
            raise ConfigError(f"preprocessing {name!r}: bad {key} {value!r} ({error})") from None
    missing = [k for k in _KEYS if k not in options]
    if missing:
        raise ConfigError(f"preprocessing {name!r} lacks {', '.join(missing)} (e.g. {usage})")
    if len(options["mean"]) != len(options["std"]) or any(s <= 0 for s in options["std"]):
        raise ConfigError(f"preprocessing {name!r}: mean and std need one value per channel, std > 0")
    return options


def _resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of a float CHW image in 0..255, rounded back to 0..255 like a PIL image."""
    batch = image[None]
    if interpolation == "nearest":
        out = F.interpolate(batch, size=size, mode="nearest")
    else:
        out = F.interpolate(batch, size=size, mode=interpolation, align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255)


def _normalize(values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    channels = values.shape[0]
    if len(mean) not in (1, channels):
        raise ConfigError(f"the pretrained config has {len(mean)} mean values for a {channels}-channel image")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return values.div_(255.0).sub_(mean_t).div_(std_t)


def eval_crop(image: torch.Tensor, height: int, width: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval geometry: shorter side to floor(size / crop_pct) (torchvision's Resize rule), centre crop."""
    scale = math.floor(min(height, width) / crop_pct) if height == width else None
    in_h, in_w = image.shape[-2:]
    if scale is not None:
        # torchvision.transforms.Resize(int): the short side becomes `scale`, the long one int(scale * long / short)
        if in_h <= in_w:
            new_h, new_w = scale, int(scale * in_w / in_h)
        else:
            new_h, new_w = int(scale * in_h / in_w), scale
    else:  # a non-square target: timm's ResizeKeepRatio on the shortest edge
        ratio = min(in_h / math.floor(height / crop_pct), in_w / math.floor(width / crop_pct))
        new_h, new_w = round(in_h / ratio), round(in_w / ratio)
    resized = _resize(image.to(torch.float32), (new_h, new_w), interpolation)
    if new_h < height or new_w < width:
        resized = _resize(resized, (max(new_h, height), max(new_w, width)), interpolation)
        new_h, new_w = resized.shape[-2:]
    # torchvision's CenterCrop rounds the offsets
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    return resized[:, top:top + height, left:left + width]


def random_resized_box(image_height: int, image_width: int, generator: Optional[torch.Generator] = None,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width), ten tries then a centre crop."""
    area = image_height * image_width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area_draw, ratio_draw, top_draw, left_draw = ops.random_draws(4, generator)
        target_area = area * ops.uniform_between(area_draw, *scale)
        aspect = math.exp(ops.uniform_between(ratio_draw, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= image_width and 0 < h <= image_height:
            return ops.int_below(top_draw, image_height - h + 1), ops.int_below(left_draw, image_width - w + 1), h, w
    in_ratio = image_width / image_height
    if in_ratio < min(ratio):
        w, h = image_width, int(round(image_width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = image_height, int(round(image_height * max(ratio)))
    else:
        w, h = image_width, image_height
    return (image_height - h) // 2, (image_width - w) // 2, h, w


def preprocess_image(image: torch.Tensor, height: int, width: int, is_training: bool = False,
                     use_grayscale: bool = False, interpolation: str = "bilinear", crop_pct: float = 0.875,
                     mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uint8 CHW image -> float32 (C, height, width) the way the weights' own library feeds them."""
    ops.check_image(image)
    if is_training:
        top, left, h, w = random_resized_box(image.shape[-2], image.shape[-1], generator)
        values = _resize(image[:, top:top + h, left:left + w].to(torch.float32), (height, width), interpolation)
        if ops.random_draws(1, generator)[0] < 0.5:
            values = values.flip(-1)
    else:
        values = eval_crop(image, height, width, crop_pct, interpolation)
    values = values.contiguous()
    if use_grayscale and values.shape[0] == 3:
        values = ops.rgb_to_grayscale(values).expand(3, -1, -1).contiguous()
    return _normalize(values, mean, std)
