"""`--quantize int8` for ONNX: static QDQ calibrated on the user's images, gated by top-1 agreement with fp32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimtune.cli import main
from slimtune.export import export
from slimtune.export.verify import VerificationError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import skimage_photos  # noqa: E402
from test_export import write_run  # noqa: E402

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def calibration_dir(tmp_path: Path) -> Path:
    """40 real-photo crops (8 per scikit-image photo)."""
    folder = tmp_path / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, photo in skimage_photos().items():
        height, width = photo.shape[:2]
        for index in range(8):
            top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            Image.fromarray(photo[top:top + height // 2, left:left + width // 2]).save(folder / f"{name}_{index}.jpg")
    return folder


@pytest.mark.slow  # test_int8_below_min_agreement_writes_nothing runs the same path by default
def test_int8_onnx_is_quantized_and_agrees_with_fp32(tmp_path, calibration_dir, capsys):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet_int8.onnx"
    assert main(["export", "--checkpoint_path", str(run), "--format", "onnx", "--output", str(out), "--quantize", "int8",
                 "--calibration_dataset_dir", str(calibration_dir), "--calibration_images", "40",
                 "--min_agreement", "0.9"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "top-1 agreement" in captured.err and "images/s" in captured.err
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights and summary["int8_bytes"] < summary["fp32_bytes"] / 3
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model_name"] == "lenet" and "int8 static QDQ" in meta["quantization"]
    # The agreement reported is what an independent fp32 export and the int8 file give on those images.
    fp32 = tmp_path / "lenet_fp32.onnx"
    export(str(run), "onnx", str(fp32), quiet=True)
    from slimtune.export.prepare import load_source
    from slimtune.export.run import _calibration_batches

    batch = _calibration_batches(load_source(str(run)), str(calibration_dir), 40).numpy()
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(["logits"], {"input": batch})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": batch})[0]
    agreement = float(np.mean(want.argmax(1) == got.argmax(1)))
    assert summary["top1_agreement"] == pytest.approx(agreement) and agreement >= 0.9
    assert summary["calibration_images"] == 40


def test_int8_below_min_agreement_writes_nothing(tmp_path, calibration_dir):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet_int8.onnx"
    with pytest.raises(VerificationError, match="min_agreement"):
        export(str(run), "onnx", str(out), quantize="int8", calibration_dataset_dir=str(calibration_dir),
               calibration_images=16, min_agreement=1.01, quiet=True)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_int8_needs_a_calibration_dataset(tmp_path, capsys):
    run = write_run(tmp_path, "lenet", 28)
    assert main(["export", "--checkpoint_path", str(run), "--format", "onnx", "--output", str(tmp_path / "q.onnx"),
                 "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--calibration_dataset_dir" in err and err.count("\n") == 1
