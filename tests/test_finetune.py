"""The seeds' fine-tuning workflow as flags: restore all but the logits, train only the logits.

A slim-named resnet_v1_50 checkpoint (1000 classes, TF V1 format like the published
resnet_v1_50_2016_08_28) is made from seeded weights; training on a real-photo cats-vs-dogs folder
must restore everything but the logits, keep every frozen tensor (BatchNorm statistics included)
and change only the new 2-way layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimtune import create_model
from slimtune.checkpoint import write_tf_checkpoint
from slimtune.checkpoint.names import slim_to_torch, tf_to_torch_array
from slimtune.cli import main
from slimtune.testing import load_golden, seeded_slim_weights

GOLDEN = Path(__file__).parent / "golden" / "resnet_v1_50.npz"
TRAIN_FLAGS = ["--model_name", "resnet_v1_50", "--train_image_size", "64", "--batch_size", "4",
               "--max_number_of_steps", "3", "--num_workers", "0", "--optimizer", "momentum",
               "--learning_rate", "0.01", "--save_summaries_secs", "1e9"]


@pytest.fixture(scope="module")
def slim_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    weights = seeded_slim_weights(load_golden(GOLDEN).variables, seed=5)
    path = write_tf_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet_v1_50.ckpt", weights, version=1)
    return path, weights


def test_fine_tune_restores_all_but_logits_and_trains_only_logits(slim_checkpoint, cats_vs_dogs, tmp_path, capsys):
    path, weights = slim_checkpoint
    code = main(["train", "--dataset_dir", str(cats_vs_dogs), "--train_dir", str(tmp_path), "--checkpoint_path",
                 str(path), "--checkpoint_exclude_scopes", "resnet_v1_50/logits", "--trainable_scopes",
                 "resnet_v1_50/logits", *TRAIN_FLAGS])
    assert code == 0
    err = capsys.readouterr().err
    assert "excluded" in err and "resnet_v1_50/logits" in err  # the restore plan was shown
    trained = load_file(str(tmp_path / "model.ckpt-3.safetensors"))
    assert trained["resnet_v1_50.logits.weight"].shape == (2, 2048, 1, 1)
    for name, value in weights.items():
        if name.startswith("resnet_v1_50/logits"):
            continue
        expected = torch.from_numpy(np.ascontiguousarray(tf_to_torch_array(name, value)))
        assert torch.equal(trained[slim_to_torch(name)], expected), name  # frozen: BN statistics too
    torch.manual_seed(0)  # the trainer builds the net right after seeding with --seed (default 0)
    fresh = create_model("resnet_v1_50", num_classes=2).state_dict()
    assert not torch.equal(trained["resnet_v1_50.logits.weight"], fresh["resnet_v1_50.logits.weight"])
    state = torch.load(tmp_path / "model.ckpt-3.state.pt", weights_only=True)
    optimized = [p for group in state["optimizer"]["param_groups"] for p in group["params"]]
    assert len(optimized) == 2  # logits weight and bias only: frozen weights get no update and no decay


def test_unexcluded_logits_stop_the_run_with_the_fix_spelled_out(slim_checkpoint, cats_vs_dogs, tmp_path, capsys):
    path, _ = slim_checkpoint
    code = main(["train", "--dataset_dir", str(cats_vs_dogs), "--train_dir", str(tmp_path), "--checkpoint_path",
                 str(path), *TRAIN_FLAGS])
    assert code == 2
    err = capsys.readouterr().err
    assert "--checkpoint_exclude_scopes=resnet_v1_50/logits" in err and "Traceback" not in err
    assert not list(tmp_path.glob("model.ckpt-*"))  # no training step was taken


def test_dry_run_prints_the_plan_and_trains_nothing(slim_checkpoint, cats_vs_dogs, tmp_path, capsys):
    path, _ = slim_checkpoint
    code = main(["train", "--dataset_dir", str(cats_vs_dogs), "--train_dir", str(tmp_path), "--checkpoint_path",
                 str(path), "--checkpoint_exclude_scopes", "resnet_v1_50/logits", "--dry_run", *TRAIN_FLAGS])
    assert code == 0
    err = capsys.readouterr().err
    assert "dry run" in err and "loaded" in err
    assert not list(tmp_path.glob("model.ckpt-*"))


def test_checkpoint_in_train_dir_wins_over_checkpoint_path(slim_checkpoint, cats_vs_dogs, tmp_path, capsys):
    path, _ = slim_checkpoint
    flags = ["train", "--dataset_dir", str(cats_vs_dogs), "--train_dir", str(tmp_path), "--checkpoint_path",
             str(path), "--checkpoint_exclude_scopes", "resnet_v1_50/logits", "--trainable_scopes",
             "resnet_v1_50/logits", *TRAIN_FLAGS]
    assert main(flags) == 0
    capsys.readouterr()
    flags[flags.index("--max_number_of_steps") + 1] = "5"
    assert main(flags) == 0
    err = capsys.readouterr().err
    assert "Ignoring --checkpoint_path because a checkpoint already exists" in err
    assert "Resumed from model.ckpt-3.safetensors at step 3" in err
