"""lenet and cifarnet compute what TF-Slim computes, loaded from real TensorFlow-written checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.checkpoint import write_tf_checkpoint
from slimtune.testing import assert_matches_golden, load_golden

GOLDEN = Path(__file__).parent / "golden"


def _run(model, golden):
    x = torch.from_numpy(golden.inputs).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval().forward_endpoints(x)


@pytest.mark.parametrize("config", ["lenet", "cifarnet"])
def test_parity_with_tf_slim(config, tmp_path):
    golden = load_golden(GOLDEN / f"{config}.npz")
    path = write_tf_checkpoint(tmp_path / "model.ckpt", golden.weights())
    model = slimtune.create_model(golden.model_name, num_classes=golden.num_classes, checkpoint_path=str(path))
    logits, end_points = _run(model, golden)
    assert_matches_golden(logits, end_points, golden)
    # A fixture that cannot tell its two inputs apart would prove nothing.
    assert (logits[0] - logits[1]).abs().max() > 0.05 * logits.abs().max()


@pytest.mark.parametrize("config, checkpoint", [("lenet_ckpt", "lenet_ckpt.ckpt"),
                                                ("cifarnet_ckpt", "cifarnet_ckpt.ckpt")])
def test_tf_written_checkpoint_reproduces_tf_outputs(config, checkpoint):
    golden = load_golden(GOLDEN / f"{config}.npz")
    size = golden.inputs.shape[1]
    model = slimtune.create_model(golden.model_name, num_classes=golden.num_classes, image_size=size,
                                  checkpoint_path=str(GOLDEN / checkpoint))
    logits, end_points = _run(model, golden)
    assert_matches_golden(logits, end_points, golden)
