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
    rows = {line.split()[0]: line for line in out.splitlines()[1:5]}
    # Every tensor with its shape, dtype and byte count, as the file's own reader reports them.
    with read_checkpoint(small_slim_checkpoint) as reader:
        for name in reader:
            value = reader[name]
            shape = "[" + ", ".join(str(d) for d in value.shape) + "]"
            assert rows[name].split(None, 1)[1].split() == [*shape.split(), str(value.dtype), str(value.nbytes)], name
    assert "4 tensors, 133 numeric values, 536 bytes" in out
    assert main(["ckpt", "inspect", str(small_slim_checkpoint), "--tensor", "vgg_16/conv1/conv1_1/biases"]) == 0
    shown = capsys.readouterr().out
    expected = np.random.default_rng(0)
    expected.normal(size=(3, 3, 3, 4))
    biases = expected.normal(size=4).astype(np.float32)  # the fixture's own draw, in order
    stats = dict(zip(shown.splitlines()[1].split()[::2], map(float, shown.splitlines()[1].split()[1::2])))
    assert stats["min"] == pytest.approx(biases.min(), abs=1e-5) and stats["max"] == pytest.approx(biases.max(), abs=1e-5)
    assert stats["mean"] == pytest.approx(biases.mean(), abs=1e-5) and stats["std"] == pytest.approx(biases.std(), abs=1e-4)
    values = [float(v) for v in shown.splitlines()[2].strip("[]").replace(",", " ").split()]
    np.testing.assert_allclose(values, biases, atol=1e-5)
    assert main(["ckpt", "inspect", str(small_slim_checkpoint), "--tensor", "global_step"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].strip() == "7"


def test_ckpt_convert_with_a_name_map(small_slim_checkpoint, tmp_path, capsys):
    out = tmp_path / "renamed.safetensors"
    assert main(["ckpt", "convert", str(small_slim_checkpoint), str(out), "--name_map", "vgg_16/=my_vgg/"]) == 0
    tensors = load_file(str(out))
    original = read_checkpoint(small_slim_checkpoint)
    assert sorted(tensors) == sorted(name.replace("vgg_16/", "my_vgg/") for name in original)
    for name in original:
        np.testing.assert_array_equal(tensors[name.replace("vgg_16/", "my_vgg/")], original[name])
        assert tensors[name.replace("vgg_16/", "my_vgg/")].dtype == original[name].dtype


def test_ckpt_to_npy_gives_the_seeds_name_to_array_dict(small_slim_checkpoint, tmp_path):
    out = tmp_path / "vgg16.npy"
    assert main(["ckpt", "to-npy", str(small_slim_checkpoint), str(out)]) == 0
    loaded = np.load(out, allow_pickle=True).item()  # what the seed's other framework does
    original = read_checkpoint(small_slim_checkpoint)
    assert sorted(loaded) == sorted(original)
    back = read_checkpoint(out)  # and we read it back safely
    for name in original:
        np.testing.assert_array_equal(loaded[name], original[name])
        np.testing.assert_array_equal(back[name], original[name])


def test_ckpt_errors_are_one_line(tmp_path, capsys):
    assert main(["ckpt", "inspect", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.startswith("slimtune: error:")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    assert main(["ckpt", "inspect", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_features_command_writes_end_point_activations_with_paths(tmp_path, cats_vs_dogs):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slimtune import create_model
    from slimtune.data.decode import decode_image
    from slimtune.preprocessing import get_preprocessing

    torch.manual_seed(3)
    model = create_model("cifarnet", num_classes=10).eval()
    weights = tmp_path / "cifarnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "feats.safetensors"
    images = [cats_vs_dogs / "dog" / "dog_2.jpg", cats_vs_dogs / "cat"]  # a file, then a folder
    assert main(["features", "--model_name", "cifarnet", "--num_classes", "10", "--endpoint", "fc4",
                 "--checkpoint_path", str(weights), "--output", str(out), *map(str, images), "--device", "cpu"]) == 0
    with safe_open(str(out), framework="np") as handle:
        features = handle.get_tensor("features")
        paths = json.loads(handle.metadata()["image_paths"])
    expected_paths = [str(images[0])] + [str(cats_vs_dogs / "cat" / f"cat_{i}.jpg") for i in range(6)]
    assert paths == expected_paths
    # Row i is fc4 of image i under the restored weights, computed here straight from the net.
    preprocess = get_preprocessing("cifarnet", is_training=False)
    batch = torch.stack([preprocess(torch.from_numpy(decode_image(p, 3)).permute(2, 0, 1), 32, 32) for p in paths])
    with torch.no_grad():
        expected = model.forward_endpoints(batch)[1]["fc4"].numpy()
    assert features.shape == (7, 192)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(features[0], features[1])  # rows differ per image: not a constant
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
    # The records hold each source file's bytes exactly once, with its folder's label.
    originals = {path.read_bytes(): ["cat", "dog"].index(path.parent.name)
                 for path in sorted(cats_vs_dogs.glob("*/*.jpg"))}
    stored = [(bytes(payload), int(target)) for split in (train, validation)
              for shard in split.shards for payload, target, _ in split.iter_shard(shard)]
    assert len(stored) == 12 and {payload for payload, _ in stored} == set(originals)
    assert all(originals[payload] == target for payload, target in stored)
    assert main(["train", "--model_name", "cifarnet", "--dataset_dir", str(out), "--train_dir",
                 str(tmp_path / "run"), "--batch_size", "3", "--max_number_of_steps", "2", "--num_workers", "0"]) == 0
