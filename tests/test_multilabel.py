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
    return make_voc_fixture(tmp_path_factory.mktemp("voc"), copies=3, max_side=96)


@pytest.fixture(scope="module")
def trained(voc, tmp_path_factory) -> Path:
    train_dir = tmp_path_factory.mktemp("voc_run")
    train(TrainConfig(model_name="cifarnet", dataset_name="voc", dataset_dir=str(voc), dataset_split_name="trainval",
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


def test_training_on_voc_is_multi_label_and_learns(trained, voc, tmp_path):
    saved = (trained / "config.yaml").read_text()
    assert "multi_label: true" in saved
    log = (trained / "train.log").read_text()
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in log.splitlines() if "loss " in line]
    assert losses[-1] < losses[0]
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(trained), dataset_name="voc", dataset_dir=str(voc),
                                             dataset_split_name="trainval", preprocessing_name="inception",
                                             eval_image_size=32, num_workers=0, eval_dir=str(tmp_path)))
    assert results["num_samples"] == len(build_source("voc", str(voc), "trainval"))
    assert 0.0 <= results["mAP_voc07"] <= 1.0 and results["mAP"] > 0.3
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert key in results
    assert "average_precision.png" in Path(results["report_file"]).read_text()


def test_tuned_thresholds_are_saved_with_the_model_and_used_by_predict(trained, voc, tmp_path):
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(trained), dataset_name="voc", dataset_dir=str(voc),
                                             dataset_split_name="val", preprocessing_name="inception",
                                             eval_image_size=32, num_workers=0, thresholds="tune", report=False,
                                             eval_dir=str(tmp_path)))
    saved = json.loads((trained / THRESHOLDS_FILENAME).read_text())
    assert len(saved["thresholds"]) == 20 and saved["split"] == "val"
    assert results["tuned_thresholds"] == saved["thresholds"]
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
