"""`--format tflite`: the inference net converted by LiteRT's PyTorch converter (litert-torch, the
optional extra `slimtune[tflite]`), checked in the LiteRT interpreter.

TFLite models have a static input shape: the file takes one preprocessed image, NCHW float32
[1, C, S, S], and returns logits and probabilities. With --quantize int8 the net is quantized
post-training (PT2E, static int8, calibrated on the user's images) before conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .formats import Runner, require


def _interpreter_runner(path: Path) -> Runner:
    """Run a .tflite in the LiteRT interpreter, one image at a time (the file's batch is 1)."""
    interpreter_module = require("ai_edge_litert.interpreter", "tflite", "running a .tflite file")
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (input_detail,) = interpreter.get_input_details()
    outputs = sorted(interpreter.get_output_details(), key=lambda d: d["name"])
    logits_detail = next((d for d in outputs if "output_0" in d["name"]), outputs[0])

    def run(x: np.ndarray) -> np.ndarray:
        rows = []
        in_scale, in_zero = input_detail["quantization"]
        out_scale, out_zero = logits_detail["quantization"]
        for image in x:
            value = np.ascontiguousarray(image[None], dtype=np.float32)
            if input_detail["dtype"] != np.float32:  # a fully int8 model quantizes its own input
                info = np.iinfo(input_detail["dtype"])
                value = np.clip(np.round(value / in_scale) + in_zero, info.min, info.max).astype(input_detail["dtype"])
            interpreter.set_tensor(input_detail["index"], value)
            interpreter.invoke()
            out = np.array(interpreter.get_tensor(logits_detail["index"]))
            if out.dtype != np.float32:
                out = (out.astype(np.float32) - out_zero) * out_scale
            rows.append(out)
        return np.concatenate(rows)
    return run


def _quantized(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor) -> nn.Module:
    """PT2E static int8 (symmetric, per-channel weights) calibrated on `calibration`."""
    quantizer_module = require("litert_torch.quantize.pt2e_quantizer", "tflite", "--format tflite --quantize int8")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = quantizer_module.PT2EQuantizer().set_global(
        quantizer_module.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for image in calibration:
            prepared(image[None])
    return convert_pt2e(prepared, fold_quantize=False)


def write_tflite(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                 quantize: Optional[str] = None, calibration: Optional[torch.Tensor] = None):
    """Convert with litert-torch, write `path`, return (interpreter runner, runtime name)."""
    litert_torch = require("litert_torch", "tflite", "--format tflite")
    sample = example[:1].contiguous()
    kwargs = {}
    if quantize == "int8":
        quant_config = require("litert_torch.quantize.quant_config", "tflite", "--format tflite --quantize int8")
        quantizer_module = require("litert_torch.quantize.pt2e_quantizer", "tflite", "--quantize int8")
        model = _quantized(model, sample, calibration)
        kwargs["quant_config"] = quant_config.QuantConfig(pt2e_quantizer=quantizer_module.PT2EQuantizer().set_global(
            quantizer_module.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)))
    edge_model = litert_torch.convert(model, (sample,), **kwargs)
    edge_model.export(str(path))
    return _interpreter_runner(path), "the LiteRT interpreter" + (" (int8)" if quantize else "")
