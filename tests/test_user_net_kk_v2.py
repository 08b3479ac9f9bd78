"""Seed 000, end to end: a user copies Inception-ResNet-v2 into their own file `my_nets/kk_v2.py`,
renames its scope to KK_v2, changes one block, and fine-tunes it with no edit of the package,
restoring every unchanged layer from an inception_resnet_v2 checkpoint.

The user's file is written the way a user would: it imports slimtune's public Inception-ResNet
blocks. To keep the test fast the file builds one block per repeated stack (REPEATS) and the
checkpoint is an inception_resnet_v2 checkpoint of the same reduced depth (TF-Slim's variable
names and shapes from the golden, seeded values, TF V2 format); every width is the real one.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimtune.checkpoint import write_tf_checkpoint
from slimtune.checkpoint.names import tf_to_torch_array
from slimtune.cli import main
from slimtune.testing import load_golden, seeded_slim_weights

GOLDEN = Path(__file__).parent / "golden" / "inception_resnet_v2_107.npz"

KK_V2 = '''
"""KK_v2: Inception-ResNet-v2 with a 1x5/5x1 first Block17 (the rest is slim's, under scope KK_v2)."""

from slimtune.nets.inception import conv
from slimtune.nets.inception_resnet_v2 import (InceptionResNetV2, RepeatStack, ResidualInceptionBlock,
                                               inception_resnet_v2_body)

REPEATS = {"Repeat": 1, "Repeat_1": 1, "Repeat_2": 1}   # slim: 10, 20, 9


class WideBlock17(ResidualInceptionBlock):
    """My change: Block17 with 1x5/5x1 convs instead of 1x7/7x1."""

    def __init__(self, channels=1088, scale=0.10):
        super().__init__(channels, [
            [conv("Conv2d_1x1", 192, 1)],
            [conv("Conv2d_0a_1x1", 128, 1), conv("Conv2d_0b_1x5", 160, (1, 5)), conv("Conv2d_0c_5x1", 192, (5, 1))],
        ], scale)


def kk_v2(num_classes=1001, image_size=299, **kwargs):
    rows = []
    for name, end_point, module in inception_resnet_v2_body():
        if name in REPEATS:
            blocks = list(module.children())[:REPEATS[name]]
            prefix = next(iter(module._modules)).rsplit("_", 1)[0]
            if name == "Repeat_1":
                blocks[0] = WideBlock17()
            module = RepeatStack(prefix, blocks)
        rows.append((name, end_point, module))
    return InceptionResNetV2(num_classes, scope="KK_v2", body=rows, image_size=image_size, **kwargs)
'''

KEPT_BLOCKS = ("Repeat/block35_1/", "Repeat_1/block17_1/", "Repeat_2/block8_1/")


@pytest.fixture(scope="module")
def irv2_checkpoint(tmp_path_factory):
    """A reduced inception_resnet_v2 checkpoint: slim's variables minus the repeated blocks past the first."""
    golden = load_golden(GOLDEN)
    variables = [(name, shape) for name, shape in golden.variables
                 if "/Repeat" not in name or any(block in name for block in KEPT_BLOCKS)]
    weights = seeded_slim_weights(variables, seed=3)
    path = write_tf_checkpoint(tmp_path_factory.mktemp("irv2") / "inception_resnet_v2.ckpt", weights)
    return path, weights


@pytest.fixture(scope="module")
def kk_v2_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("home") / "my_nets" / "kk_v2.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(KK_V2))
    return path


FLAGS = ["--train_image_size", "107", "--batch_size", "2", "--max_number_of_steps", "1", "--num_workers", "0",
         "--optimizer", "sgd", "--learning_rate", "0.01", "--save_summaries_secs", "1e9", "--preprocessing_name", "inception",
         "--checkpoint_exclude_scopes", "heads,KK_v2/Repeat_1/block17_1",
         "--trainable_scopes", "KK_v2/Logits,KK_v2/AuxLogits,KK_v2/Repeat_1/block17_1"]


@pytest.mark.parametrize("name_map", ["KK_v2/=InceptionResnetV2/", "auto"])
def test_kk_v2_trains_from_an_inception_resnet_v2_checkpoint(name_map, kk_v2_file, irv2_checkpoint, cats_vs_dogs,
                                                             tmp_path, capsys):
    path, weights = irv2_checkpoint
    code = main(["train", "--model_name", f"{kk_v2_file}:kk_v2", "--dataset_dir", str(cats_vs_dogs),
                 "--train_dir", str(tmp_path), "--checkpoint_path", str(path), "--checkpoint_name_map", name_map,
                 *FLAGS])
    err = capsys.readouterr().err
    assert code == 0, err
    # The plan's summary counts nothing missing; its full list (train_dir/restore_plan.txt) shows the
    # changed block (and the new heads) as not restored.
    assert " 0 missing" in err
    plan = (tmp_path / "restore_plan.txt").read_text()
    assert "Excluded (" in plan and "KK_v2/Repeat_1/block17_1/Branch_1/Conv2d_0b_1x5/weights" in plan
    trained = load_file(str(tmp_path / "model.ckpt-1.safetensors"))
    restored = 0
    for name, value in weights.items():
        key = "KK_v2." + name.split("/", 1)[1].replace("/", ".")
        if "/Logits/" in name or "/AuxLogits/" in name or "block17_1/" in name:
            continue
        key = key.rsplit(".", 1)[0] + "." + {"weights": "weight", "biases": "bias", "beta": "bias",
                                            "moving_mean": "running_mean",
                                            "moving_variance": "running_var"}[name.rsplit("/", 1)[1]]
        expected = torch.from_numpy(np.ascontiguousarray(tf_to_torch_array(name, value)))
        assert torch.equal(trained[key], expected), key   # frozen and restored from InceptionResnetV2
        restored += 1
    assert restored > 100
    assert trained["KK_v2.Repeat_1.block17_1.Branch_1.Conv2d_0b_1x5.weight"].shape == (160, 128, 1, 5)
    assert trained["KK_v2.Logits.Logits.weight"].shape == (2, 1536)
