"""Multi-label fine-tuning on a Pascal VOC layout built from real photos: sigmoid loss, mAP, thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.config import EvalConfig, TrainConfig, build_config, load_yaml
from slimtune.data import build_source
from slimtune.evaluate.run import THRESHOLDS_FILENAME, evaluate_checkpoint
from slimtune.predict import predict
from slimtune.train.losses import sigmoid_loss
from slimtune.train.loop import train
from voc_fixture import make_voc_fixture


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_fixture(tmp_path_factory.mktemp("voc"), copies=8, max_side=96)


@pytest.fixture(scope="module")
def trained(voc, tmp_path_factory) -> Path:
    train_dir = tmp_path_factory.mktemp("voc_run")
    # Trained on 'train' only: 'val' and 'test' stay held out (tuning and mAP are measured there).
    train(TrainConfig(model_name="cifarnet", dataset_name="voc", dataset_dir=str(voc), dataset_split_name="train",
                      preprocessing_name="inception", train_image_size=32, batch_size=8, optimizer="adam",
                      learning_rate=3e-3, learning_rate_decay_type="fixed", weight_decay=0.0,
                      max_number_of_steps=60, num_workers=0, save_summaries_secs=1e9, pos_weight="auto",
                      train_dir=str(train_dir)))
    return train_dir


def test_sigmoid_loss_ignores_difficult_entries():
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    with_ignore = sigmoid_loss(logits, torch.tensor([[1.0, 0.0, -1.0]]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(with_ignore, expected)


def _eval(trained: Path, voc: Path, split: str, **extra) -> dict:
    return evaluate_checkpoint(EvalConfig(checkpoint_path=str(trained), dataset_name="voc", dataset_dir=str(voc),
                                          dataset_split_name=split, preprocessing_name="inception",
                                          eval_image_size=32, num_workers=0, **extra))


def _untrained_map(voc: Path, split: str) -> float:
    """mAP of the same net at its seeded initialization (what no training reaches)."""
    from slimtune.evaluate.run import evaluate_model
    from slimtune.nets.registry import get_model_spec

    spec = get_model_spec("cifarnet")
    torch.manual_seed(0)
    model = spec.build(20, image_size=32)
    return evaluate_model(model, build_source("voc", str(voc), split), spec, preprocessing_name="inception",
                          image_size=32, batch_size=100, multi_label=True)["mAP"]


def test_training_on_voc_is_multi_label_and_learns(trained, voc, tmp_path):
    saved = (trained / "config.yaml").read_text()
    assert "multi_label: true" in saved
    log = (trained / "train.log").read_text()
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in log.splitlines() if "loss " in line]
    assert losses[-1] < losses[0]
    # mAP on the held-out test split, against the untrained net and against chance (a random
    # ranking's AP is about the class's share of positives).
    results = _eval(trained, voc, "test", eval_dir=str(tmp_path))
    test = build_source("voc", str(voc), "test")
    assert results["num_samples"] == len(test)
    targets = np.stack(test.targets())
    positives, rated = (targets == 1).sum(0), (targets >= 0).sum(0)
    chance = float(np.mean((positives / np.maximum(rated, 1))[positives > 0]))
    untrained = _untrained_map(voc, "test")
    assert results["mAP"] > max(chance, untrained) + 0.2, (results["mAP"], chance, untrained)
    assert 0.0 <= results["mAP_voc07"] <= 1.0
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert key in results
    assert "average_precision.png" in Path(results["report_file"]).read_text()


def test_tuned_thresholds_are_saved_with_the_model_and_used_by_predict(trained, voc, tmp_path):
    from sklearn.metrics import f1_score

    results = _eval(trained, voc, "val", thresholds="tune", report=False, eval_dir=str(tmp_path))
    saved = json.loads((trained / THRESHOLDS_FILENAME).read_text())
    assert len(saved["thresholds"]) == 20 and saved["split"] == "val"
    assert results["tuned_thresholds"] == saved["thresholds"]
    tuning = results["tuning"]
    # It says what it tuned, on what, and where it saved it; 'val' is not in the training split.
    assert tuning["file"] == str(trained / THRESHOLDS_FILENAME) and str(trained / THRESHOLDS_FILENAME) in tuning["summary"]
    assert "20 per-class thresholds" in tuning["summary"] and "'val'" in tuning["summary"]
    assert tuning["training_split"] == "train" and not tuning["tuned_on_training_images"]
    assert "WARNING" not in tuning["summary"]
    # The F1 it reports is the F1 at the thresholds it will use: a later eval (no --thresholds)
    # uses the saved ones and measures exactly that.
    again = _eval(trained, voc, "val", report=False, eval_dir=str(tmp_path))
    assert again["CF1"] == pytest.approx(tuning["CF1"]) and again["OF1"] == pytest.approx(tuning["OF1"])
    assert again["thresholds"] == pytest.approx(saved["thresholds"])
    # Each class's F1 at its tuned threshold, recomputed by scikit-learn, is at least its F1 at 0.5.
    plain = _eval(trained, voc, "val", thresholds="0.5", report=False, eval_dir=str(tmp_path))
    for name, row in again["per_class"].items():
        if row["num_positives"]:
            assert row["f1"] >= plain["per_class"][name]["f1"] - 1e-9, name
    # Those per-class F1s, recomputed by scikit-learn from the net's own scores at the saved thresholds.
    from slimtune.evaluate.run import evaluate_model, load_for_eval

    model, spec, _, _ = load_for_eval(trained, None, None, torch.device("cpu"))
    val = build_source("voc", str(voc), "val")
    raw = evaluate_model(model, val, spec, preprocessing_name="inception", image_size=32, multi_label=True,
                         return_scores=True)
    targets = np.stack(val.targets())[raw["_indices"]]
    for index, name in enumerate(val.class_names):
        kept = targets[:, index] >= 0
        if (targets[kept, index] == 1).any():
            expected = f1_score(targets[kept, index] == 1, raw["_scores"][kept, index] >= saved["thresholds"][index])
            assert again["per_class"][name]["f1"] == pytest.approx(expected), name
    # Tuning on the images it trained on says so.
    on_train = _eval(trained, voc, "train", thresholds="tune", report=False, eval_dir=str(tmp_path))
    assert on_train["tuning"]["tuned_on_training_images"] and "WARNING" in on_train["tuning"]["summary"]
    (trained / THRESHOLDS_FILENAME).write_text(json.dumps(saved))  # back to the held-out tuning
    images = sorted((voc / "VOC2007" / "JPEGImages").glob("*.jpg"))[:4]
    predictions = predict(str(trained), [str(p) for p in images], preprocessing_name="inception", image_size=32)
    thresholds = np.array(saved["thresholds"])
    for prediction in predictions:
        for label in prediction.labels:  # every label reported reached its own threshold
            assert label["probability"] >= thresholds[label["index"]] - 1e-6
    everything = predict(str(trained), [str(images[0])], preprocessing_name="inception", image_size=32, threshold=0.0)
    assert len(everything[0].labels) == 20


def test_seed_004_recipe_is_shipped_with_its_settings():
    recipe = load_yaml("voc2007_vgg16")
    assert recipe["model_name"] == "vgg_16" and recipe["checkpoint_exclude_scopes"] == "vgg_16/fc8"
    assert (recipe["optimizer"], recipe["learning_rate"], recipe["batch_size"]) == ("adam", 1e-5, 32)
    assert recipe["multi_label"] is True and recipe["train_image_size"] == 224
    config = build_config(TrainConfig, {"config": "voc2007_vgg16", "dataset_dir": "/data/VOCdevkit"})
    assert config.max_number_of_steps == 6000 and config.dataset_dir == "/data/VOCdevkit"
