"""`slimtune eval` (once and --watch) and `slimtune predict` on a small trained lenet."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimtune.cli import main
from slimtune.errors import ConfigError
from slimtune.config import EvalConfig, TrainConfig
from slimtune.demo import write_held_out_images
from slimtune.evaluate.run import evaluate_checkpoint, watch
from slimtune.predict import expand_inputs, predict
from slimtune.checkpoint import train_dir as ckpt
from slimtune.train.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    train_dir = tmp_path_factory.mktemp("lenet")
    train(TrainConfig(model_name="lenet", dataset_name="digits", train_dir=str(train_dir), batch_size=32,
                      optimizer="adam", learning_rate=1e-3, max_number_of_steps=60, num_workers=0,
                      save_summaries_secs=1e9))
    return train_dir


def test_eval_reports_slim_metrics_per_class_and_confusion(trained, tmp_path):
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(trained), dataset_name="digits", num_workers=0,
                                             batch_size=100, eval_dir=str(tmp_path)))
    assert results["split"] == "test"  # 'auto' picks the test split
    assert results["num_samples"] == 355 and results["num_skipped"] == 0
    assert 0.5 < results["Accuracy"] <= results["Recall_5"] <= 1.0
    matrix = np.array(results["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 355
    assert np.trace(matrix) == round(results["Accuracy"] * 355)
    assert set(results["per_class"]) == {str(d) for d in range(10)}
    saved = json.loads(Path(results["results_file"]).read_text())
    assert saved["step"] == 60 and saved["checkpoint"].endswith("model.ckpt-60.safetensors")
    report = Path(results["report_file"])
    assert report.name == "report.html" and "confusion_matrix.png" in report.read_text()


def test_eval_command_prints_a_json_summary(trained, tmp_path, capsys):
    assert main(["eval", "--checkpoint_path", str(trained), "--dataset_name", "digits", "--num_workers", "0",
                 "--eval_dir", str(tmp_path), "--noreport"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 355 and "Accuracy" in summary


def test_watch_evaluates_each_new_checkpoint(trained, tmp_path):
    train_dir = tmp_path / "live"
    train_dir.mkdir()
    first = ckpt.latest_checkpoint(trained)
    config = EvalConfig(checkpoint_path=str(train_dir), dataset_name="digits", num_workers=0, report=False,
                        eval_interval_secs=0.2, timeout_secs=60)
    results: list = []
    watcher = threading.Thread(target=lambda: results.extend(watch(config, max_evaluations=2)))
    watcher.start()
    for step in (5, 9):  # a "training run" writes two checkpoints while eval --watch runs
        time.sleep(0.5)
        for suffix in (".safetensors", ".state.pt"):
            shutil.copy(first.weights.with_name(first.weights.name.replace(".safetensors", suffix)),
                        train_dir / f"model.ckpt-{step}{suffix}")
        (train_dir / "checkpoint").write_text(f'model_checkpoint_path: "model.ckpt-{step}.safetensors"\n')
        deadline = time.time() + 60  # wait until the watcher has evaluated this checkpoint
        while not (train_dir / f"model.ckpt-{step}.eval-digits-test.json").exists() and time.time() < deadline:
            time.sleep(0.1)
    watcher.join(timeout=60)
    assert [Path(r["checkpoint"]).name for r in results] == ["model.ckpt-5.safetensors", "model.ckpt-9.safetensors"]
    assert (train_dir / "model.ckpt-9.eval-digits-test.json").is_file()


def test_predict_top_k_with_names_from_folders_and_globs(trained, tmp_path, capsys):
    images = write_held_out_images(tmp_path / "digits", count=6)
    predictions = predict(str(trained), [str(tmp_path / "digits")], top_k=3)
    assert [Path(p.path).name for p in predictions] == [p.name for p in images]
    for prediction in predictions:
        assert len(prediction.labels) == 3
        probabilities = [label["probability"] for label in prediction.labels]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
        assert prediction.labels[0]["name"] == str(prediction.labels[0]["index"])
    correct = sum(p.labels[0]["name"] == Path(p.path).stem.split("_")[-1] for p in predictions)
    assert correct >= 4
    assert main(["predict", "--checkpoint_path", str(trained), "--format", "json", "--top_k", "2",
                 str(tmp_path / "digits" / "*.png")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6 and all(len(line["labels"]) == 2 for line in lines)


def test_predict_skips_unreadable_images_and_reports_missing_inputs(trained, tmp_path, capsys):
    good = tmp_path / "seven.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    predictions = predict(str(trained), [str(good), str(broken)])
    assert predictions[0].labels and predictions[1].error and "broken.png" in predictions[1].error
    assert main(["predict", "--checkpoint_path", str(trained), str(tmp_path / "absent.png")]) == 2
    assert "no such image" in capsys.readouterr().err
    assert expand_inputs([str(tmp_path)]) == [broken, good]


def test_eval_of_a_misspelt_split_is_refused_and_writes_no_results(trained, tmp_path, capsys):
    root = tmp_path / "digits_images"
    for path in write_held_out_images(tmp_path / "flat", count=20):
        label = path.stem.rsplit("_", 1)[1]
        for split in ("train", "validation"):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / split / label / path.name)
    eval_dir = tmp_path / "eval"
    assert main(["eval", "--checkpoint_path", str(trained), "--dataset_dir", str(root), "--dataset_split_name",
                 "validaton", "--num_workers", "0", "--eval_dir", str(eval_dir)]) == 2
    assert "no split 'validaton' (did you mean validation?)" in capsys.readouterr().err
    assert not eval_dir.exists() or not any(eval_dir.iterdir())


def test_threshold_options_on_a_single_label_model_are_refused(trained, tmp_path, capsys):
    assert main(["eval", "--checkpoint_path", str(trained), "--dataset_name", "digits", "--num_workers", "0",
                 "--eval_dir", str(tmp_path), "--thresholds", "0.3", "--noreport"]) == 2
    assert "--thresholds applies to multi-label models" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # refused before evaluating
    image = write_held_out_images(tmp_path / "one", count=1)[0]
    with pytest.raises(ConfigError, match="--threshold applies to multi-label models"):
        predict(str(trained), [str(image)], threshold=0.3, device="cpu")
