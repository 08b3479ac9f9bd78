"""The timm-compatible front door: create_model(name, pretrained, num_classes, checkpoint_path,
in_chans, features_only, out_indices, **kwargs).

A "published" slim checkpoint is made here the way slim ships one: a TF checkpoint named like the
tarball's contents, packed into the tarball the registry names, holding seeded weights for slim's
variable names (taken from the TF-made golden's header).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.checkpoint import write_tf_checkpoint
from slimtune.errors import ConfigError
from slimtune.nets import create_model, get_model_spec, list_models
from slimtune.testing import load_golden, seeded_slim_weights

GOLDEN_DIR = Path(__file__).parent / "golden"
NET = "mobilenet_v1_025"  # published as mobilenet_v1_0.25_224.tgz; 0.5M parameters


@pytest.fixture(scope="module")
def slim_weights() -> dict[str, np.ndarray]:
    golden = load_golden(GOLDEN_DIR / f"{NET}.npz")
    return seeded_slim_weights(golden.variables, golden.seed)


@pytest.fixture
def home(tmp_path, monkeypatch, slim_weights) -> Path:
    """$SLIMTUNE_HOME holding only slim's tarball for NET, as downloaded from the model zoo."""
    home = tmp_path / "home"
    staging = tmp_path / "staging"
    write_tf_checkpoint(staging / "mobilenet_v1_0.25_224.ckpt", slim_weights)
    home.mkdir()
    tarball = home / get_model_spec(NET).published_checkpoint
    with tarfile.open(tarball, "w:gz") as archive:
        for file in staging.iterdir():
            archive.add(file, arcname=file.name)
    monkeypatch.setenv("SLIMTUNE_HOME", str(home))
    return home


def _images(channels: int = 3, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, channels, size, size, generator=generator) * 2 - 1


def _first_kernel_oihw(slim_weights) -> np.ndarray:
    return slim_weights["MobilenetV1/Conv2d_0/weights"].transpose(3, 2, 0, 1)


# ------------------------------------------------------------------------------------------------

def test_pretrained_loads_the_published_checkpoint_from_the_local_cache(home, slim_weights):
    model = create_model(NET, pretrained=True).eval()
    kernel = model.state_dict()["MobilenetV1.Conv2d_0.weight"].numpy()
    np.testing.assert_array_equal(kernel, _first_kernel_oihw(slim_weights))
    logits = model.state_dict()["MobilenetV1.Logits.Conv2d_1c_1x1.bias"].numpy()
    np.testing.assert_array_equal(logits, slim_weights["MobilenetV1/Logits/Conv2d_1c_1x1/biases"])
    assert (home / "mobilenet_v1_0.25_224").is_dir()  # unpacked next to the tarball, once
    cfg = model.pretrained_cfg
    assert cfg["file"] == "mobilenet_v1_0.25_224.tgz" and cfg["num_classes"] == 1001 and cfg["label_offset"] == 1
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.875
    assert cfg["classifier_scopes"] == ("MobilenetV1/Logits",) and cfg["first_conv"] == "MobilenetV1/Conv2d_0"


def test_pretrained_with_new_classes_keeps_the_body_and_a_fresh_head(home, slim_weights):
    model = create_model(NET, pretrained=True, num_classes=5)
    state = model.state_dict()
    np.testing.assert_array_equal(state["MobilenetV1.Conv2d_0.weight"].numpy(), _first_kernel_oihw(slim_weights))
    assert state["MobilenetV1.Logits.Conv2d_1c_1x1.weight"].shape[0] == 5


def test_missing_pretrained_weights_name_the_tarball_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as info:
        create_model(NET, pretrained=True)
    message = str(info.value)
    assert "mobilenet_v1_0.25_224.tgz" in message and str(tmp_path / "empty") in message and "\n" not in message
    with pytest.raises(ConfigError, match=str(tmp_path / "other")):
        create_model(NET, pretrained=True, cache_dir=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="published no checkpoint"):
        create_model("resnet_v1_200", pretrained=True)


