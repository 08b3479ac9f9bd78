"""`slimtune export`: write a trained net in a deployment format and prove the file computes the same logits.

Every format is written to a temporary name beside the output, loaded in its own runtime, run on
the same real images as the eager model, and moved into place only when its logits are within
1e-4 of the largest logit (see verify.py). A failed check leaves nothing at the output path.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import formats
from .prepare import ExportSource, inference_copy, load_source
from .quantize import WEIGHT_ROUNDINGS
from .verify import (Comparison, VerificationError, check_close, compare, load_verification_images,
                     preprocess_batch)

FORMATS = ("onnx", "torchscript", "exported-program", "safetensors", "tf-checkpoint", "tflite")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2", "safetensors": ".safetensors",
            "tf-checkpoint": "", "tflite": ".tflite"}


@dataclass
class ExportResult:
    """What was written and how it compared with the eager model."""

    path: Path
    format: str
    comparison: Comparison
    lines: list[str] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)
    #: int8 quantization: sizes, top-1 agreement with fp32, images/s.
    report: dict = field(default_factory=dict)


def check_format(fmt: str) -> str:
    """The format name, or a one-line error listing the valid ones."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    return fmt


def _temporary(path: Path, fmt: str = "") -> Path:
    """A hidden name beside `path`; torch.export.load wants a .pt2 suffix, so the temporary has one."""
    suffix = ".pt2" if fmt == "exported-program" else path.suffix
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{suffix}")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def export(checkpoint_path: str, fmt: str, output: str, *, model_name: Optional[str] = None,
           num_classes: Optional[int] = None, image_size: Optional[int] = None,
           preprocessing_name: Optional[str] = None, labels_file: Optional[str] = None,
           multi_label: Optional[bool] = None, verify_images: Optional[Sequence[str]] = None,
           with_preprocessing: bool = False, opset: int = formats.DEFAULT_OPSET,
           quantize: Optional[str] = None, calibration_dataset_dir: Optional[str] = None,
           calibration_images: int = 256, min_agreement: float = 0.99, quiet: bool = False,
           moving_average: bool = True, weight_rounding: str = "gptq") -> ExportResult:
    """Export the trained net at `checkpoint_path` as `fmt` to `output`, verified (see module docstring).

    A run's moving-average weights are exported when it saved some, unless `moving_average` is False.
    `weight_rounding` chooses how int8 ONNX weights are rounded ("gptq" or "nearest", quantize.py).
    """
    check_format(fmt)
    if with_preprocessing and fmt not in ("onnx", "torchscript", "exported-program"):
        raise ConfigError(f"--with_preprocessing is available for onnx, torchscript and exported-program, not {fmt}")
    if quantize is not None and (quantize != "int8" or fmt not in ("onnx", "tflite")):
        raise ConfigError(f"--quantize {quantize}: only --quantize int8 with --format onnx or tflite")
    if quantize and not calibration_dataset_dir:
        raise ConfigError("--quantize int8 needs --calibration_dataset_dir (images like those the model will see)")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise ConfigError(f"--weight_rounding {weight_rounding}: choose one of {', '.join(WEIGHT_ROUNDINGS)}")
    if fmt == "tflite":
        formats.require("litert_torch", "tflite", "--format tflite")
    source = load_source(checkpoint_path, model_name=model_name, num_classes=num_classes, image_size=image_size,
                         preprocessing_name=preprocessing_name, labels_file=labels_file, multi_label=multi_label,
                         moving_average=moving_average)
    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory: give a file name, e.g. {out / ('model' + SUFFIXES[fmt])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = load_verification_images(verify_images, source.in_channels)
    batch = preprocess_batch(images, source.preprocessing, source.image_size)
    with torch.no_grad():
        eager = source.model(batch).float().numpy()
    _say(f"exporting {source.model_name} ({source.num_classes} classes, {source.image_size}x{source.image_size}, "
         f"{source.preprocessing} preprocessing) as {fmt}; checking on {images.source}", quiet)
    if fmt == "tf-checkpoint":
        from .tf_checkpoint import export_tf_checkpoint

        return export_tf_checkpoint(source, batch, eager, out, quiet=quiet)
    if fmt == "safetensors":
        return _export_safetensors(source, batch, eager, out, quiet)
    infer, stats = _inference_model(source, batch)
    _say(f"inference graph: {stats['folded']} BatchNorms folded into convolutions, {stats['affine']} standalone "
         f"BatchNorms as per-channel scale+shift, {stats['dropout_removed']} dropouts removed, "
         f"{stats['aux_heads_removed']} auxiliary heads dropped", quiet)
    if fmt in ("torchscript", "exported-program"):
        infer.use_channels_last()
    if with_preprocessing:
        from .preprocess_graph import export_with_preprocessing

        return export_with_preprocessing(source, infer, images, eager, fmt, out, opset=opset, quiet=quiet)
    metadata = source.metadata()
    example = batch[:2] if batch.shape[0] >= 2 else batch.repeat(2, 1, 1, 1)
    calibration = (_calibration_batches(source, calibration_dataset_dir, calibration_images)
                   if quantize == "int8" else None)
    temporary = _temporary(out, fmt)
    try:
        if fmt == "onnx":
            formats.write_onnx(infer, example, temporary, metadata, opset=opset)
            runner, runtime = formats.load_onnx(temporary), "onnxruntime"
        elif fmt == "torchscript":
            formats.write_torchscript(infer, example, temporary, metadata)
            runner, runtime = formats.load_torchscript(temporary), "torch.jit.load"
        elif fmt == "exported-program":
            formats.write_exported_program(infer, example, temporary, metadata)
            runner, runtime = formats.load_exported_program(temporary), "torch.export.load"
        else:  # tflite
            from .tflite import write_tflite

            runner, runtime = write_tflite(infer, example, temporary, metadata, quantize=quantize,
                                           calibration=calibration)
        if fmt == "tflite" and quantize == "int8":
            # int8 is judged by top-1 agreement with the fp32 eager net on the calibration images.
            with torch.no_grad():
                reference = source.model(calibration).float().numpy()
            comparison, lines = _check_runner(runner, calibration, reference, runtime + " on the calibration images",
                                              quantized=True, min_agreement=min_agreement)
        else:
            comparison, lines = _check_runner(runner, batch, eager, runtime)
        for line in lines:
            _say(line, quiet)
        result = ExportResult(out, fmt, comparison, lines)
        if fmt == "onnx" and quantize == "int8":
            from .quantize import quantize_onnx

            result = quantize_onnx(temporary, out, calibration, min_agreement=min_agreement, quiet=quiet,
                                   calibration_source=str(calibration_dataset_dir), weight_rounding=weight_rounding)
            temporary.unlink(missing_ok=True)
            return result
        os.replace(temporary, out)
        _say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", quiet)
        return result
    finally:
        temporary.unlink(missing_ok=True)


def _inference_model(source: ExportSource, batch: torch.Tensor):
    """inference_copy, falling back to keeping auxiliary heads if the net's forward needs them
    (then they are dead code that the exporters drop from the graph)."""
    infer, stats = inference_copy(source.model, source.multi_label)
    if stats["aux_heads_removed"]:
        try:
            with torch.no_grad():
                infer(batch[:1])
        except Exception:  # a net that computes its aux head in eval mode too
            infer, stats = inference_copy(_without_aux_removal(source.model), source.multi_label)
    return infer, stats


def _without_aux_removal(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.classifier_scopes = tuple(getattr(model, "classifier_scopes", ()))[:1]
    return clone


def _check_runner(runner: formats.Runner, batch: torch.Tensor, eager: np.ndarray, runtime: str,
                  quantized: bool = False, min_agreement: float = 0.99) -> tuple[Comparison, list[str]]:
    """Run the whole batch and a batch of one (the dynamic batch axis) and compare with eager."""
    x = batch.numpy()
    comparison = compare(eager, runner(x))
    lines = []
    if quantized:
        line = comparison.line(runtime)
        if comparison.top1_agreement < min_agreement:
            raise VerificationError(f"export NOT written: {line}: top-1 agreement below --min_agreement {min_agreement}")
        lines.append(line)
    else:
        lines.append(check_close(comparison, runtime))
        single = compare(eager[:1], runner(x[:1]))
        lines.append(check_close(single, runtime + " (batch of 1)"))
    return comparison, lines


def _export_safetensors(source: ExportSource, batch: torch.Tensor, eager: np.ndarray, out: Path,
                        quiet: bool) -> ExportResult:
    temporary = _temporary(out)
    sidecar_final = out.with_suffix(".json")
    sidecar = None
    try:
        sidecar = formats.write_safetensors(source.model, temporary, source.metadata())
        runner = formats.load_safetensors(temporary, sidecar)
        comparison, lines = _check_runner(runner, batch, eager, "create_model + safetensors")
        for line in lines:
            _say(line, quiet)
        os.replace(temporary, out)
        os.replace(sidecar, sidecar_final)
        _say(f"wrote {out} and {sidecar_final}", quiet)
        return ExportResult(out, "safetensors", comparison, lines, [sidecar_final])
    finally:
        temporary.unlink(missing_ok=True)
        if sidecar is not None:
            sidecar.unlink(missing_ok=True)


def _calibration_batches(source: ExportSource, dataset_dir: Optional[str], count: int) -> torch.Tensor:
    """Up to `count` preprocessed images from the user's dataset (an image folder or any slimtune source)."""
    if not dataset_dir:
        raise ConfigError("--quantize int8 needs --calibration_dataset_dir (images like those the model will see)")
    from ..data.folder import expand_inputs
    from .verify import VerificationImages
    from ..data.decode import BadImageError, decode_image

    paths = expand_inputs([dataset_dir])
    step = max(1, len(paths) // max(count, 1))
    arrays = []
    for path in paths[::step][:count]:
        try:
            arrays.append(decode_image(path, source.in_channels, description=str(path)))
        except BadImageError:
            continue
    if not arrays:
        raise ConfigError(f"--calibration_dataset_dir {dataset_dir}: no readable images")
    return preprocess_batch(VerificationImages(arrays, dataset_dir), source.preprocessing, source.image_size)

