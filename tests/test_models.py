"""The model contract (see `slimtune.nets`), checked on every registered net, present and future.

Each test is parametrized over `list_models()`, so a net registered tomorrow is checked without
editing this file. Structure (names, shapes, gradient flow, end-point order) is checked on the
meta device, which builds and runs even a 60M-parameter ResNet-200 in well under a second; value
identities (forward == forward_head(forward_features)) run on CPU for the nets under
`VALUE_TEST_MAX_PARAMS` parameters and with `-m slow` for the rest.

Slim variable names come from the TF-made goldens' headers (tests/golden/*.npz, written by
tools/tf_reference/make_parity_fixtures.py from slim's own graph), so the naming rule is checked
against TF, not against slimtune's own converter.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.nets import SlimNet, create_model, get_model_spec, list_models
from parity_support import slim_to_torch_name_and_shape

GOLDEN_DIR = Path(__file__).parent / "golden"
BATCH = 2
# Above this many parameters a CPU build plus a forward pass costs seconds on two cores.
VALUE_TEST_MAX_PARAMS = 10_000_000

# The documented naming rule, written out here independently of slimtune.checkpoint.names.


def _meta(name: str, num_classes: int | None = None, **kwargs) -> SlimNet:
    """A net without storage: names, shapes and autograd structure at no cost."""
    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **kwargs)


@functools.lru_cache(maxsize=None)
def _built(name: str, num_classes: int | None = None) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(class name, state_dict names -> shapes in order) of a fresh meta build, built once."""
    model = _meta(name, num_classes)
    return type(model).__qualname__, {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _shapes(name: str, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    return _built(name, num_classes)[1]


def _param_count(name: str) -> int:
    return sum(int(np.prod(shape)) for shape in _shapes(name).values())


def _value_test_names() -> set[str]:
    """One net per network class (its smallest variant) runs on CPU by default; the rest, and
    anything above VALUE_TEST_MAX_PARAMS, run with -m slow (the same code with other widths)."""
    smallest: dict[str, str] = {}
    for name in list_models():
        family = _built(name)[0]
        if family not in smallest or _param_count(name) < _param_count(smallest[family]):
            smallest[family] = name
    return {name for name in smallest.values() if _param_count(name) <= VALUE_TEST_MAX_PARAMS}


def _input_size(name: str) -> int:
    """The smallest input every contract check can use: the net's own size when its parameter
    shapes follow the input (lenet, cifarnet), else its smallest accepted size (at least 32)."""
    spec = get_model_spec(name)
    if spec.sized_by_input:
        return spec.default_image_size
    return max(spec.min_image_size, 32)


def _images(name: str, device: str = "meta") -> torch.Tensor:
    spec, size = get_model_spec(name), _input_size(name)
    if device == "meta":
        return torch.empty(BATCH, spec.in_channels, size, size, device="meta")
    generator = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, spec.in_channels, size, size, generator=generator) * 2 - 1


NAMES = list_models()
_DEFAULT_VALUE_TESTS = _value_test_names()


def _value_param(name: str):
    slow = name not in _DEFAULT_VALUE_TESTS
    return pytest.param(name, marks=[pytest.mark.slow] if slow else [], id=name)




def _golden_header(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return json.loads(data["header"].tobytes().decode("utf-8"))


GOLDENS = sorted(path for path in GOLDEN_DIR.glob("*.npz"))


# ------------------------------------------------------------------------------------------------
# Registration.

@pytest.mark.parametrize("name", NAMES)
def test_registry_records_what_the_front_door_needs(name):
    """Scope, image size, preprocessing, classes, classifier scopes and first conv, all consistent
    with the built net."""
    spec = get_model_spec(name)
    model = _meta(name)
    assert isinstance(model, SlimNet)
    assert model.spec is spec and model.scope == spec.scope
    assert spec.default_image_size >= spec.min_image_size >= 1
    assert spec.checkpoint_num_classes > 0 and model.num_classes == spec.checkpoint_num_classes
    assert spec.preprocessing
    assert spec.classifier_scopes, "register the scopes holding the classifier heads"
    assert tuple(model.classifier_scopes) == tuple(spec.classifier_scopes)
    # The main classifier layer lies inside the main head scope.
    main = spec.classifier_scopes[0]
    assert model.classifier_scope == main or model.classifier_scope.startswith(main + "/")
    first_conv = model.get_submodule(spec.first_conv.replace("/", "."))
    assert first_conv.in_channels == spec.in_channels  # what in_chans adapts


# ------------------------------------------------------------------------------------------------
# Structure on the meta device.

@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_reach_every_trainable_parameter(name):
    """Training mode, logits [N, classes]; every parameter that requires grad gets one (the
    auxiliary heads' through AuxLogits, as training's aux loss reaches them)."""
    model = _meta(name).train()
    logits, end_points = model(_images(name), with_end_points=True)
    assert tuple(logits.shape) == (BATCH, model.num_classes)
    # Auxiliary heads train through their own loss (train/losses.py): sum their logits too.
    loss = logits.sum() + (end_points["AuxLogits"].sum() if "AuxLogits" in end_points else 0)
    loss.backward()
    missing = [key for key, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_headless_net_returns_pooled_features_and_has_no_head(name):
    """num_classes=0: [N, num_features], no classifier-head variables, get_classifier() is Identity."""
    model = _meta(name, num_classes=0).eval()
    features = model(_images(name))
    assert tuple(features.shape) == (BATCH, model.num_features)
    assert model.num_features > 0
    assert isinstance(model.get_classifier(), nn.Identity)
    keys = list(model.state_dict())
    for scope in model.classifier_scopes:
        prefix = scope.replace("/", ".") + "."
        assert not any(key.startswith(prefix) for key in keys), f"headless net keeps {scope}"


@pytest.mark.parametrize("name", NAMES)
def test_uniform_entry_points(name):
    """forward_features(x), forward_head(features, pre_logits), forward(x, with_end_points): one
    signature on every net, and the shapes they promise."""
    model = _meta(name).eval()
    assert list(inspect.signature(model.forward_features).parameters) == ["x"]
    assert list(inspect.signature(model.forward_head).parameters) == ["features", "pre_logits"]
    images = _images(name)
    features = model.forward_features(images)
    assert features.shape[0] == BATCH
    assert tuple(model.forward_head(features).shape) == (BATCH, model.num_classes)
    assert tuple(model.forward_head(features, pre_logits=True).shape) == (BATCH, model.num_features)
    out, end_points = model(images, with_end_points=True)
    assert tuple(out.shape) == (BATCH, model.num_classes)
    # slim returns logits that are also one of its end points.
    assert any(value is out for value in end_points.values())


@pytest.mark.parametrize("name", NAMES)
def test_end_points_come_in_a_stable_order(name):
    """The same names in the same order on every call; the body's end points first, then the head's."""
    model = _meta(name).eval()
    images = _images(name)
    _, first = model.forward_endpoints(images)
    _, second = model.forward_endpoints(images)
    assert list(first) == list(second) and len(first) > 1
    body: dict = {}
    model._forward_features(images, body)
    assert list(first)[:len(body)] == list(body) and len(body) < len(first)


@pytest.mark.parametrize("name", NAMES)
def test_classifier_scopes_hold_the_heads(name):
    """Every registered head scope has variables, and only the classifier layer's rows are classes."""
    model = _meta(name, num_classes=17)
    keys = list(model.state_dict())
    for scope in model.classifier_scopes:
        prefix = scope.replace("/", ".") + "."
        assert any(key.startswith(prefix) for key in keys), f"{scope} has no variables"
    classifier = model.get_classifier()
    assert classifier is model.get_submodule(model.classifier_scope.replace("/", "."))
    assert classifier.weight.shape[0] == 17


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_slims_scope_names(name):
    """reset_classifier(n) gives exactly the variables (names, shapes) of a net built for n classes,
    and reset_classifier(0) those of a headless one; the new head stays on the body's device."""
    model = _meta(name)
    for classes in (5, 0):
        model.reset_classifier(classes)
        assert model.num_classes == classes
        shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        assert list(shapes.items()) == list(_shapes(name, classes).items())  # slim's names and order
        assert all(p.is_meta for p in model.parameters())
    model.reset_classifier(3)
    out = model.eval()(_images(name))
    assert tuple(out.shape) == (BATCH, 3)
    assert model.get_classifier().weight.is_meta
    with pytest.raises(ConfigError, match="num_classes"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", NAMES)
def test_too_small_input_is_one_line_naming_the_smallest_size(name):
    spec = get_model_spec(name)
    if spec.min_image_size <= 1:
        pytest.skip(f"{name} accepts any input size")  # counted: nets with no minimum
    small = spec.min_image_size - 1
    if spec.sized_by_input:
        with pytest.raises(ConfigError, match=f"{spec.min_image_size}") as info:
            _meta(name, image_size=small)
    else:
        model = _meta(name)
        with pytest.raises(ConfigError, match=f"{spec.min_image_size}x{spec.min_image_size}") as info:
            model(torch.empty(1, spec.in_channels, small, small, device="meta"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# Names: the state_dict is slim's variables, through the documented rule, checked against TF.

@pytest.mark.parametrize("path", GOLDENS, ids=[path.stem for path in GOLDENS])
def test_state_dict_is_slims_variables(path):
    """Every torch tensor is a variable of slim's graph (names and converted shapes) and none is
    missing, for every golden config (headless, dense, output_stride, ... variants included)."""
    header = _golden_header(path)
    kwargs = dict(header["model_kwargs"])
    num_classes = kwargs.pop("num_classes", None) or 0
    size = header["input"]["height"]
    if get_model_spec(header["model_name"]).sized_by_input:
        kwargs["image_size"] = size
    model = _meta(header["model_name"], num_classes=num_classes, **kwargs)
    expected = dict(slim_to_torch_name_and_shape(name, shape) for name, shape in header["variables"])
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert actual == expected


def test_every_registered_family_has_a_golden_checking_its_names():
    """A net added without goldens would escape the naming check above."""
    covered = {_golden_header(path)["model_name"] for path in GOLDENS}
    scopes_covered = {get_model_spec(name).scope for name in covered if name in NAMES}
    missing = sorted({get_model_spec(name).scope for name in NAMES} - scopes_covered)
    assert not missing, f"no golden for the scopes {missing}; add them to make_parity_fixtures.py"


# ------------------------------------------------------------------------------------------------
# Values on CPU.

@pytest.mark.parametrize("name", [_value_param(name) for name in NAMES])
def test_forward_is_head_of_features_and_headless_is_pre_logits(name):
    """forward(x) == forward_head(forward_features(x)); after reset_classifier(0) forward(x) equals
    the pre_logits output; after reset_classifier(n) the body's values are unchanged."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = _images(name, device="cpu")
    with torch.no_grad():
        logits = model(images)
        features = model.forward_features(images)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert torch.isfinite(pre_logits).all()
        model.reset_classifier(0)
        torch.testing.assert_close(model(images), pre_logits, rtol=0, atol=0)
        model.reset_classifier(4)
        new_logits = model(images)
        assert new_logits.shape == (BATCH, 4) and torch.isfinite(new_logits).all()
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), pre_logits, rtol=0, atol=0)
