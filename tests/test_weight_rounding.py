"""GPTQ weight rounding for the int8 ONNX export (slimtune/export/weight_rounding.py).

The layer errors are computed independently of the module: torch's own conv2d / matmul on the
kernels the module returns, against the float kernels, on inputs it never saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.export import export
from slimtune.export.weight_rounding import INT8_MAX, compensated_weights, gptq_round

sys.path.insert(0, str(Path(__file__).parent))
from test_export import write_run  # noqa: E402
from test_export_quantize import calibration_dir  # noqa: E402,F401

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Photo-like inputs: low-frequency noise (neighbouring pixels correlated) in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 5, 5, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(24, 24), mode="bicubic", align_corners=False).clamp(-1, 1).numpy()


def edge_detector_net(seed: int = 0):
    """Conv 3x3 (3->8) + Relu, depthwise 3x3 whose kernels sum to zero times a large gain (an edge
    detector after a folded BatchNorm, the case where nearest rounding leaks flat regions through),
    Relu, global average pool, MatMul (8->5, stored (in, out)) and Gemm (5->4, transB)."""
    rng = np.random.default_rng(seed)
    stem = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    depthwise = rng.normal(0, 1, (8, 1, 3, 3))
    depthwise = (40 * (depthwise - depthwise.mean(axis=(2, 3), keepdims=True))).astype(np.float32)
    matmul = rng.normal(0, 0.5, (8, 5)).astype(np.float32)
    gemm = rng.normal(0, 0.5, (4, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "stem_w"], ["stem"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "dw_w"], ["dw"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=8),
        helper.make_node("Relu", ["dw"], ["dw_relu"]),
        helper.make_node("GlobalAveragePool", ["dw_relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mm_w"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "gemm_w"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "edges", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 24, 24])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(stem, "stem_w"), numpy_helper.from_array(depthwise, "dw_w"),
         numpy_helper.from_array(matmul, "mm_w"), numpy_helper.from_array(gemm, "gemm_w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def kernels(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def nearest(kernel: np.ndarray, axis: int) -> np.ndarray:
    rows = np.moveaxis(kernel, axis, 0)
    scale = np.abs(rows.reshape(len(rows), -1)).max(axis=1) / INT8_MAX
    shape = (-1,) + (1,) * (rows.ndim - 1)
    return np.moveaxis(np.round(rows / scale.reshape(shape)) * scale.reshape(shape), 0, axis).astype(np.float32)


def test_gptq_cuts_each_layers_output_error_on_unseen_images():
    model = edge_detector_net()
    rounded, overrides, report = compensated_weights(model, smooth_images(32, seed=1))
    assert sorted(report.rounded) == ["dw_w", "gemm_w", "mm_w", "stem_w"] and not report.skipped
    float_kernels, gptq = kernels(model), kernels(rounded)
    x = torch.from_numpy(smooth_images(32, seed=2))  # images the rounding did not see
    stem_in = x
    dw_in = F.relu(F.conv2d(stem_in, torch.from_numpy(float_kernels["stem_w"]), padding=1))
    pooled = F.relu(F.conv2d(dw_in, torch.from_numpy(float_kernels["dw_w"]), padding=1, groups=8)).mean((2, 3))
    hidden = pooled @ torch.from_numpy(float_kernels["mm_w"])
    layers = {
        "stem_w": (lambda w: F.conv2d(stem_in, w, padding=1), 0),
        "dw_w": (lambda w: F.conv2d(dw_in, w, padding=1, groups=8), 0),
        "mm_w": (lambda w: pooled @ w, 1),
        "gemm_w": (lambda w: hidden @ w.T, 0),
    }
    for name, (layer, axis) in layers.items():
        want = layer(torch.from_numpy(float_kernels[name]))
        error_gptq = (layer(torch.from_numpy(gptq[name])) - want).pow(2).mean().sqrt().item()
        error_nearest = (layer(torch.from_numpy(nearest(float_kernels[name], axis))) - want).pow(2).mean().sqrt().item()
        # Every kernel is on its int8 grid, with the scales nearest rounding uses (max |w| / 127 per channel).
        scales = np.array([entry["scale"] for entry in overrides[name]], dtype=np.float32)
        assert all(entry["axis"] == axis and entry["zero_point"] == 0 for entry in overrides[name])
        steps = np.moveaxis(gptq[name], axis, 0) / scales.reshape((-1,) + (1,) * (gptq[name].ndim - 1))
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.abs(np.round(steps)).max() <= INT8_MAX
        assert error_gptq < 0.7 * error_nearest, (name, error_gptq, error_nearest)
    # The zero-sum depthwise kernels are where nearest rounding hurts most; GPTQ restores the cancellation.
    error = {kind: (F.conv2d(dw_in, torch.from_numpy(k), padding=1, groups=8)
                    - F.conv2d(dw_in, torch.from_numpy(float_kernels["dw_w"]), padding=1, groups=8)).pow(2).mean().item()
             for kind, k in (("gptq", gptq["dw_w"]), ("nearest", nearest(float_kernels["dw_w"], 0)))}
    assert error["gptq"] < 0.25 * error["nearest"]


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    # H diagonal: no column's error can be offset by another's, so GPTQ must round each to nearest.
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 6, 10, generator=generator, dtype=torch.float64)
    scales = weights.abs().amax(2) / INT8_MAX
    hessian = torch.diag_embed(torch.rand(2, 10, generator=generator, dtype=torch.float64) + 0.5)
    hessian[0, 3, 3] = 0  # an input that never varied on the calibration images
    grid = gptq_round(weights, hessian, scales)
    torch.testing.assert_close(grid, torch.round(weights / scales[:, :, None]), rtol=0, atol=0)


def test_int8_file_stores_the_gptq_integers(tmp_path, calibration_dir):  # noqa: F811
    run = write_run(tmp_path, "lenet", 28)
    fp32 = export(str(run), "onnx", str(tmp_path / "fp32.onnx"), quiet=True)
    from slimtune.export.prepare import load_source
    from slimtune.export.run import _calibration_batches

    batch = _calibration_batches(load_source(str(run)), str(calibration_dir), 16).numpy()
    want_model, overrides, report = compensated_weights(onnx.load(str(fp32.path)), batch)
    want = kernels(want_model)
    stored = {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / f"{rounding}.onnx"
        export(str(run), "onnx", str(out), quantize="int8", calibration_dataset_dir=str(calibration_dir),
               calibration_images=16, min_agreement=0.0, quiet=True, weight_rounding=rounding)
        int8 = onnx.load(str(out))
        stored[rounding] = kernels(int8)
        assert ("GPTQ-rounded" in {p.key: p.value for p in int8.metadata_props}["quantization"]) == (rounding == "gptq")
    assert len(report.rounded) >= 4
    changed = 0
    for name in report.rounded:
        scales = np.array([entry["scale"] for entry in overrides[name]], dtype=np.float32)
        axis = overrides[name][0]["axis"]
        shape = [1] * want[name].ndim
        shape[axis] = -1
        integers = np.round(want[name] / scales.reshape(shape)).astype(np.int8)
        # onnxruntime's quantizer stored exactly the integers GPTQ chose (the prepared graph keeps the names).
        np.testing.assert_array_equal(stored["gptq"][name + "_quantized"], integers)
        changed += int((stored["nearest"][name + "_quantized"] != integers).sum())
    assert changed > 0  # and they are not simply the nearest ones


def test_unknown_weight_rounding_is_refused(tmp_path, capsys):
    run = write_run(tmp_path, "lenet", 28)
    with pytest.raises(ConfigError, match="weight_rounding"):
        export(str(run), "onnx", str(tmp_path / "x.onnx"), quantize="int8", calibration_dataset_dir=str(tmp_path),
               weight_rounding="stochastic", quiet=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint_path", str(run), "--format", "onnx", "--output", str(tmp_path / "x.onnx"),
              "--quantize", "int8", "--calibration_dataset_dir", str(tmp_path), "--weight_rounding", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
