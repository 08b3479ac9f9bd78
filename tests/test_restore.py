"""The restore plan: exclusions on scope boundaries, name maps, 1001/1000 heads, the report, errors."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from slimtune.checkpoint.mapping import NameMap
from slimtune.checkpoint.names import torch_to_slim, torch_to_tf_array
from slimtune.checkpoint.restore import ignored_by_design, restore
from slimtune.checkpoint.scopes import in_scope, parse_scopes, select_params
from slimtune.errors import ConfigError, RestoreError


class ConvBN(nn.Module):
    """slim.conv2d with a normalizer: a kernel and a `BatchNorm` child, no bias."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.BatchNorm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.BatchNorm(nn.functional.conv2d(x, self.weight, padding=1)))


class Depthwise(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.depthwise_weight = nn.Parameter(torch.randn(channels, 1, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)

    def forward(self, x):
        return nn.functional.conv2d(x, self.depthwise_weight, self.bias, padding=1, groups=x.shape[1])


class TinyVGG(nn.Module):
    """A vgg_16-shaped net whose state_dict keys follow slim's names ('vgg_16.conv1.conv1_1.weight')."""

    def __init__(self, num_classes=10, scope="vgg_16", fc8_2=False):
        super().__init__()
        self.scope = scope
        body = nn.Module()
        body.conv1 = nn.Module()
        body.conv1.conv1_1 = nn.Conv2d(3, 4, 3, padding=1)
        body.conv1.conv1_2 = nn.Conv2d(4, 4, 3, padding=1)
        body.conv2 = nn.Module()
        body.conv2.conv2_1 = ConvBN(4, 8)
        body.conv2.conv2_dw = Depthwise(8)
        body.fc6 = nn.Conv2d(8, 16, 2)
        body.fc7 = nn.Conv2d(16, 16, 1)
        body.fc8 = nn.Conv2d(16, num_classes, 1)
        if fc8_2:
            body.fc8_2 = nn.Conv2d(16, 3, 1)
        setattr(self, scope, body)

    def forward(self, x):
        b = getattr(self, self.scope)
        x = torch.relu(b.conv1.conv1_2(torch.relu(b.conv1.conv1_1(x))))
        x = nn.functional.max_pool2d(x, 2)
        x = nn.functional.max_pool2d(b.conv2.conv2_dw(b.conv2.conv2_1(x)), 2)
        x = torch.relu(b.fc7(torch.relu(b.fc6(x))))
        return b.fc8(x).flatten(1)


def slim_checkpoint(model: nn.Module, scope_from=None, scope_to=None) -> dict:
    """The model's weights as slim would have saved them: slim names, TF layouts, numpy."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        name = torch_to_slim(key)
        if scope_from:
            name = name.replace(scope_from + "/", scope_to + "/", 1)
        out[name] = torch_to_tf_array(key, value.numpy())
    return out


def params_equal(a: nn.Module, b: nn.Module, skip=()):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()
               if not k.endswith("num_batches_tracked") and not any(s in k for s in skip))


def randomize_bn(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)


@pytest.fixture
def source():
    torch.manual_seed(0)
    model = TinyVGG(num_classes=10).eval()
    randomize_bn(model)
    return model


def test_slim_checkpoint_restores_exactly_and_computes_the_same(source):
    torch.manual_seed(1)
    target = TinyVGG(num_classes=10).eval()
    plan = restore(target, slim_checkpoint(source))
    assert plan.ok and plan.applied
    assert len(plan.loaded) == 17 and not plan.missing and not plan.unused
    assert params_equal(source, target)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(target(x), source(x))


def test_restore_from_a_tf_checkpoint_file(source, tmp_path):
    from slimtune.checkpoint import write_tf_checkpoint

    prefix = write_tf_checkpoint(tmp_path / "model.ckpt", slim_checkpoint(source), version=2)
    target = TinyVGG(num_classes=10)
    plan = restore(target, str(prefix))
    assert plan.ok and str(prefix) in plan.source
    assert params_equal(source, target)


def test_exclude_scopes_match_on_boundaries(source):
    torch.manual_seed(2)
    ckpt = slim_checkpoint(TinyVGG(num_classes=10, fc8_2=True))
    for spelling in ("vgg_16/fc8", "vgg_16.fc8", "fc8", " vgg_16/fc8 ,"):
        target = TinyVGG(num_classes=10, fc8_2=True)
        before = target.vgg_16.fc8.weight.detach().clone()
        plan = restore(target, ckpt, exclude_scopes=spelling)
        assert sorted(f.model_name for f in plan.excluded) == ["vgg_16.fc8.bias", "vgg_16.fc8.weight"], spelling
        assert torch.equal(target.vgg_16.fc8.weight, before)
        assert any(f.model_name == "vgg_16.fc8_2.weight" for f in plan.loaded)
        assert torch.equal(target.vgg_16.fc8_2.weight, torch.from_numpy(ckpt["vgg_16/fc8_2/weights"]).permute(3, 2, 0, 1))


def test_unknown_exclude_scope_names_the_nearest(source):
    with pytest.raises(ConfigError, match=r"'vgg_16/fc9'.*vgg_16/fc8"):
        restore(TinyVGG(), slim_checkpoint(source), exclude_scopes="vgg_16/fc9")


def test_shape_mismatch_raises_with_the_fix_and_loads_nothing(source):
    target = TinyVGG(num_classes=20)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RestoreError) as info:
        restore(target, slim_checkpoint(source))
    message = str(info.value)
    assert "vgg_16/fc8/biases: checkpoint [10], net [20]: add --checkpoint_exclude_scopes=vgg_16/fc8" in message
    assert "Fix: --checkpoint_exclude_scopes=vgg_16/fc8" in message
    assert not info.value.plan.ok and len(info.value.plan.mismatched) == 2
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    plan = restore(target, slim_checkpoint(source), exclude_scopes=["vgg_16/fc8"])
    assert plan.ok and len(plan.excluded) == 2 and plan.applied


def test_dry_run_loads_nothing_and_reports(source):
    target = TinyVGG(num_classes=20)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    plan = restore(target, slim_checkpoint(source), dry_run=True)
    assert not plan.ok and not plan.applied and plan.dry_run
    assert "dry run" in str(plan)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_tensors_need_ignore_missing_vars(source):
    ckpt = slim_checkpoint(source)
    del ckpt["vgg_16/conv2/conv2_1/BatchNorm/moving_variance"]
    target = TinyVGG()
    with pytest.raises(RestoreError, match="--ignore_missing_vars or check --checkpoint_name_map"):
        restore(target, ckpt)
    plan = restore(target, ckpt, ignore_missing_vars=True)
    assert plan.ok and [f.model_name for f in plan.missing] == ["vgg_16.conv2.conv2_1.BatchNorm.running_var"]
    assert torch.equal(target.vgg_16.fc7.weight, source.vgg_16.fc7.weight)


def test_a_checkpoint_of_another_net_is_a_problem_even_when_ignoring_missing():
    ckpt = {"resnet_v1_50/conv1/weights": np.zeros((7, 7, 3, 64), np.float32)}
    plan = restore(TinyVGG(), ckpt, ignore_missing_vars=True, dry_run=True)
    assert not plan.ok and any("no checkpoint tensor matched" in p for p in plan.problems)
    assert [t.name for t in plan.unused] == ["resnet_v1_50/conv1/weights"]


def test_optimizer_slots_and_counters_are_ignored_by_design(source):
    ckpt = slim_checkpoint(source)
    extras = {
        "global_step": np.array(1000, np.int64),
        "vgg_16/fc8/weights/Momentum": ckpt["vgg_16/fc8/weights"],
        "vgg_16/fc7/biases/RMSProp_1": ckpt["vgg_16/fc7/biases"],
        "vgg_16/fc7/biases/ExponentialMovingAverage": ckpt["vgg_16/fc7/biases"],
        "beta1_power": np.array(0.9, np.float32),
        "vgg_16/fc6/weights/Adam_1": ckpt["vgg_16/fc6/weights"],
        "some_other_net/conv/weights": np.zeros((1, 1, 2, 2), np.float32),
    }
    plan = restore(TinyVGG(), {**ckpt, **extras})
    assert plan.ok
    reasons = {t.name: t.reason for t in plan.ignored}
    assert reasons == {"global_step": "step counter", "vgg_16/fc8/weights/Momentum": "optimizer slot",
                       "vgg_16/fc7/biases/RMSProp_1": "optimizer slot", "beta1_power": "optimizer slot",
                       "vgg_16/fc7/biases/ExponentialMovingAverage": "EMA shadow",
                       "vgg_16/fc6/weights/Adam_1": "optimizer slot"}
    assert [t.name for t in plan.unused] == ["some_other_net/conv/weights"]
    report = str(plan)
    assert "  ignored     6   optimizer slots" in report and "  unused      1   checkpoint tensors" in report
    assert ignored_by_design("vgg_16/fc8/weights") is None


def test_background_row_dropped_for_a_1001_class_checkpoint():
    torch.manual_seed(3)
    src = TinyVGG(num_classes=1001)
    target = TinyVGG(num_classes=1000)
    plan = restore(target, slim_checkpoint(src))
    assert plan.ok and len(plan.adapted) == 2
    assert torch.equal(target.vgg_16.fc8.weight, src.vgg_16.fc8.weight[1:])
    assert torch.equal(target.vgg_16.fc8.bias, src.vgg_16.fc8.bias[1:])
    assert "dropped background row 0" in str(plan)


def test_background_row_added_for_a_1000_class_checkpoint():
    torch.manual_seed(4)
    src = TinyVGG(num_classes=1000)
    target = TinyVGG(num_classes=1001)
    plan = restore(target, slim_checkpoint(src))
    assert plan.ok and len(plan.adapted) == 2
    assert torch.equal(target.vgg_16.fc8.weight[1:], src.vgg_16.fc8.weight)
    assert torch.count_nonzero(target.vgg_16.fc8.weight[0]) == 0 and target.vgg_16.fc8.bias[0] == 0
    assert "added zero background row 0" in str(plan)


def test_torch_state_dicts_with_wrappers_load_directly(source):
    state = {"module." + k: v.clone() for k, v in source.state_dict().items()}
    target = TinyVGG()
    compiled_like = nn.Module()
    compiled_like._orig_mod = target  # torch.compile's wrapper naming
    plan = restore(compiled_like, state)
    assert plan.ok and plan.spelling == "torch"
    assert params_equal(source, target)
    assert [t.reason for t in plan.ignored] == ["BatchNorm step counter"]


def test_prefix_rule_maps_the_model_scope_onto_the_checkpoint_scope(source):
    target = TinyVGG(scope="ssd_vgg_512")
    ckpt = slim_checkpoint(source)
    with pytest.raises(RestoreError):
        restore(target, ckpt)
    plan = restore(target, ckpt, name_map=["ssd_vgg_512/=vgg_16/"])
    assert plan.ok
    assert torch.equal(target.ssd_vgg_512.fc7.weight, source.vgg_16.fc7.weight)
    assert "rule ssd_vgg_512/=vgg_16/" in str(plan)
    # the torch spelling of the same rule works on a slim checkpoint too
    assert restore(TinyVGG(scope="ssd_vgg_512"), ckpt, name_map="ssd_vgg_512.=vgg_16.").ok


def test_regex_rule(source):
    ckpt = {re.sub(r"^vgg_16/conv(\d)/", r"vgg_16/block\1/", k): v for k, v in slim_checkpoint(source).items()}
    target = TinyVGG()
    plan = restore(target, ckpt, name_map=[r"re:^vgg_16/conv(\d)/=vgg_16/block\1/"])
    assert plan.ok
    assert torch.equal(target.vgg_16.conv1.conv1_2.weight, source.vgg_16.conv1.conv1_2.weight)


def test_name_map_parsing_and_application():
    name_map = NameMap.parse(["ssd_vgg_512/=vgg_16/", r"re:^net/unit_(\d+)/=resnet/block\1/", "fc8=logits", "auto"])
    assert name_map.auto and len(name_map.rules) == 3
    assert name_map.apply("ssd_vgg_512/conv1/conv1_1/weights") == "vgg_16/conv1/conv1_1/weights"
    assert name_map.apply("net/unit_3/conv/weights") == "resnet/block3/conv/weights"
    assert name_map.apply("fc8/weights") == "logits/weights"
    assert name_map.apply("fc8_2/weights") == "fc8_2/weights"  # prefixes stop at scope boundaries
    assert name_map.apply("untouched/weights") == "untouched/weights"
    assert NameMap.parse("re:^a(?=b)=c").apply("ab") == "cb"  # split at the last '='
    for bad in ("no_equals_sign", "a=b=c", "re:(unclosed=x"):
        with pytest.raises(ConfigError):
            NameMap.parse([bad])


def test_report_groups_every_tensor_and_aligns_columns(source):
    plan = restore(TinyVGG(num_classes=20), slim_checkpoint(source), exclude_scopes="vgg_16/fc7", dry_run=True)
    report = str(plan)
    lines = report.splitlines()
    assert lines[0].startswith("Restore plan: <dict of 17 tensors> -> TinyVGG (slim names, TF layout)")
    for label, count in (("loaded", 13), ("excluded", 2), ("missing", 0), ("mismatched", 2)):
        assert f"  {label:<11}{count:>2}" in lines
    assert "Loaded (13):" in report and "Excluded (2):" in report and "Mismatched (2):" in report
    assert report.rstrip().endswith("Fix: --checkpoint_exclude_scopes=vgg_16/fc7,vgg_16/fc8")
    loaded_rows = lines[lines.index("Loaded (13):") + 1: lines.index("Loaded (13):") + 14]
    assert len({row.index("net [") for row in loaded_rows}) == 1  # one column for the shapes


def test_parse_scopes_and_boundaries():
    assert parse_scopes(" vgg_16/fc8 , vgg_16.fc7/,,") == ["vgg_16.fc8", "vgg_16.fc7"]
    assert parse_scopes(["a/b,c", "d"]) == ["a.b", "c", "d"]
    assert parse_scopes(None) == [] and parse_scopes("") == []
    assert in_scope("vgg_16/fc8/weights", "vgg_16/fc8")
    assert in_scope("vgg_16.fc8.weight", "vgg_16/fc8")
    assert not in_scope("vgg_16.fc8_2.weight", "vgg_16/fc8")
    assert in_scope("vgg_16.fc8.weight", "fc8", net_scope="vgg_16")
    assert not in_scope("vgg_16.fc8.weight", "fc8")
    assert in_scope("vgg_16.fc8.weight", "vgg_16/fc8/weights")


def test_select_params_for_trainable_scopes():
    model = TinyVGG(fc8_2=True)
    assert select_params(model, "vgg_16/fc8") == ["vgg_16.fc8.weight", "vgg_16.fc8.bias"]
    assert select_params(model, "fc7,conv2/conv2_1") == [
        "vgg_16.conv2.conv2_1.weight", "vgg_16.conv2.conv2_1.BatchNorm.weight",
        "vgg_16.conv2.conv2_1.BatchNorm.bias", "vgg_16.fc7.weight", "vgg_16.fc7.bias"]
    with pytest.raises(ConfigError, match="--trainable_scopes: scope 'vgg_16/fc_8'.*vgg_16/fc8"):
        select_params(model, "vgg_16/fc_8")


def test_a_read_error_part_way_leaves_the_model_untouched(source, tmp_path):
    """A corrupt tensor late in the file must not leave the net half restored."""
    from slimtune.checkpoint import write_tf_checkpoint
    from slimtune.errors import CheckpointError

    prefix = write_tf_checkpoint(tmp_path / "model.ckpt", slim_checkpoint(source), version=2)
    data = next(tmp_path.glob("model.ckpt.data-*"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x40  # a value byte of the tensor stored last: its crc32c no longer matches
    data.write_bytes(bytes(raw))
    target = TinyVGG(num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError):
        restore(target, str(prefix))
    changed = [k for k, v in target.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == []
