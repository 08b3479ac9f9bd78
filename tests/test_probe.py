"""`slimtune probe`: one frozen pass, many linear heads, the best saved as a checkpoint eval reloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.cli import main
from slimtune.config import EvalConfig, TrainConfig
from slimtune.demo import write_held_out_images
from slimtune.errors import ConfigError
from slimtune.evaluate.run import evaluate_checkpoint
from slimtune.nets.registry import get_model_spec
from slimtune.predict import predict
from slimtune.probe import run_probe
from slimtune.train.loop import train

ENDPOINTS = ["pool1", "pool2", "fc3"]
RATES = [0.01, 0.1]


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory) -> Path:
    """lenet after 60 steps on digits: a backbone whose features are worth probing."""
    train_dir = tmp_path_factory.mktemp("lenet")
    train(TrainConfig(model_name="lenet", dataset_name="digits", train_dir=str(train_dir), batch_size=32,
                      optimizer="adam", learning_rate=1e-3, max_number_of_steps=60, num_workers=0,
                      save_summaries_secs=1e9))
    return train_dir


@pytest.fixture()
def forward_calls(monkeypatch) -> list[int]:
    """Counts backbone passes (each forward_endpoints call of the net is one batch through it)."""
    calls: list[int] = []
    net_class = type(get_model_spec("lenet").build(10))
    real = net_class.forward_endpoints

    def counting(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(net_class, "forward_endpoints", counting)
    return calls


def _probe(lenet_run: Path, out: Path, rates=RATES, **options):
    return run_probe(model_name="lenet", checkpoint_path=str(lenet_run), dataset_name="digits", endpoints=ENDPOINTS,
                     learning_rates=rates, output_dir=str(out), num_epochs=3, batch_size=100, **options)


def test_one_pass_trains_every_head_and_the_best_reloads_to_the_reported_accuracy(lenet_run, tmp_path,
                                                                                    forward_calls):
    results = _probe(lenet_run, tmp_path / "probe")
    # digits: 1442 training and 355 test images, 100 per batch -> 15 + 4 batches, each run once for
    # all 3 end points x 2 rates (12 separate trainings would need 3 epochs x 6 heads x 15 batches);
    # before them one image lists the end points, after them one batch of 8 proves the saved model
    # equals the head on cached features.
    assert results["forward_passes"] == 19
    assert forward_calls == [1] + [100] * 14 + [42] + [100] * 3 + [55] + [8]
    table = results["table"]
    assert list(table) == ENDPOINTS and all(list(row) == ["0.01", "0.1"] for row in table.values())
    best = results["best"]
    assert best["Accuracy"] == max(v for row in table.values() for v in row.values()) > 0.8
    assert json.loads((tmp_path / "probe" / "probe_results.json").read_text())["best"] == best
    assert (tmp_path / "probe" / "probe_results.png").stat().st_size > 1000

    # The best head with its backbone is a checkpoint `eval` loads like a training run's, and it
    # scores what the probe reported: same images, preprocessing, pooling and head.
    evaluated = evaluate_checkpoint(EvalConfig(checkpoint_path=best["checkpoint"], dataset_name="digits",
                                               num_workers=0, batch_size=100, eval_dir=str(tmp_path / "eval"),
                                               report=False))
    assert evaluated["num_samples"] == 355
    assert evaluated["Accuracy"] == pytest.approx(best["Accuracy"], abs=1e-9)
    # ... and `predict` loads it too.
    written = write_held_out_images(tmp_path / "held_out", count=3)
    rows = predict(best["checkpoint"], [str(p) for p in written], top_k=1, device="cpu")
    assert len(rows) == 3


def test_a_second_probe_of_the_same_data_runs_no_forward_pass(lenet_run, tmp_path, forward_calls):
    first = _probe(lenet_run, tmp_path / "first", cache_dir=str(tmp_path / "cache"))
    forward_calls.clear()
    second = _probe(lenet_run, tmp_path / "second", rates=[0.01, 0.1, 1.0], cache_dir=str(tmp_path / "cache"))
    assert second["forward_passes"] == 0 and forward_calls == [1, 8]  # end-point names, the saved model's check
    for endpoint in ENDPOINTS:  # same features, same seeds: the shared rates give the same heads
        assert second["table"][endpoint]["0.01"] == first["table"][endpoint]["0.01"]
    # another checkpoint is another cache entry
    other = lenet_run.parent / "other_ckpt"
    other.mkdir(exist_ok=True)
    for path in lenet_run.glob("model.ckpt-60*"):
        (other / path.name).write_bytes(path.read_bytes())
    (other / "checkpoint").write_text((lenet_run / "checkpoint").read_text())
    forward_calls.clear()
    _probe(other, tmp_path / "third", cache_dir=str(tmp_path / "cache"))
    assert len(forward_calls) == 21


def test_probe_command_and_bad_input(lenet_run, tmp_path, capsys):
    assert main(["probe", "--model_name", "lenet", "--checkpoint_path", str(lenet_run), "--dataset_name", "digits",
                 "--endpoints", "fc3", "--learning_rates", "0.1", "--num_epochs", "1", "--output_dir",
                 str(tmp_path / "p"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["endpoint"] == "fc3"
    assert "Accuracy" in captured.err and "lr=0.1" in captured.err
    with pytest.raises(ConfigError, match=r"no end point 'fc9' \(nearest: fc3"):
        run_probe(model_name="lenet", dataset_name="digits", endpoints=["fc9"], learning_rates=[0.1],
                  output_dir=str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="--learning_rates must be positive"):
        run_probe(model_name="lenet", dataset_name="digits", endpoints=["fc3"], learning_rates=[0.0],
                  output_dir=str(tmp_path / "bad"))
    assert main(["probe", "--model_name", "lenet", "--dataset_name", "digits", "--endpoints", "fc3",
                 "--learning_rates", "fast", "--output_dir", str(tmp_path / "bad")]) == 2
    assert "--learning_rates must be a comma list of numbers" in capsys.readouterr().err


def test_heads_match_an_independent_softmax_regression_on_the_cached_features(lenet_run, tmp_path):
    """The table's accuracy is the head's argmax accuracy on the evaluation features (recomputed here)."""
    results = _probe(lenet_run, tmp_path / "probe")
    cache = Path(results["feature_cache"])
    targets = [np.load(p) for p in sorted(cache.glob("*-targets.npy"))]
    assert sorted(len(t) for t in targets) == [355, 1442]
    best = results["best"]
    from safetensors.torch import load_file
    weights = load_file(best["checkpoint"])
    head_w = weights[f"probe.{best['endpoint']}.weight".replace("/", ".")]
    head_b = weights[f"probe.{best['endpoint']}.bias".replace("/", ".")]
    eval_targets = next(t for t in targets if len(t) == 355)
    stem = best["endpoint"].replace("/", "__")
    features = next(np.load(p) for p in cache.glob(f"*-{stem}.npy") if len(np.load(p, mmap_mode="r")) == 355)
    accuracy = float(((torch.from_numpy(features) @ head_w.T + head_b).argmax(1).numpy() == eval_targets).mean())
    assert accuracy == pytest.approx(best["Accuracy"], abs=1e-9)
