"""`slimtune demo`: trains, evaluates, predicts on held-out digits and says where everything is."""

from __future__ import annotations

import json
from pathlib import Path

from slimtune.cli import main


def test_demo_runs_the_whole_workflow_and_points_at_its_outputs(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), "--max_number_of_steps", "40"]) == 0
    err = capsys.readouterr().err
    train_dir = tmp_path / "train"
    assert (train_dir / "model.ckpt-40.safetensors").is_file() and (train_dir / "config.yaml").is_file()
    assert list(train_dir.glob("events.out.tfevents.*"))
    results = json.loads((train_dir / "model.ckpt-40.eval-digits-test.json").read_text())
    assert results["num_samples"] == 355 and results["Accuracy"] > 0.5
    assert len(list((tmp_path / "held_out").glob("digit_*_true_*.png"))) == 8
    for expected in ("checkpoints:", "TensorBoard logs:", "evaluation results:", "evaluation report:",
                     str(train_dir), "predictions on held-out digits"):
        assert expected in err
    assert Path(results["checkpoint"]).name == "model.ckpt-40.safetensors"
