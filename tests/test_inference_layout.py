"""eval, predict, features and the probe run the net in the channels-last layout training uses
(runtime.inference_layout): every convolution sees a channels-last map, and the numbers equal the
contiguous layout's to float32 rounding. A run trained with --nochannels_last evaluates contiguous."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slimtune.data import build_source
from slimtune.evaluate.run import evaluate_model
from slimtune.features import extract_features
from slimtune.nets import create_model
from slimtune.nets.registry import get_model_spec
from slimtune.predict import predict
from slimtune.probe import extract_features as probe_features

from layout_support import ConvInputLayouts


def _net(name: str = "cifarnet", classes: int = 2):
    torch.manual_seed(0)
    return create_model(name, num_classes=classes).eval()


def _photos(folder: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(count // 2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / label / f"{index}.jpg")
    return folder


def test_evaluate_runs_channels_last_with_the_same_scores(tmp_path) -> None:
    source = build_source("folder", str(_photos(tmp_path / "photos")), "train")
    spec = get_model_spec("cifarnet")
    runs = {}
    for channels_last in (False, True):
        with ConvInputLayouts() as layouts:
            runs[channels_last] = evaluate_model(_net(), source, spec, image_size=32, batch_size=4,
                                                 return_scores=True, channels_last=channels_last)
        assert (layouts.all_channels_last() if channels_last else layouts.none_channels_last())
    np.testing.assert_allclose(runs[True]["_scores"], runs[False]["_scores"], rtol=1e-5, atol=1e-5)


def test_predict_features_and_probe_run_channels_last(tmp_path) -> None:
    photos = _photos(tmp_path / "photos")
    model = _net()
    weights = tmp_path / "model.ckpt-1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"model_name": "cifarnet", "num_classes": "2", "format": "slimtune", "step": "1",
                        "image_size": "32"})
    with ConvInputLayouts() as layouts:
        predictions = predict(str(weights), [str(photos)], top_k=1, device="cpu")
    assert len(predictions) == 6 and all(p.error is None for p in predictions)
    assert layouts.all_channels_last()

    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with ConvInputLayouts() as layouts:
        got = extract_features(_net(), "conv2", images, batch_size=2)
    assert layouts.all_channels_last()
    assert got.is_contiguous()  # features come back in the ordinary layout
    plain = extract_features(_net(), "conv2", images, batch_size=2, channels_last=False)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)

    source = build_source("folder", str(photos), "train")
    with ConvInputLayouts() as layouts:
        features = probe_features(_net(), source, get_model_spec("cifarnet"), ["conv2"], tmp_path / "cache", "k",
                                  preprocessing_name="cifarnet", image_size=32, batch_size=4, num_workers=0,
                                  labels_offset=0, device=torch.device("cpu"))
    assert features.forward_passes == 2
    assert layouts.all_channels_last()
