"""What the restore plan tells users: a summary by scope with every problem and its fix, advice that
names only flags the command accepts, a dry run that creates nothing and fails where the real run
would, and architecture differences that "auto" cannot map away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimtune import create_model
from slimtune.checkpoint.restore import FEATURES_ADVICE, LOAD_ADVICE, restore
from slimtune.cli import build_parser, main
from slimtune.errors import ConfigError, RestoreError

TRAIN = ["--model_name", "lenet", "--dataset_name", "digits", "--batch_size", "16", "--num_workers", "0",
         "--save_summaries_secs", "1e9", "--max_number_of_steps", "1"]


def _flags_of(command: str) -> set[str]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps its subparsers here
    return {option for action in sub._actions for option in action.option_strings}


def _flags_in(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z_]+)", text))


@pytest.fixture()
def five_class_lenet(tmp_path) -> Path:
    """A torch-named lenet checkpoint whose head has 5 classes (digits has 10)."""
    torch.manual_seed(1)
    path = tmp_path / "lenet5.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("lenet", num_classes=5).state_dict().items()}, str(path))
    return path


def test_dry_run_summarizes_fails_creates_nothing_and_its_fix_works(five_class_lenet, tmp_path, capsys):
    train_dir = tmp_path / "run"
    code = main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet),
                 "--dry_run", *TRAIN])
    err = capsys.readouterr().err
    assert code == 2 and not train_dir.exists()  # non-zero, nothing created
    # Counts by scope: conv1 has 2 loaded, fc4 2 mismatched (the last column).
    header = next(line for line in err.splitlines() if line.strip().startswith("by scope"))
    fc4 = next(line for line in err.splitlines() if line.strip().startswith("LeNet.fc4"))
    assert re.fullmatch(r"\s*LeNet\.conv1\s+2", next(l for l in err.splitlines() if "LeNet.conv1 " in l))
    assert fc4.rstrip().endswith("2") and len(fc4.rstrip()) == header.index("mismatched") + 1
    assert "Loaded (" not in err  # the tensor-by-tensor list is not printed without --verbose
    assert "LeNet.fc4.weight: checkpoint [5, 1024], net [10, 1024]" in err
    assert "num_samples: 1442" in err and "model: lenet" in err  # the resolved settings
    fix = re.search(r"^Fix: (.*)$", err, re.M).group(1)
    assert fix == "--checkpoint_exclude_scopes=LeNet.fc4"
    assert _flags_in(err) <= _flags_of("train")
    # The suggested fix is accepted by the dry run and by the real run.
    assert main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet),
                 "--dry_run", fix, *TRAIN]) == 0
    err = capsys.readouterr().err
    assert "No problems." in err and not train_dir.exists()


@pytest.mark.slow
def test_the_dry_runs_fix_is_accepted_by_the_real_run(five_class_lenet, tmp_path, capsys):
    train_dir = tmp_path / "run"
    assert main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet),
                 "--dry_run", *TRAIN]) == 2
    fix = re.search(r"^Fix: (.*)$", capsys.readouterr().err, re.M).group(1)
    assert main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet), fix, *TRAIN]) == 0
    err = capsys.readouterr().err
    full = (train_dir / "restore_plan.txt").read_text()
    assert f"Every tensor's fate: {train_dir / 'restore_plan.txt'}" in err and "Loaded (" not in err
    assert "Loaded (6):" in full and "Excluded (2):" in full and "LeNet.conv2.weight" in full


def test_verbose_prints_every_tensor_and_a_refused_run_keeps_the_full_plan(five_class_lenet, tmp_path, capsys):
    train_dir = tmp_path / "run"
    assert main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet),
                 "--checkpoint_exclude_scopes", "LeNet.fc4", "--verbose", "--dry_run", *TRAIN]) == 0
    assert "Loaded (6):" in capsys.readouterr().err
    assert main(["train", "--train_dir", str(train_dir), "--checkpoint_path", str(five_class_lenet), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "Fix: --checkpoint_exclude_scopes=LeNet.fc4" in err and "Loaded (" not in err
    assert "Mismatched (2):" in (train_dir / "restore_plan.txt").read_text()
    assert not list(train_dir.glob("model.ckpt-*"))


def test_features_and_eval_advice_name_only_their_own_flags(five_class_lenet, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("L", (28, 28), 128).save(image)
    code = main(["features", str(image), "--model_name", "lenet", "--num_classes", "10", "--checkpoint_path",
                 str(five_class_lenet), "--endpoint", "Flatten", "--output", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "--checkpoint_exclude_scopes" not in err and "--ignore_missing_vars" not in err
    assert "--num_classes" in err and _flags_in(err) <= _flags_of("features")
    # eval/predict rebuild the net the checkpoint names: their advice is the --model_name.
    model = create_model("lenet", num_classes=10)
    with pytest.raises(RestoreError) as info:
        restore(model, str(five_class_lenet), advice=LOAD_ADVICE)
    assert "--checkpoint_exclude_scopes" not in str(info.value) and "--model_name" in str(info.value)
    assert _flags_in(str(info.value)) <= _flags_of("eval") & _flags_of("predict") | {"--model_name"}
    assert FEATURES_ADVICE["exclude"] is None


def test_first_conv_channel_mismatch_says_set_the_input_channels(tmp_path):
    state = {k: v.clone() for k, v in create_model("lenet", num_classes=10).state_dict().items()}
    state["LeNet.conv1.weight"] = torch.randn(32, 3, 5, 5)  # a checkpoint of an RGB lenet
    plan = restore(create_model("lenet", num_classes=10), state, dry_run=True)
    (problem,) = plan.problems
    assert "first conv reads 3-channel images, the net 1-channel ones: set the net's input channels to 3" in problem
    assert "--checkpoint_exclude_scopes" not in problem and "LeNet.conv1" not in plan.fix()
    # An inner conv of another width is still a layer to exclude.
    state = {k: v.clone() for k, v in create_model("lenet", num_classes=10).state_dict().items()}
    state["LeNet.conv2.weight"] = torch.randn(64, 16, 5, 5)
    plan = restore(create_model("lenet", num_classes=10), state, dry_run=True)
    assert plan.fix() == "--checkpoint_exclude_scopes=LeNet.conv2"


def test_torchvision_resnet_into_slim_resnet_v1_is_not_no_problems():
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.resnet50(weights=None).state_dict()
    plan = restore(create_model("resnet_v1_50", num_classes=1000), state, name_map="auto", dry_run=True)
    assert plan.ok and len(plan.loaded) == 267  # every tensor pairs up by shape ...
    assert plan.checkpoint_layout == "torchvision ResNet"  # ... but the nets differ
    text = plan.summary_report()
    assert "No problems." not in text and "No problems." not in plan.report()
    for word in ("stride placement", "padding", "preprocessing"):
        assert word in text
    # The same names into a net of the same layout (torchvision's own) has nothing to say.
    same = restore(torchvision.models.resnet50(weights=None), state, dry_run=True)
    assert same.ok and not same.differences and "No problems." in same.report()


def test_a_module_fn_without_preprocessing_must_choose_one(tmp_path, capsys):
    net = tmp_path / "my_net.py"
    net.write_text("import torch.nn as nn\n\n"
                   "def tiny(num_classes, **kwargs):\n"
                   "    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))\n"
                   "tiny.default_image_size = 8\n")
    from slimtune.nets.registry import get_model_spec
    from slimtune.preprocessing import get_preprocessing

    spec = get_model_spec(f"{net}:tiny")
    with pytest.raises(ConfigError, match="--preprocessing_name"):
        get_preprocessing(spec.preprocessing, is_training=False)
    code = main(["train", "--model_name", f"{net}:tiny", "--dataset_name", "digits", "--train_dir",
                 str(tmp_path / "run"), "--num_workers", "0", "--max_number_of_steps", "1", "--dry_run"])
    err = capsys.readouterr().err
    assert code == 2 and "no preprocessing was chosen" in err and "--preprocessing_name" in err
