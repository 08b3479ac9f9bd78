"""int8 post-training static quantization of a verified fp32 ONNX export (onnxruntime, QDQ format).

Weights int8 per channel, activations uint8, ranges calibrated (min/max) on N images of the
user's dataset run through the net's own preprocessing. Each weight's grid point is chosen by GPTQ
(weight_rounding.py) to cancel the layer's output error on those images, unless nearest rounding
is asked for. The quantized file is compared with the fp32 one on those images: it is written
only when their top-1 predictions agree on at least `min_agreement` of them; the report gives both
sizes, the agreement and images/s at batch 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import formats
from ..errors import ConfigError
from .verify import Comparison, VerificationError, compare


def _calibration_reader(batch: np.ndarray):
    quantization = formats.require("onnxruntime.quantization", "export", "--quantize int8")

    class Reader(quantization.CalibrationDataReader):
        """Feeds the calibration images one at a time (min/max over all of them)."""

        def __init__(self) -> None:
            self.index = 0

        def get_next(self):
            if self.index >= len(batch):
                return None
            self.index += 1
            return {formats.INPUT_NAME: batch[self.index - 1:self.index]}

        def rewind(self) -> None:
            self.index = 0

    return Reader()


def _run_all(session, batch: np.ndarray, chunk: int = 16) -> np.ndarray:
    return np.concatenate([session.run([formats.OUTPUT_NAMES[0]], {formats.INPUT_NAME: batch[i:i + chunk]})[0]
                           for i in range(0, len(batch), chunk)])


def images_per_second(session, sample: np.ndarray, batch_size: int = 1, seconds: float = 1.0) -> float:
    """Throughput of an onnxruntime session on `sample` (first image repeated to batch_size)."""
    x = np.ascontiguousarray(np.repeat(sample[:1], batch_size, axis=0))
    session.run(None, {formats.INPUT_NAME: x})  # warm-up
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < seconds:
        session.run(None, {formats.INPUT_NAME: x})
        runs += 1
    return runs * batch_size / (time.perf_counter() - started)


WEIGHT_ROUNDINGS = ("gptq", "nearest")


def quantize_onnx(fp32_path: Path, out: Path, calibration: torch.Tensor, *, min_agreement: float = 0.99,
                  quiet: bool = False, calibration_source: str = "", weight_rounding: str = "gptq"):
    """Quantize the verified fp32 ONNX at `fp32_path` into `out` (written only if it agrees enough).

    `weight_rounding` "gptq" picks each int8 weight's grid point to cancel the layer's output error on
    the calibration images (weight_rounding.py); "nearest" rounds each weight on its own, as
    onnxruntime's quantizer does. Both use the same per-channel scales.
    """
    import onnx

    from .run import ExportResult, _temporary

    quantization = formats.require("onnxruntime.quantization", "export", "--quantize int8")
    batch = np.ascontiguousarray(calibration.numpy())
    temporary = _temporary(out).with_suffix(".int8.onnx")  # the fp32 file sits at _temporary(out)
    prepared = temporary.with_suffix(".prep.onnx")
    try:
        try:
            quantization.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            source = prepared
        except Exception:  # pre-processing is an optimisation; quantize the plain graph without it
            source = fp32_path
        extra_options, rounding_note = {}, "nearest-rounded"
        if weight_rounding == "gptq":
            from .weight_rounding import compensated_weights

            rounded, overrides, rounding = compensated_weights(onnx.load(str(source)), batch)
            onnx.save(rounded, str(prepared))
            source = prepared
            # The quantizer is given GPTQ's scales, so it stores exactly the integers GPTQ chose.
            extra_options["TensorQuantOverrides"] = overrides
            rounding_note = f"GPTQ-rounded ({len(rounding.rounded)} kernels)"
            if rounding.skipped and not quiet:
                print(f"nearest rounding kept for {len(rounding.skipped)} kernels: "
                      + "; ".join(f"{k}: {v}" for k, v in list(rounding.skipped.items())[:3]), file=sys.stderr)
        elif weight_rounding != "nearest":
            raise ConfigError(f"--weight_rounding {weight_rounding}: choose one of {', '.join(WEIGHT_ROUNDINGS)}")
        quantization.quantize_static(
            str(source), str(temporary), _calibration_reader(batch), quant_format=quantization.QuantFormat.QDQ,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            per_channel=True, calibrate_method=quantization.CalibrationMethod.MinMax, extra_options=extra_options)
        fp32_proto = onnx.load(str(fp32_path), load_external_data=False)
        int8_proto = onnx.load(str(temporary))
        del int8_proto.metadata_props[:]
        for entry in fp32_proto.metadata_props:
            int8_proto.metadata_props.add(key=entry.key, value=entry.value)
        int8_proto.metadata_props.add(key="quantization", value=(
            f"int8 static QDQ (per-channel int8 weights, {rounding_note}; uint8 activations), min/max calibrated on "
            f"{len(batch)} images{' from ' + calibration_source if calibration_source else ''}"))
        onnx.save(int8_proto, str(temporary))
        fp32_session, int8_session = formats.onnx_session(fp32_path), formats.onnx_session(temporary)
        comparison: Comparison = compare(_run_all(fp32_session, batch), _run_all(int8_session, batch))
        fp32_size, int8_size = fp32_path.stat().st_size, temporary.stat().st_size
        fp32_speed = images_per_second(fp32_session, batch)
        int8_speed = images_per_second(int8_session, batch)
        lines = [f"int8 vs fp32 on {len(batch)} calibration images: top-1 agreement {comparison.top1_agreement:.4f} "
                 f"(--min_agreement {min_agreement}), max |logit diff| {comparison.max_abs_diff:.3g} "
                 f"(largest |logit| {comparison.largest_logit:.4g})",
                 f"size: fp32 {fp32_size / 1e6:.2f} MB -> int8 {int8_size / 1e6:.2f} MB "
                 f"({fp32_size / max(int8_size, 1):.2f}x smaller)",
                 f"speed (onnxruntime CPU, batch 1): fp32 {fp32_speed:.1f} images/s, int8 {int8_speed:.1f} images/s "
                 f"({int8_speed / fp32_speed:.2f}x)"]
        for line in lines:
            if not quiet:
                print(line, file=sys.stderr)
        if comparison.top1_agreement < min_agreement:
            raise VerificationError(f"int8 export NOT written: top-1 agreement with fp32 "
                                    f"{comparison.top1_agreement:.4f} < --min_agreement {min_agreement}")
        os.replace(temporary, out)
        if not quiet:
            print(f"wrote {out}", file=sys.stderr)
        return ExportResult(out, "onnx", comparison, lines, report={"fp32_bytes": fp32_size, "int8_bytes": int8_size, "top1_agreement": comparison.top1_agreement,
                         "fp32_images_per_s": fp32_speed, "int8_images_per_s": int8_speed,
                         "calibration_images": len(batch), "weight_rounding": weight_rounding})
    finally:
        temporary.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)
