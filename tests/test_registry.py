"""The model registry: one decorator, user networks from files or modules, create_model, listing."""

from __future__ import annotations

import textwrap

import pytest
import torch

import slimtune
from slimtune.cli import main
from slimtune.errors import ModelNotFoundError
from slimtune.nets.registry import get_model_spec


def test_create_model_gives_logits_end_points_and_headless_features():
    model = slimtune.create_model("lenet", num_classes=7).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, end_points = model.forward_endpoints(x)
    assert logits.shape == (3, 7)
    assert list(end_points)[:4] == ["conv1", "pool1", "conv2", "pool2"]
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(end_points["Predictions"].sum(-1), torch.ones(3))
    headless = slimtune.create_model("lenet", num_classes=0).eval()
    assert headless(x).shape == (3, 1024)


def test_default_num_classes_is_the_published_checkpoint_count():
    assert slimtune.create_model("cifarnet").num_classes == 10
    spec = get_model_spec("cifarnet")
    assert (spec.default_image_size, spec.preprocessing, spec.scope) == (32, "cifarnet", "CifarNet")


def test_parameter_names_follow_slim_variable_names():
    names = list(slimtune.create_model("cifarnet").state_dict())
    assert names[:4] == ["CifarNet.conv1.weight", "CifarNet.conv1.bias", "CifarNet.conv2.weight", "CifarNet.conv2.bias"]
    assert "CifarNet.logits.weight" in names


def test_unknown_model_suggests_the_nearest_names():
    with pytest.raises(ModelNotFoundError, match="did you mean lenet"):
        slimtune.create_model("lennet")


def test_list_models_with_glob():
    assert "lenet" in slimtune.list_models()
    assert slimtune.list_models("cifar*") == ["cifarnet"]
    assert slimtune.list_models("nothing_like_this*") == []


USER_NET = '''
import torch
from torch import nn
from slimtune import register_model
from slimtune.nets.base import SlimNet


class KK(SlimNet):
    scope = "kk_v2"

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.kk_v2 = nn.Module()
        self.kk_v2.logits = nn.Linear(12, num_classes)

    def forward_endpoints(self, x):
        logits = self.kk_v2.logits(x.mean(dim=(2, 3)).repeat(1, 4))
        return logits, {"Logits": logits}


@register_model(default_image_size=40, preprocessing="inception", checkpoint_num_classes=5, scope="kk_v2")
def kk_v2(num_classes=5, **kwargs):
    return KK(num_classes)
'''


def test_user_network_from_a_file_needs_no_package_edit(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(textwrap.dedent(USER_NET))
    model = slimtune.create_model(f"{path}:kk_v2", num_classes=3)
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 3)
    assert model.spec.default_image_size == 40 and model.spec.preprocessing == "inception"


def test_user_network_from_a_module(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(USER_NET))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = slimtune.create_model("my_pkg.nets:kk_v2")
    assert model.num_classes == 5


def test_user_network_errors_are_one_line(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no file"):
        slimtune.create_model(f"{tmp_path}/absent.py:net")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ModelNotFoundError, match="has no function 'net'"):
        slimtune.create_model(f"{tmp_path}/empty.py:net")


def test_models_command_lists_without_building_and_counts_parameters_on_request(capsys, monkeypatch):
    from slimtune.nets.registry import ModelSpec

    def no_build(*args, **kwargs):
        raise AssertionError("listing the registry must not build a network")

    with monkeypatch.context() as patch:
        patch.setattr(ModelSpec, "build", no_build)
        assert main(["models"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert main(["models", "resnet_v1_5*"]) == 0
        header, row = capsys.readouterr().out.splitlines()[:2]
    assert len(listed) == len(slimtune.list_models()) + 1
    assert header.split() == ["name", "size", "preprocessing", "classes", "top-1", "top-5", "published", "checkpoint"]
    spec = get_model_spec("resnet_v1_50")
    accuracy = ["-" if v is None else f"{v:.1f}" for v in (spec.published_top1, spec.published_top5)]
    assert row.split() == ["resnet_v1_50", "224", "vgg", "1000", *accuracy, "resnet_v1_50_2016_08_28.tar.gz"]
    assert main(["models", "lenet*", "--params"]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "params" in header.split() and "3.27M" in row


def test_unknown_model_on_the_command_line_is_one_line_without_traceback(capsys, tmp_path):
    assert main(["train", "--model_name", "resnet_v1_5O", "--train_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimtune: error: unknown model") and "Traceback" not in err
