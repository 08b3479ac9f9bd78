"""`--with_preprocessing`: uint8 NHWC images of any size in, the net's eval preprocessing in the graph.

The reference is slimtune's eager preprocessing (itself checked against TF-Slim's) followed by the
eager net, image by image at each image's own size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.export import export
from slimtune.export.preprocess_graph import InGraphPreprocessing
from slimtune.preprocessing import get_preprocessing

sys.path.insert(0, str(Path(__file__).parent))
from test_export import write_run  # noqa: E402

ort = pytest.importorskip("onnxruntime")

SIZES = [(300, 451), (451, 300), (224, 224), (97, 131), (256, 255), (600, 257), (31, 29), (12, 17), (5, 3)]


def _photo(height: int, width: int, channels: int) -> np.ndarray:
    from skimage import data
    from PIL import Image

    photo = Image.fromarray(data.astronaut()).resize((width, height), Image.BILINEAR)
    array = np.asarray(photo)
    return array[..., :1].copy() if channels == 1 else array.copy()


@pytest.mark.parametrize("family,size,channels", [("inception", 224, 3), ("inception", 96, 3), ("vgg", 224, 3),
                                                  ("vgg", 64, 3), ("lenet", 28, 1), ("cifarnet", 32, 3)])
def test_in_graph_preprocessing_equals_slimtunes_eager_preprocessing(family, size, channels):
    module = InGraphPreprocessing(family, size, channels)
    eager = get_preprocessing(family, is_training=False)
    for height, width in SIZES:
        if family == "vgg" and min(height, width) < 2:
            continue
        image = _photo(height, width, channels)
        expected = eager(torch.from_numpy(image).permute(2, 0, 1).contiguous(), size, size)
        with torch.no_grad():
            got = module(torch.from_numpy(np.stack([image, image])))
        assert got.shape == (2, channels, size, size)
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=2e-5, msg=f"{family} {height}x{width}")
        torch.testing.assert_close(got[1], expected, rtol=1e-5, atol=2e-5)


def _eager_logits(run: Path, image: np.ndarray, family: str, size: int) -> np.ndarray:
    from slimtune.export.prepare import load_source

    source = load_source(str(run))
    x = get_preprocessing(family, is_training=False)(torch.from_numpy(image).permute(2, 0, 1).contiguous(), size, size)
    with torch.no_grad():
        return source.model(x[None]).numpy()


def test_onnx_with_preprocessing_takes_uint8_images_of_any_size(tmp_path):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet_raw.onnx"
    export(str(run), "onnx", str(out), with_preprocessing=True, quiet=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "input" and model_input.type == "tensor(uint8)"
    assert all(isinstance(d, str) for d in model_input.shape[:3]) and model_input.shape[3] == 1
    assert session.get_modelmeta().custom_metadata_map["with_preprocessing"] == "true"
    for height, width in [(28, 28), (10, 13), (57, 31), (300, 451)]:
        image = _photo(height, width, 1)
        logits = session.run(["logits"], {"input": image[None]})[0]
        expected = _eager_logits(run, image, "lenet", 28)
        assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected)), (height, width)


@pytest.mark.slow  # the in-graph inception preprocessing itself is checked by the fast test above
def test_torchscript_with_preprocessing_inception_family(tmp_path):
    run = write_run(tmp_path, "mobilenet_v1_025", 64)
    out = tmp_path / "mnet_raw.pt"
    export(str(run), "torchscript", str(out), with_preprocessing=True, quiet=True)
    module = torch.jit.load(str(out))
    for height, width in [(64, 64), (33, 90), (451, 300)]:
        image = _photo(height, width, 3)
        with torch.no_grad():
            logits = module(torch.from_numpy(np.stack([image] * 3)))[0].numpy()
        expected = _eager_logits(run, image, "inception", 64)
        assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected)), (height, width)


@pytest.mark.slow
def test_predict_runs_an_onnx_with_preprocessing(tmp_path):
    from PIL import Image

    from slimtune.predict import predict

    run = write_run(tmp_path, "cifarnet", 32)
    out = tmp_path / "cifar_raw.onnx"
    export(str(run), "onnx", str(out), with_preprocessing=True, quiet=True)
    images = []
    for index, (height, width) in enumerate([(40, 60), (20, 25), (300, 451)]):
        path = tmp_path / f"img{index}.png"
        Image.fromarray(_photo(height, width, 3)).save(path)
        images.append(str(path))
    expected = predict(str(run), images, top_k=3, device="cpu")
    actual = predict(None, images, model=str(out), top_k=3)
    for got, want in zip(actual, expected):
        assert [label["index"] for label in got.labels] == [label["index"] for label in want.labels]
        np.testing.assert_allclose([label["probability"] for label in got.labels],
                                   [label["probability"] for label in want.labels], atol=2e-6)


def test_with_preprocessing_is_refused_where_it_cannot_apply(tmp_path):
    from slimtune.errors import ConfigError

    run = write_run(tmp_path, "lenet", 28)
    with pytest.raises(ConfigError, match="--with_preprocessing"):
        export(str(run), "safetensors", str(tmp_path / "w.safetensors"), with_preprocessing=True, quiet=True)


@pytest.mark.slow
def test_exported_program_with_preprocessing_any_size_and_any_output_name(tmp_path):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet_raw.program"  # not .pt2: the temporary still gets the suffix torch.export.load wants
    export(str(run), "exported-program", str(out), with_preprocessing=True, quiet=True)
    module = torch.export.load(str(out)).module()
    for height, width in [(10, 13), (57, 31)]:
        image = _photo(height, width, 1)
        with torch.no_grad():
            logits = module(torch.from_numpy(image[None]))[0].numpy()
        expected = _eager_logits(run, image, "lenet", 28)
        assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected)), (height, width)