def test_in_chans_1_sums_the_rgb_kernels_so_gray_images_give_the_rgb_result(home, slim_weights):
    rgb = create_model(NET, pretrained=True).eval()
    gray = create_model(NET, pretrained=True, in_chans=1).eval()
    kernel = gray.state_dict()["MobilenetV1.Conv2d_0.weight"].numpy()
    np.testing.assert_allclose(kernel, _first_kernel_oihw(slim_weights).sum(axis=1, keepdims=True), rtol=1e-6)
    image = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    assert gray.pretrained_cfg["input_size"] == (1, 224, 224)


def test_in_chans_6_repeats_and_scales_so_equal_channels_give_the_rgb_result(home, slim_weights):
    rgb = create_model(NET, pretrained=True).eval()
    six = create_model(NET, pretrained=True, in_chans=6).eval()
    image = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(six(torch.cat([image, image], dim=1)), rgb(image), rtol=1e-4, atol=1e-5)
    four = create_model(NET, pretrained=True, in_chans=4)
    kernel = _first_kernel_oihw(slim_weights)
    np.testing.assert_allclose(four.state_dict()["MobilenetV1.Conv2d_0.weight"].numpy(),
                               np.concatenate([kernel, kernel[:, :1]], axis=1) * 3 / 4, rtol=1e-6)


def test_in_chans_adapts_a_checkpoint_path_and_builds_fresh_nets(tmp_path, slim_weights):
    path = write_tf_checkpoint(tmp_path / "model.ckpt", slim_weights)
    gray = create_model(NET, checkpoint_path=str(path), in_chans=1)
    np.testing.assert_allclose(gray.state_dict()["MobilenetV1.Conv2d_0.weight"].numpy(),
                               _first_kernel_oihw(slim_weights).sum(axis=1, keepdims=True), rtol=1e-6)
    for name in ("resnet_v1_50", "cifarnet", "lenet"):
        with torch.device("meta"):
            model = create_model(name, in_chans=2)
        first = model.get_submodule(get_model_spec(name).first_conv.replace("/", "."))
        assert first.weight.shape[1] == 2
        size = get_model_spec(name).default_image_size
        assert model(torch.empty(1, 2, size, size, device="meta")).shape == (1, model.num_classes)


def test_unknown_options_are_one_line_listing_the_accepted_ones():
    with pytest.raises(ConfigError) as info:
        create_model("resnet_v1_50", output_strid=16)
    message = str(info.value)
    assert "output_strid" in message and "output_stride" in message and "in_chans" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="unknown option"):
        create_model("vgg_16", dropout=0.5)
    with pytest.raises(ConfigError, match="not both"):
        create_model(NET, pretrained=True, checkpoint_path="x.ckpt")
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="in_chans"):
            create_model(NET, in_chans=bad)


@pytest.mark.parametrize("name", list_models())
def test_features_only_returns_the_stages_that_feature_info_describes(name):
    """Every net: maps shallow to deep, channels and reductions as listed, slim's names kept."""
    spec = get_model_spec(name)
    with torch.device("meta"):
        features = create_model(name, features_only=True)
        headless = create_model(name, num_classes=0)
    assert list(features.state_dict()) == list(headless.state_dict())
    info = features.feature_info
    assert len(info) >= 2 and info.reduction() == sorted(set(info.reduction()))
    size = spec.default_image_size
    maps = features(torch.empty(2, spec.in_channels, size, size, device="meta"))
    assert [m.shape[1] for m in maps] == info.channels()
    for feature_map, reduction in zip(maps, info.reduction()):
        assert abs(size / feature_map.shape[-1] - reduction) <= reduction / 2
    with torch.device("meta"):
        last_two = create_model(name, features_only=True, out_indices=(-2, -1))
    assert last_two.feature_info.module_names() == info.module_names()[-2:]
    with pytest.raises(ConfigError, match="out_indices"):
        with torch.device("meta"):
            create_model(name, features_only=True, out_indices=(len(info),))


def test_features_only_values_are_the_nets_end_points(home):
    model = create_model(NET, pretrained=True).eval()
    features = create_model(NET, pretrained=True, features_only=True, out_indices=(1, 3)).eval()
    images = _images()
    with torch.no_grad():
        _, end_points = model.forward_endpoints(images)
        maps = features(images)
    for feature_map, name in zip(maps, features.feature_info.module_names()):
        torch.testing.assert_close(feature_map, end_points[name], rtol=0, atol=0)
    assert features.feature_info.module_names() == ["Conv2d_3_pointwise", "Conv2d_11_pointwise"]
