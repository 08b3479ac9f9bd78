"""The checkpoint, features and data-conversion commands, driven through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from slimtune.checkpoint import read_checkpoint, write_tf_checkpoint
from slimtune.cli import main
from slimtune.data import build_source

FIXTURES = Path(__file__).parent / "fixtures" / "tf_checkpoints"


@pytest.fixture
def small_slim_checkpoint(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {"vgg_16/conv1/conv1_1/weights": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
               "vgg_16/conv1/conv1_1/biases": rng.normal(size=4).astype(np.float32),
               "vgg_16/fc8/weights": rng.normal(size=(1, 1, 4, 5)).astype(np.float32),
               "global_step": np.array(7, dtype=np.int64)}
    return write_tf_checkpoint(tmp_path / "vgg.ckpt", tensors, version=1)


def test_ckpt_inspect_lists_tensors_and_shows_one(small_slim_checkpoint, capsys):
    assert main(["ckpt", "inspect", str(small_slim_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "vgg_16/conv1/conv1_1/weights" in out and "3, 3, 3, 4" in out.replace("(", "").replace("[", "")
    assert main(["ckpt", "inspect", str(small_slim_checkpoint), "--tensor", "global_step"]) == 0
    assert "7" in capsys.readouterr().out


def test_ckpt_convert_with_a_name_map(small_slim_checkpoint, tmp_path, capsys):
    out = tmp_path / "renamed.safetensors"
    assert main(["ckpt", "convert", str(small_slim_checkpoint), str(out), "--name_map", "vgg_16/=my_vgg/"]) == 0
    tensors = load_file(str(out))
    assert "my_vgg/fc8/weights" in tensors and "vgg_16/fc8/weights" not in tensors
    original = read_checkpoint(small_slim_checkpoint)
    np.testing.assert_array_equal(tensors["my_vgg/conv1/conv1_1/weights"], original["vgg_16/conv1/conv1_1/weights"])


def test_ckpt_to_npy_gives_the_seeds_name_to_array_dict(small_slim_checkpoint, tmp_path):
    out = tmp_path / "vgg16.npy"
    assert main(["ckpt", "to-npy", str(small_slim_checkpoint), str(out)]) == 0
    loaded = np.load(out, allow_pickle=True).item()  # what the seed's other framework does
    assert loaded["vgg_16/fc8/weights"].shape == (1, 1, 4, 5)
    assert read_checkpoint(out)["vgg_16/fc8/weights"].shape == (1, 1, 4, 5)  # and we read it back safely


def test_ckpt_errors_are_one_line(tmp_path, capsys):
    assert main(["ckpt", "inspect", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.startswith("slimtune: error:")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["ckpt", "inspect", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_features_command_writes_end_point_activations_with_paths(tmp_path, cats_vs_dogs):
    out = tmp_path / "feats.safetensors"
    assert main(["features", "--model_name", "cifarnet", "--num_classes", "10", "--endpoint", "fc4",
                 "--output", str(out), str(cats_vs_dogs / "cat"), "--device", "cpu"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as handle:
        features = handle.get_tensor("features")
        paths = json.loads(handle.metadata()["image_paths"])
    assert features.shape == (6, 192) and len(paths) == 6 and paths[0].endswith("cat_0.jpg")
    assert main(["features", "--model_name", "cifarnet", "--endpoint", "nope", "--output", str(out),
                 str(cats_vs_dogs / "cat")]) == 2


def test_data_convert_folder_to_tfrecords_that_train_reads(tmp_path, cats_vs_dogs, capsys):
    out = tmp_path / "records"
    assert main(["data", "convert", str(cats_vs_dogs), str(out), "--num_shards", "2",
                 "--validation_fraction", "0.25"]) == 0
    assert (out / "labels.txt").read_text().splitlines() == ["0:cat", "1:dog"]
    assert len(list(out.glob("*_train_*-of-00002.tfrecord"))) == 2
    train = build_source(dataset_dir=str(out), split="train")
    validation = build_source(dataset_dir=str(out), split="validation")
    assert len(train) == 9 and len(validation) == 3 and train.class_names == ["cat", "dog"]
    assert main(["train", "--model_name", "cifarnet", "--dataset_dir", str(out), "--train_dir",
                 str(tmp_path / "run"), "--batch_size", "3", "--max_number_of_steps", "2", "--num_workers", "0"]) == 0
