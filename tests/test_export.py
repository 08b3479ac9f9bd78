"""`slimtune export`: every registered net to ONNX and TorchScript, verified in its own runtime on real photos.

The reference is the eager (unexported) net on the same preprocessed photos; the exported file
runs in onnxruntime / torch.jit.load. BatchNorm statistics are randomised so that folding them
(and ResNet v2's standalone preact/postnorm BNs) is actually exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slimtune.cli import main
from slimtune.export import FORMATS, export
from slimtune.export import run as export_run
from slimtune.export.verify import VerificationError
from slimtune.nets.layers import BatchNorm
from slimtune.nets.registry import get_model_spec, list_models

from layout_support import ConvInputLayouts

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: nets cheap enough to export on every run (the rest are slow-marked; one test per net either way).
FAST = {"onnx": {"lenet"}, "torchscript": {"lenet", "cifarnet", "mobilenet_v1_025"}}
CLASSES = 7


def _randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            if module.weight is not None:
                module.weight.data.uniform_(0.5, 1.5, generator=generator)
            if module.bias is not None:
                module.bias.data.normal_(0.0, 0.2, generator=generator)


def smallest_input(name: str) -> int:
    """The smallest square input the net accepts (its registered minimum, probed upward)."""
    spec = get_model_spec(name)
    for size in sorted({max(spec.min_image_size, 1), 16, 32, 64, 96, 128, 160, 192, 224, spec.default_image_size}):
        if size < spec.min_image_size:
            continue
        try:  # NASNet refuses at build time an input too small for its auxiliary head
            model = spec.build(3, image_size=size).eval()
            with torch.no_grad():
                model(torch.zeros(1, spec.in_channels, size, size))
            return size
        except Exception:  # too small for this net's VALID convolutions / pools
            continue
    raise AssertionError(f"{name} accepts no probed input size")


def write_run(tmp_path: Path, name: str, size: int, **meta: str) -> Path:
    """A checkpoint as `slimtune train` writes it (weights + saved config in its metadata)."""
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build(CLASSES, image_size=size)
    _randomise_batch_norms(model)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    path = run / "model.ckpt-3.safetensors"
    info = {"model_name": name, "num_classes": str(CLASSES), "image_size": str(size), "format": "slimtune",
            "step": "3", "multi_label": "false", "preprocessing": spec.preprocessing,
            "class_names": json.dumps([f"class_{i}" for i in range(CLASSES)]), **meta}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=info)
    (run / "model.ckpt-3.state.pt").write_bytes(b"")
    (run / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3.safetensors"\n')
    return run


def _check_onnx_file(path: Path, name: str, size: int) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BatchNormalization", "Dropout"}, ops
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a symbolic (dynamic) batch axis
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model_name"] == name and int(meta["image_size"]) == size
    assert json.loads(meta["class_names"]) == [f"class_{i}" for i in range(CLASSES)]
    assert meta["preprocessing"] in ("vgg", "inception", "lenet", "cifarnet")


def _check_probabilities_onnx(path: Path, x: np.ndarray) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(["logits", "probabilities"], {"input": x})
    expected = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)


def _params(fmt: str) -> list:
    return [pytest.param(n, marks=() if n in FAST[fmt] else pytest.mark.slow, id=n) for n in list_models()]


@pytest.mark.parametrize("name", _params("onnx"))
def test_every_net_exports_to_onnx_verified(name, tmp_path):
    size = smallest_input(name)
    run = write_run(tmp_path, name, size)
    out = tmp_path / "model.onnx"
    result = export(str(run), "onnx", str(out), quiet=True)
    assert out.is_file() and result.comparison.num_images == 4
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    _check_onnx_file(out, name, size)
    from slimtune.export.verify import load_verification_images, preprocess_batch

    spec = get_model_spec(name)
    x = preprocess_batch(load_verification_images(None, spec.in_channels), spec.preprocessing, size).numpy()
    _check_probabilities_onnx(out, x)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("name", _params("torchscript"))
def test_every_net_exports_to_torchscript_verified(name, tmp_path):
    size = smallest_input(name)
    run = write_run(tmp_path, name, size)
    out = tmp_path / "model.pt"
    result = export(str(run), "torchscript", str(out), quiet=True)
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    extra = {"slimtune.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["slimtune.json"])["model_name"] == name
    graph = str(loaded.inlined_graph if hasattr(loaded, "inlined_graph") else loaded.graph)
    assert "batch_norm" not in graph and "dropout" not in graph


def test_resnet_v2_standalone_batch_norms_are_folded():
    """preact/postnorm BNs have no conv of their own: they become one per-channel multiply-add."""
    from slimtune.export.prepare import ChannelAffine, inference_copy

    from slimtune.nets.resnet_v2 import ResNetV2

    model = ResNetV2(5, units_per_block=(1, 2, 1, 1), scope="resnet_v2_50").eval()  # a short resnet_v2
    _randomise_batch_norms(model, seed=3)
    infer, stats = inference_copy(model)
    assert stats["affine"] == 6 and stats["folded"] > 0  # 5 preacts + postnorm
    assert not any(isinstance(m, BatchNorm) for m in infer.modules())
    assert sum(isinstance(m, ChannelAffine) for m in infer.modules()) == 6
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        logits, probabilities = infer(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(probabilities, torch.softmax(expected, -1), rtol=1e-4, atol=1e-6)


def test_export_is_verified_and_a_failed_check_leaves_no_file(tmp_path, monkeypatch):
    run = write_run(tmp_path, "lenet", 28)
    real_copy = export_run.inference_copy

    def corrupted(model, multi_label=False):
        infer, stats = real_copy(model, multi_label)
        with torch.no_grad():
            infer.net.get_classifier().bias.add_(0.05)  # what a wrong fold would do to the logits
        return infer, stats

    monkeypatch.setattr(export_run, "inference_copy", corrupted)
    out = tmp_path / "model.pt"
    with pytest.raises(VerificationError, match="NOT written"):
        export(str(run), "torchscript", str(out), quiet=True)
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_multi_label_run_exports_sigmoid_probabilities(tmp_path):
    run = write_run(tmp_path, "lenet", 28, multi_label="true")
    (run / "thresholds.json").write_text(json.dumps({"thresholds": [0.3] * CLASSES}))
    out = tmp_path / "model.onnx"
    export(str(run), "onnx", str(out), quiet=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    logits, probabilities = session.run(None, {"input": x})
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["multi_label"] == "true" and json.loads(meta["thresholds"]) == [0.3] * CLASSES


def test_safetensors_export_rebuilds_from_its_sidecar(tmp_path):
    from slimtune import create_model
    from safetensors.torch import load_file

    run = write_run(tmp_path, "cifarnet", 32)
    out = tmp_path / "weights.safetensors"
    result = export(str(run), "safetensors", str(out), quiet=True)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert result.extra_files == [out.with_suffix(".json")]
    model = create_model(sidecar["create_model"]["name"], num_classes=sidecar["create_model"]["num_classes"],
                         image_size=sidecar["image_size"])
    model.load_state_dict(load_file(str(out)))
    original = load_file(str(run / "model.ckpt-3.safetensors"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)


def test_command_prints_the_check_and_a_json_summary(tmp_path, capsys):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet.onnx"
    assert main(["export", "--checkpoint_path", str(run), "--format", "onnx", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "verified in onnxruntime on 4 images: max |diff|" in captured.err
    summary = json.loads(captured.out)
    assert summary["output"] == str(out) and summary["max_abs_diff"] <= 1e-4 * summary["largest_logit"]


def test_flags_override_the_saved_config(tmp_path):
    run = write_run(tmp_path, "lenet", 28)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i}:name{i}\n" for i in range(CLASSES)))
    out = tmp_path / "m.onnx"
    export(str(run), "onnx", str(out), labels_file=str(labels), preprocessing_name="lenet", quiet=True)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == [f"name{i}" for i in range(CLASSES)]


def test_bad_input_is_one_line(tmp_path, capsys):
    run = write_run(tmp_path, "lenet", 28)
    assert main(["export", "--checkpoint_path", str(run), "--format", "frozen-graph", "--output", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in FORMATS)
    # A checkpoint without a saved config (a bare weights file) asks for the network and the class count.
    bare = tmp_path / "bare.safetensors"
    model = get_model_spec("lenet").build(CLASSES)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    assert main(["export", "--checkpoint_path", str(bare), "--format", "onnx", "--output", str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--model_name" in err and "--num_classes" in err and err.count("\n") == 1
    # With them given, the same file exports.
    assert main(["export", "--checkpoint_path", str(bare), "--format", "torchscript", "--output",
                 str(tmp_path / "b.pt"), "--model_name", "lenet", "--num_classes", str(CLASSES)]) == 0


def test_missing_tflite_dependency_names_the_extra(tmp_path, capsys):
    try:
        import litert_torch  # noqa: F401
        pytest.skip("litert-torch is installed here")
    except ImportError:
        pass
    run = write_run(tmp_path, "lenet", 28)
    assert main(["export", "--checkpoint_path", str(run), "--format", "tflite", "--output", str(tmp_path / "m.tflite")]) == 2
    err = capsys.readouterr().err
    assert "slimtune[tflite]" in err and err.count("\n") == 1


def _photo_files(folder: Path) -> list[str]:
    from PIL import Image

    from conftest import skimage_photos

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, photo in skimage_photos().items():
        path = folder / f"{name}.png"
        Image.fromarray(photo).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("multi_label", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_predict_with_exported_onnx_matches_the_checkpoint(tmp_path, capsys, multi_label):
    from slimtune.predict import predict

    run = write_run(tmp_path, "cifarnet", 32, multi_label=str(multi_label).lower())
    if multi_label:
        (run / "thresholds.json").write_text(json.dumps({"thresholds": [0.45 + 0.01 * i for i in range(CLASSES)]}))
    out = tmp_path / "cifarnet.onnx"
    export(str(run), "onnx", str(out), quiet=True)
    images = _photo_files(tmp_path / "photos")
    expected = predict(str(run), images, top_k=3, device="cpu")
    actual = predict(None, images, model=str(out), top_k=3, batch_size=2)
    assert [p.path for p in actual] == [p.path for p in expected]
    for got, want in zip(actual, expected):
        assert [label["index"] for label in got.labels] == [label["index"] for label in want.labels]
        assert [label["name"] for label in got.labels] == [label["name"] for label in want.labels]
        np.testing.assert_allclose([label["probability"] for label in got.labels],
                                   [label["probability"] for label in want.labels], atol=2e-6)
    assert main(["predict", "--model", str(out), "--format", "json", "--top_k", "2", *images]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == images


def test_predict_model_bad_input_is_one_line(tmp_path, capsys):
    images = _photo_files(tmp_path / "photos")[:1]
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not an onnx file at all")
    for argv in (["predict", "--model", str(bogus), *images],
                 ["predict", "--model", str(tmp_path / "missing.onnx"), *images],
                 ["predict", *images]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("slimtune: error:") and err.count("\n") == 1


def test_exported_program_export_is_verified(tmp_path):
    run = write_run(tmp_path, "lenet", 28)
    out = tmp_path / "lenet.pt2"
    result = export(str(run), "exported-program", str(out), quiet=True)
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    extra = {"slimtune.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    assert json.loads(extra["slimtune.json"])["num_classes"] == str(CLASSES)
    x = torch.randn(3, 1, 28, 28)
    logits, probabilities = program.module()(x)
    torch.testing.assert_close(probabilities, torch.softmax(logits, -1))


class _NetWithAuxHead(torch.nn.Module):
    """A slim-style net with an auxiliary head under classifier_scopes[1] (like InceptionV3/AuxLogits)."""

    classifier_scopes = ("Net/Logits", "Net/AuxLogits")

    def __init__(self, aux_in_eval: bool) -> None:
        super().__init__()
        self.aux_in_eval = aux_in_eval
        self.Net = torch.nn.Module()
        self.Net.Conv = torch.nn.Conv2d(3, 8, 3)
        self.Net.Logits = torch.nn.Linear(8, 5)
        self.Net.AuxLogits = torch.nn.Linear(8, 5)
        self.Net.Dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        features = torch.relu(self.Net.Conv(x)).mean(dim=(2, 3))
        if self.training or self.aux_in_eval:  # what a training-only branch looks like
            self.aux = self.Net.AuxLogits(features)
        return self.Net.Logits(self.Net.Dropout(features))


@pytest.mark.parametrize("aux_in_eval", [False, True])
def test_auxiliary_heads_and_dropout_are_left_out_of_the_exported_graph(tmp_path, aux_in_eval):
    from slimtune.export import formats
    from slimtune.export.prepare import ExportSource
    from slimtune.export.run import _inference_model

    torch.manual_seed(0)
    net = _NetWithAuxHead(aux_in_eval).eval()
    source = ExportSource(model=net, spec=get_model_spec("lenet"), model_name="aux", num_classes=5, image_size=16,
                          preprocessing="inception")
    x = torch.randn(3, 3, 16, 16)
    infer, stats = _inference_model(source, x)
    assert stats["dropout_removed"] == 1
    assert stats["aux_heads_removed"] == (0 if aux_in_eval else 1)  # kept (then dead code) when eval needs it
    out = tmp_path / "aux.onnx"
    formats.write_onnx(infer, x[:2], out, {"k": "v"})
    model = onnx.load(str(out))
    ops = {node.op_type for node in model.graph.node}
    assert "Dropout" not in ops
    assert sum(node.op_type == "Gemm" or node.op_type == "MatMul" for node in model.graph.node) == 1  # main head only
    with torch.no_grad():
        expected = net(x).numpy()
    got = formats.load_onnx(out)(x.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_graphs_run_channels_last_on_an_nchw_input(fmt, tmp_path):
    run = write_run(tmp_path, "cifarnet", 32)
    out = tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2")
    result = export(str(run), fmt, str(out), quiet=True)
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    module = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), ConvInputLayouts() as layouts:
        logits, _ = module(x)
    assert layouts.all_channels_last()
    assert logits.shape == (3, CLASSES)
