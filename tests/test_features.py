"""End-point feature extraction and the feature files."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from slimtune.errors import ConfigError, DataError
from slimtune.features import endpoint_names, extract_features, read_features, write_features


class TwoLayerNet(nn.Module):
    """A net with slim's signature: forward_endpoints -> (logits, end_points)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 5)

    def forward_endpoints(self, x):
        end_points = OrderedDict()
        net = torch.relu(self.conv(x))
        end_points["Net/conv1"] = net
        net = net.mean(dim=(2, 3))
        end_points["global_pool"] = net
        logits = self.fc(self.drop(net))
        end_points["Logits"] = logits
        return logits, end_points


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 6, 6, generator=generator) for _ in range(7)]


def test_extracts_an_end_point_in_batches_in_eval_mode(images):
    net = TwoLayerNet().train()
    features = extract_features(net, "global_pool", images, batch_size=3)
    assert features.shape == (7, 4) and features.dtype == torch.float32
    expected = torch.relu(net.conv(torch.stack(images))).mean(dim=(2, 3)).detach()
    torch.testing.assert_close(features, expected)
    assert net.training  # the caller's mode comes back
    # dropout was off: logits are deterministic
    a = extract_features(net, "Logits", images, batch_size=2)
    torch.testing.assert_close(a, extract_features(net, "Logits", images, batch_size=7))


def test_single_images_and_batches_mix(images):
    net = TwoLayerNet()
    mixed = [images[0], torch.stack(images[1:5]), images[5], torch.stack(images[6:])]
    torch.testing.assert_close(extract_features(net, "Net/conv1", mixed, batch_size=4),
                               extract_features(net, "Net/conv1", images, batch_size=4))
    pairs = [(img, 0) for img in images]  # (image, label) pairs from a dataset
    assert extract_features(net, "Net.conv1", pairs).shape == (7, 4, 6, 6)


def test_unknown_end_point_lists_the_nearest_and_the_available_ones(images):
    with pytest.raises(ConfigError, match=r"no end point 'Logit' \(nearest: Logits\); its end points are "
                                          r"Net/conv1, global_pool, Logits"):
        extract_features(TwoLayerNet(), "Logit", images)
    assert endpoint_names(TwoLayerNet(), images[0]) == ["Net/conv1", "global_pool", "Logits"]


def test_a_short_end_point_name_resolves_under_the_nets_scope(images):
    net = TwoLayerNet()
    net.scope = "Net"
    torch.testing.assert_close(extract_features(net, "conv1", images), extract_features(net, "Net/conv1", images))
    del net.scope  # without a scope, the one end point ending in /conv1 is still found
    torch.testing.assert_close(extract_features(net, "conv1", images), extract_features(net, "Net/conv1", images))


def test_needs_forward_endpoints_and_tensors(images):
    with pytest.raises(ConfigError, match="forward_endpoints"):
        extract_features(nn.Linear(2, 2), "x", images)
    with pytest.raises(ConfigError, match=r"\[C, H, W\]"):
        extract_features(TwoLayerNet(), "Logits", [np.zeros((3, 6, 6))])
    with pytest.raises(DataError):
        extract_features(TwoLayerNet(), "Logits", [])


def test_npy_with_a_sidecar_of_paths(tmp_path, images):
    features = extract_features(TwoLayerNet(), "global_pool", images)
    paths = [f"img/{i}.jpg" for i in range(7)]
    written = write_features(tmp_path / "out" / "feats.npy", features, paths, endpoint="global_pool")
    assert [p.name for p in written] == ["feats.npy", "feats.json"]
    sidecar = json.loads((tmp_path / "out" / "feats.json").read_text())
    assert sidecar == {"endpoint": "global_pool", "shape": [7, 4], "image_paths": paths}
    array, read_paths = read_features(tmp_path / "out" / "feats.npy")
    np.testing.assert_array_equal(array, features.numpy())
    assert read_paths == paths


def test_safetensors_with_paths_in_metadata(tmp_path, images):
    from safetensors import safe_open

    features = extract_features(TwoLayerNet(), "Net/conv1", images)
    paths = [f"/data/cats/{i}.png" for i in range(7)]
    write_features(tmp_path / "feats.safetensors", features, paths, endpoint="Net/conv1")
    with safe_open(str(tmp_path / "feats.safetensors"), framework="numpy") as handle:
        assert handle.metadata()["endpoint"] == "Net/conv1"
    array, read_paths = read_features(tmp_path / "feats.safetensors")
    np.testing.assert_array_equal(array, features.numpy())
    assert read_paths == paths


def test_write_checks_counts_and_format(tmp_path):
    with pytest.raises(DataError, match="3 feature rows but 2 image paths"):
        write_features(tmp_path / "f.npy", np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(ConfigError, match=r"\.npy or \.safetensors"):
        write_features(tmp_path / "f.csv", np.zeros((2, 2)), ["a", "b"])
