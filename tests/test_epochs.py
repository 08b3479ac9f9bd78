"""--num_epochs covers every image each epoch (the last, partial batch is kept), and the saved
config.yaml states the step count that ran."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from slimtune.config import TrainConfig
from slimtune.data.arrays import ArraySource
from slimtune.train.loop import train


def _npz(path: Path, count: int) -> Path:
    """`count` 28x28 grayscale images of two classes (a bright and a dark square)."""
    rng = np.random.default_rng(0)
    labels = np.arange(count) % 2
    images = rng.integers(0, 60, (count, 28, 28), dtype=np.uint8)
    images[labels == 1, 8:20, 8:20] = 220
    np.savez(path, images=images, labels=labels)
    return path


def test_every_image_is_read_once_per_epoch_and_config_says_what_ran(tmp_path, monkeypatch):
    reads: Counter = Counter()
    original = ArraySource.read

    def counting_read(self, index):
        reads[index] += 1
        return original(self, index)

    monkeypatch.setattr(ArraySource, "read", counting_read)
    data = _npz(tmp_path / "ten.npz", 10)
    result = train(TrainConfig(model_name="lenet", dataset_dir=str(data), train_dir=str(tmp_path / "run"),
                               batch_size=4, num_epochs=2, num_workers=0, optimizer="sgd", learning_rate=0.01,
                               save_summaries_secs=1e9, log_every_n_steps=1))
    # 10 images in batches of 4: 4 + 4 + 2 per epoch, so 3 steps an epoch and 6 for two.
    assert result.step == 6
    assert sorted(reads) == list(range(10)) and set(reads.values()) == {2}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    resolved = saved["resolved"]
    assert saved["settings"]["num_epochs"] == 2
    assert (resolved["total_steps"], resolved["batches_per_epoch"], resolved["epochs"]) == (6, 3, 2.0)
    assert resolved["num_samples"] == 10
