"""`--compile` for eval and predict (compiled_inference): the frozen, compiled forward gives the eager
model's scores, a short last batch reuses the one compiled graph, and a graph that fails to build or
computes other logits is replaced by the eager model with one warning line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slimtune.cli import main
from slimtune.compiled_inference import CompiledInference
from slimtune.data import build_source
from slimtune.errors import ConfigError
from slimtune.evaluate.run import evaluate_model
from slimtune.nets import create_model
from slimtune.nets.registry import get_model_spec
from slimtune.predict import predict

needs_compiler = pytest.mark.skipif(not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
                                    reason="no C++ compiler for inductor")


def _net():
    torch.manual_seed(0)
    return create_model("cifarnet", num_classes=2).eval()


def _photos(folder: Path, per_class: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / label / f"{index}.jpg")
    return folder


def _checkpoint(folder: Path) -> Path:
    weights = folder / "model.ckpt-1.safetensors"
    save_file({k: v.contiguous() for k, v in _net().state_dict().items()}, str(weights),
              metadata={"model_name": "cifarnet", "num_classes": "2", "format": "slimtune", "step": "1",
                        "image_size": "32"})
    return weights


@needs_compiler
def test_compiled_eval_gives_the_eager_scores_from_one_graph(tmp_path) -> None:
    source = build_source("folder", str(_photos(tmp_path / "photos")), "train")  # 10 images: batches 4, 4, 2
    spec = get_model_spec("cifarnet")
    eager = evaluate_model(_net(), source, spec, image_size=32, batch_size=4, return_scores=True)
    assert "forward" not in eager
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = evaluate_model(_net(), source, spec, image_size=32, batch_size=4, return_scores=True, compile=True)
    assert compiled["forward"] == "compiled, frozen weights"
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1  # the batch of 2 was padded to 4, not compiled again
    assert counters["inductor"]["mkldnn_conv_weight_pack_matcher_count"] > 0  # frozen: kernels pre-packed
    np.testing.assert_array_equal(compiled["_indices"], eager["_indices"])
    np.testing.assert_allclose(compiled["_scores"], eager["_scores"], rtol=1e-5, atol=1e-6)
    assert compiled["Accuracy"] == eager["Accuracy"] and compiled["num_samples"] == 10


def _fake_compile(monkeypatch, make):
    """Replace torch.compile with `make(model)`, whose calls see inductor's freezing setting; returns
    [(model, options)] of each torch.compile call."""
    asked: list = []

    def fake(model, **options):
        asked.append((model, options))
        return make(model)

    monkeypatch.setattr(torch, "compile", fake)
    return asked


def _freezing() -> bool:
    from torch._inductor import config

    return config.freezing


def _scaled_compile(monkeypatch, factor):
    """torch.compile replaced by a graph computing model(x) * factor(freezing); returns the
    (batch size, freezing) of each compiled call and the torch.compile calls."""
    calls: list = []

    def make(model):
        def run(x):
            calls.append((x.shape[0], _freezing()))
            return model(x) * factor(_freezing())
        return run

    return calls, _fake_compile(monkeypatch, make)


def _two_batches(forward: CompiledInference, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(the second call's output, the eager model's) for batches of 3 then 2 channels-last images."""
    images = torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        forward(images)
        return forward(images[:2]), model(images[:2])


def test_a_graph_with_other_logits_falls_back_to_eager_in_one_line(monkeypatch, capsys) -> None:
    calls, asked = _scaled_compile(monkeypatch, lambda freezing: 1.01)  # 1% off
    model = _net()
    forward = CompiledInference(model, batch_size=4)
    got, expected = _two_batches(forward, model)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # eager from the first batch on
    assert [options for _, options in asked] == [{"dynamic": False}] * 2
    assert calls == [(4, True), (4, False)]  # frozen, then once more without freezing, then no more
    assert forward.status.startswith("eager: the compiled graph's logits differ")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimtune: warning: --compile: the compiled graph's logits differ")
    assert lines[0].endswith("running the eager model instead")


def test_a_wrong_frozen_graph_is_compiled_again_without_freezing(monkeypatch, capsys) -> None:
    # As torch 2.14 froze Inception-ResNet-v2: wrong with frozen weights, right without.
    calls, asked = _scaled_compile(monkeypatch, lambda freezing: 1.01 if freezing else 1.0)
    model = _net()
    forward = CompiledInference(model, batch_size=4)
    got, expected = _two_batches(forward, model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # computed padded to 4 rows
    assert len(asked) == 2 and calls == [(4, True), (4, False), (4, False)] and forward.status == "compiled"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimtune: warning: --compile: with frozen weights the compiled")
    assert lines[0].endswith("running it compiled without freezing")


def test_a_graph_within_float_rounding_of_eager_is_kept(monkeypatch, capsys) -> None:
    calls, _ = _scaled_compile(monkeypatch, lambda freezing: 1 + 1e-6)
    model = _net()
    forward = CompiledInference(model, batch_size=4)
    got, expected = _two_batches(forward, model)
    assert forward.status == "compiled, frozen weights"
    torch.testing.assert_close(got, expected * (1 + 1e-6))
    assert calls == [(4, True), (4, True)]  # every batch padded to the compiled size
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_a_graph_that_fails_to_build_or_gives_nan_falls_back(monkeypatch, capsys, failure) -> None:
    def make(model):
        def run(x):
            if failure == "raise":
                raise RuntimeError("backend compiler failed\nInductorError: cannot recompute metadata\n\n"
                                   "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this ...)")
            return torch.full_like(model(x), float("nan"))
        return run

    _fake_compile(monkeypatch, make)
    model = _net()
    forward = CompiledInference(model, batch_size=2)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(forward(images), model(images), rtol=0, atol=0)
    why = ("torch.compile could not build it (InductorError: cannot recompute metadata)" if failure == "raise"
           else "the compiled graph's logits differ from the eager model's by nan")
    assert forward.status.startswith(f"eager: {why}")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="at most 2"):
        forward(torch.rand(3, 3, 32, 32))


def test_predict_and_eval_compile_run_the_checkpoint_through_one_compiled_forward(monkeypatch, tmp_path, capsys) -> None:
    photos = _photos(tmp_path / "photos")
    weights = _checkpoint(tmp_path)
    eager = predict(str(weights), [str(photos)], top_k=2, batch_size=4, device="cpu")
    asked = _fake_compile(monkeypatch, lambda model: model)
    compiled = predict(str(weights), [str(photos)], top_k=2, batch_size=4, device="cpu", compile=True)
    assert len(asked) == 1
    assert [p.to_json() for p in compiled] == [p.to_json() for p in eager]
    assert main(["predict", "--checkpoint_path", str(weights), "--compile", "--format", "json", str(photos)]) == 0
    assert len(asked) == 2
    capsys.readouterr()
    assert main(["eval", "--checkpoint_path", str(weights), "--dataset_dir", str(photos), "--dataset_split_name",
                 "train", "--num_workers", "0", "--noreport", "--compile"]) == 0
    assert len(asked) == 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["forward"] == "compiled, frozen weights"


def test_compile_refusals_are_one_line(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="--compile applies to checkpoints; an exported .onnx runs in onnxruntime"):
        predict(None, [str(tmp_path)], model=str(tmp_path / "m.onnx"), compile=True)
    with pytest.raises(ConfigError, match="--batch_size must be >= 1"):
        predict(str(_checkpoint(tmp_path)), [str(tmp_path)], batch_size=0)
