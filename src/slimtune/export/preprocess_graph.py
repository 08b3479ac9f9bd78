"""`--with_preprocessing`: the net's eval preprocessing inside the exported graph.

The exported model takes uint8 images NHWC of any height and width (the images of one batch
share a size; channels = the net's input channels) and runs what slimtune's eager eval
preprocessing runs, written with tensor operations only so that every size-dependent number
(crop box, resized size, bilinear taps) is computed in the graph from the input's shape:

- inception: central crop (tf.image.central_crop's float64 box rule), TF1 bilinear resize
  (half_pixel_centers=False, x first then y, on pixels scaled by 1/255), then (x - 0.5) * 2;
- vgg: aspect-preserving resize of the smaller side to 256 (float32, round half to even),
  central crop of the resized image, TF1 bilinear taps, minus slim's RGB means;
- lenet: crop-or-pad to the input size, (x - 128) / 128;
- cifarnet: crop-or-pad, then per-image standardization over all values.

It is checked, image by image at each image's own size, against slimtune's eager preprocessing
followed by the eager net.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..preprocessing.factory import resolve_preprocessing_name
from . import formats
from .prepare import ExportSource
from .verify import VerificationImages, check_close, compare

_INCEPTION_FRACTION = 0.875
_VGG_SIDE = 256
_VGG_MEANS = (123.68, 116.78, 103.94)


def _size(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """The size of dimension `dim` of x as a 0-d tensor, computed from the data so every exporter
    keeps it dynamic (a Python int would be frozen into the graph by tracing)."""
    index = [0] * x.dim()
    index[dim] = slice(None)
    return torch.ones_like(x[tuple(index)], dtype=dtype).sum()


def _taps(in_size: Tensor, out_size: Tensor, start: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """TF1 legacy bilinear taps (float32): src = d * (in / out); lower, min(lower + 1, in - 1), lerp."""
    scale = in_size.float() / out_size.float()
    source = (torch.arange(count, dtype=torch.float32) + start.float()) * scale
    floor = torch.floor(source)
    lower = floor.long()
    upper = torch.minimum(lower + 1, in_size.long() - 1)
    return lower, upper, source - floor


def _resize_window(x: Tensor, rows: tuple[Tensor, Tensor, Tensor], cols: tuple[Tensor, Tensor, Tensor],
                   value_scale: float | None) -> Tensor:
    """Bilinear on float32 NHWC pixels: columns first, then rows (TF's order); -> [N, C, h, w]."""
    values = x.float()
    if value_scale is not None:
        values = values * float(np.float32(value_scale))
    col_lo, col_hi, col_lerp = cols
    left, right = values.index_select(2, col_lo), values.index_select(2, col_hi)
    across = (right - left) * col_lerp.view(1, 1, -1, 1) + left
    row_lo, row_hi, row_lerp = rows
    top, bottom = across.index_select(1, row_lo), across.index_select(1, row_hi)
    return ((bottom - top) * row_lerp.view(1, -1, 1, 1) + top).permute(0, 3, 1, 2)


def _crop_or_pad(x: Tensor, size: int) -> Tensor:
    """tf.image.resize_image_with_crop_or_pad to size x size on NHWC -> float32 NCHW (zeros where padded)."""
    out = []
    for dim in (1, 2):
        # Output pixel i reads source pixel i + crop - pad; outside the image it is padding (0).
        n = _size(x, dim, torch.int64)
        crop = torch.clamp(torch.div(n - size, 2, rounding_mode="floor"), min=0)
        pad = torch.clamp(torch.div(size - n, 2, rounding_mode="floor"), min=0)
        source = torch.arange(size, dtype=torch.int64) + crop - pad
        valid = (source >= 0) & (source < n)
        out.append((torch.minimum(torch.clamp(source, min=0), n - 1), valid))
    (rows, row_ok), (cols, col_ok) = out
    values = x.float().index_select(1, rows).index_select(2, cols)
    mask = (row_ok.view(1, -1, 1, 1) & col_ok.view(1, 1, -1, 1)).float()
    return (values * mask).permute(0, 3, 1, 2)


class InGraphPreprocessing(nn.Module):
    """uint8 NHWC (any size) -> the net's preprocessed float32 NCHW at `image_size`."""

    def __init__(self, family: str, image_size: int, channels: int) -> None:
        super().__init__()
        if family not in ("inception", "vgg", "lenet", "cifarnet"):
            raise ConfigError(f"--with_preprocessing: no in-graph version of {family!r} preprocessing")
        self.family, self.image_size, self.channels = family, image_size, channels
        self.register_buffer("means", torch.tensor(_VGG_MEANS, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Preprocess a batch of same-sized uint8 NHWC images."""
        size = self.image_size
        if self.family in ("lenet", "cifarnet"):
            values = _crop_or_pad(x, size)
            if self.family == "lenet":
                return (values - 128.0) / 128.0
            count = float(values[0].numel())
            mean = values.mean(dim=(1, 2, 3), keepdim=True)
            std = ((values - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            return (values - mean) / torch.clamp(std, min=1.0 / float(np.sqrt(count)))
        target = torch.tensor(size, dtype=torch.int64)
        if self.family == "inception":
            taps = []
            for dim in (1, 2):
                n = _size(x, dim, torch.float64)
                start = torch.floor((n - n * _INCEPTION_FRACTION) / 2)
                kept = (n - 2 * start).long()
                lower, upper, lerp = _taps(kept, target, torch.zeros((), dtype=torch.int64), size)
                taps.append((lower + start.long(), upper + start.long(), lerp))
            pixels = _resize_window(x, taps[0], taps[1], value_scale=1.0 / 255.0)
            return (pixels - 0.5) * 2.0
        # vgg: smaller side -> 256 in float32 with round-half-even, then a central window of the resize.
        h, w = _size(x, 1, torch.float32), _size(x, 2, torch.float32)
        side = torch.tensor(float(_VGG_SIDE), dtype=torch.float32)
        scale = torch.where(h > w, side / w, side / h)
        taps = []
        for n in (h, w):
            resized = torch.round(n * scale).long()
            start = torch.div(resized - size, 2, rounding_mode="floor")
            taps.append(_taps(n.long(), resized, start, size))
        return _resize_window(x, taps[0], taps[1], value_scale=None) - self.means


class PreprocessedModel(nn.Module):
    """uint8 NHWC images -> (logits, probabilities): in-graph preprocessing, then the inference net."""

    def __init__(self, preprocess: InGraphPreprocessing, infer: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.infer = infer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Preprocess, then run the net."""
        return self.infer(self.preprocess(x))


def export_with_preprocessing(source: ExportSource, infer: nn.Module, images: VerificationImages,
                              eager: np.ndarray, fmt: str, out: Path, opset: int = formats.DEFAULT_OPSET,
                              quiet: bool = False):
    """Write `fmt` with preprocessing inside and check it on every image at its own size."""
    from .run import ExportResult, _temporary

    family = resolve_preprocessing_name(source.preprocessing)
    if family == "vgg" and source.image_size > _VGG_SIDE:
        raise ConfigError(f"vgg preprocessing crops {source.image_size} from a {_VGG_SIDE} side: "
                          f"use an image size <= {_VGG_SIDE}")
    model = PreprocessedModel(InGraphPreprocessing(family, source.image_size, source.in_channels), infer).eval()
    metadata = source.metadata()
    metadata.update({"with_preprocessing": "true", "input_layout": json.dumps(
        f"NHWC uint8, any height/width (one size per batch), {source.in_channels} channels")})
    example = torch.from_numpy(np.stack([images.arrays[0]] * 2))
    temporary = _temporary(out, fmt)
    try:
        if fmt == "onnx":
            formats.write_onnx(model, example, temporary, metadata, opset=opset, dynamic_spatial=True)
            runner, runtime = formats.load_onnx(temporary), "onnxruntime"
        elif fmt == "torchscript":
            formats.write_torchscript(model, example, temporary, metadata)
            runner, runtime = formats.load_torchscript(temporary), "torch.jit.load"
        else:
            formats.write_exported_program(model, example, temporary, metadata, dynamic_spatial=True)
            runner, runtime = formats.load_exported_program(temporary), "torch.export.load"
        # Each image at its own size against slimtune's eager preprocessing + eager net, then one
        # batch of two copies (the dynamic batch axis).
        got = np.concatenate([runner(np.ascontiguousarray(a[None])) for a in images.arrays])
        comparison = compare(eager, got)
        lines = [check_close(comparison, runtime + " with in-graph preprocessing, each image at its own size "
                             f"({', '.join('x'.join(map(str, a.shape[:2])) for a in images.arrays)})")]
        pair = runner(np.ascontiguousarray(np.stack([images.arrays[1]] * 2)))
        lines.append(check_close(compare(np.stack([eager[1]] * 2), pair), runtime + " (batch of 2)"))
        for line in lines:
            if not quiet:
                print(line, file=sys.stderr)
        os.replace(temporary, out)
        if not quiet:
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; input: uint8 NHWC images of any size)",
                  file=sys.stderr)
        return ExportResult(out, fmt, comparison, lines)
    finally:
        temporary.unlink(missing_ok=True)
