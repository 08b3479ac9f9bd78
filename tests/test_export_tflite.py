"""`--format tflite` through litert-torch (the optional extra slimtune[tflite]), checked in the LiteRT interpreter.

Skipped (counted) where the extra is not installed; test_export.py checks the one-line error then.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from slimtune.export import export
from slimtune.export.verify import VerificationError, load_verification_images, preprocess_batch

sys.path.insert(0, str(Path(__file__).parent))
from test_export import write_run  # noqa: E402
from test_export_quantize import calibration_dir  # noqa: E402,F401

pytest.importorskip("litert_torch")
interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")

pytestmark = pytest.mark.slow  # litert-torch's import alone takes ~20 s


def _run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (detail,) = interpreter.get_input_details()
    outputs = sorted(interpreter.get_output_details(), key=lambda d: d["name"])
    rows = []
    for image in x:
        interpreter.set_tensor(detail["index"], image[None].astype(np.float32))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(outputs[0]["index"]).copy())
    return np.concatenate(rows)


def test_tflite_float32_is_verified_in_the_interpreter(tmp_path):
    from slimtune.export.prepare import load_source

    run = write_run(tmp_path, "cifarnet", 32)
    out = tmp_path / "cifarnet.tflite"
    result = export(str(run), "tflite", str(out), quiet=True)
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    x = preprocess_batch(load_verification_images(None, 3), "cifarnet", 32).numpy()
    source = load_source(str(run))
    import torch

    with torch.no_grad():
        expected = source.model(torch.from_numpy(x)).numpy()
    got = _run_tflite(out, x)
    assert np.max(np.abs(got - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_tflite_int8_is_gated_by_top1_agreement(tmp_path, calibration_dir):  # noqa: F811
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet_int8.tflite"
    with pytest.raises(VerificationError, match="min_agreement"):
        export(str(run), "tflite", str(out), quantize="int8", calibration_dataset_dir=str(calibration_dir),
               calibration_images=16, min_agreement=1.01, quiet=True)
    assert not out.exists()
    result = export(str(run), "tflite", str(out), quantize="int8", calibration_dataset_dir=str(calibration_dir),
                    calibration_images=16, min_agreement=0.8, quiet=True)
    assert out.is_file() and result.comparison.top1_agreement >= 0.8 and result.comparison.num_images == 16
    interpreter = interpreter_module.Interpreter(model_path=str(out))
    assert interpreter.get_input_details()[0]["dtype"] in (np.int8, np.uint8)
