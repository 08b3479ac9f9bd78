"""Two-phase fine-tuning in one command (--head_epochs, --head_learning_rate): slim's two runs, resumable anywhere."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import PLAIN_NET, SRC, _train_command
from test_signals import _SignalWhenLogged
from test_train import lenet_config

from slimtune import create_model
from slimtune.checkpoint import train_dir as ckpt
from slimtune.cli import main
from slimtune.config import TrainConfig
from slimtune.train.loop import train
from slimtune.train.signals import TrainingInterrupted

# 46 batches of 32 per digits epoch: 0.05 epochs are ceil(2.3) = 3 head steps, then 4 main steps.
HEAD = dict(head_epochs=0.05, head_learning_rate=1e-2, learning_rate=1e-3, max_number_of_steps=4,
            deterministic=True, log_every_n_steps=1)
HEAD_STEPS, TOTAL = 3, 7


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_command_equals_slims_two_runs_bit_for_bit(tmp_path):
    one = train(lenet_config(tmp_path / "one", save_every_n_steps=HEAD_STEPS, **HEAD))
    assert one.step == TOTAL
    # Phase 1 trained the head only: at its end every other layer is still the initialization.
    torch.manual_seed(0)
    fresh = create_model("lenet", num_classes=10).state_dict()
    after_heads = _weights(tmp_path / "one" / f"model.ckpt-{HEAD_STEPS}.safetensors")
    assert torch.equal(after_heads["LeNet.conv1.weight"], fresh["LeNet.conv1.weight"])
    assert not torch.equal(after_heads["LeNet.fc4.weight"], fresh["LeNet.fc4.weight"])
    final = _weights(one.checkpoint)
    assert not torch.equal(final["LeNet.conv1.weight"], fresh["LeNet.conv1.weight"])
    assert [h["lr"] for h in one.history] == [1e-2] * HEAD_STEPS + [1e-3] * (TOTAL - HEAD_STEPS)
    # slim's README recipe: train the new head, then everything at a lower rate (same train_dir).
    two = tmp_path / "two"
    train(lenet_config(two, trainable_scopes="LeNet/fc4", learning_rate=1e-2, max_number_of_steps=HEAD_STEPS,
                       deterministic=True))
    second = train(lenet_config(two, learning_rate=1e-3, max_number_of_steps=TOTAL, deterministic=True))
    assert _same(final, _weights(second.checkpoint))


def test_the_main_schedule_starts_when_the_head_phase_ends(tmp_path):
    # exponential decay by 0.5 every int(46 * 0.05) = 2 steps, counted from the end of the head phase
    result = train(lenet_config(tmp_path, **{**HEAD, "learning_rate_decay_type": "exponential",
                                             "learning_rate_decay_factor": 0.5, "num_epochs_per_decay": 0.05}))
    rates = [h["lr"] for h in result.history]
    assert rates == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 5e-4, 5e-4], rel=1e-12)


@pytest.fixture(scope="module")
def straight_two_phase(tmp_path_factory):
    train_dir = tmp_path_factory.mktemp("straight")
    return _weights(train(lenet_config(train_dir, **HEAD, learning_rate_decay_type="exponential",
                                       num_epochs_per_decay=0.05)).checkpoint)


@pytest.mark.parametrize("stop_at", [2, HEAD_STEPS, 5])  # mid head phase, at the switch, mid main phase
def test_an_interrupted_two_phase_run_resumes_bit_for_bit(tmp_path, straight_two_phase, stop_at, capsys):
    config = lenet_config(tmp_path, **HEAD, learning_rate_decay_type="exponential", num_epochs_per_decay=0.05)
    handler = _SignalWhenLogged(f"step {stop_at}:", signal.SIGTERM)
    logger = logging.getLogger("slimtune.train")
    logger.addHandler(handler)
    try:
        with pytest.raises(TrainingInterrupted):
            train(config)
    finally:
        logger.removeHandler(handler)
    saved = ckpt.latest_checkpoint(tmp_path)
    assert saved.step == stop_at
    trainable = ckpt.load_state(saved)["trainable"]
    assert trainable == (["LeNet.fc4.bias", "LeNet.fc4.weight"] if stop_at <= HEAD_STEPS else trainable)
    capsys.readouterr()
    resumed = train(config)
    err = capsys.readouterr().err
    assert resumed.step == TOTAL
    assert _same(straight_two_phase, _weights(resumed.checkpoint))
    if stop_at < HEAD_STEPS:
        assert "(head phase of --head_epochs, 3 steps)" in err and "Head phase done at step 3" in err
    elif stop_at == HEAD_STEPS:
        assert "the optimizer state starts fresh (the head phase of --head_epochs ended here" in err
    else:
        assert len(trainable) == 8 and "Head phase done" not in err


CUSTOM_NET = '''
from torch import nn

def headless(num_classes, **kwargs):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

headless.default_image_size = 28
headless.preprocessing = "lenet"
'''


def test_head_epochs_on_a_net_without_marked_heads_is_one_line(tmp_path, capsys):
    net = tmp_path / "net.py"
    net.write_text(CUSTOM_NET)
    assert main(["train", "--model_name", f"{net}:headless", "--dataset_name", "digits", "--use_grayscale",
                 "--train_dir", str(tmp_path / "r"), "--max_number_of_steps", "1", "--num_workers", "0",
                 "--head_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--head_epochs: headless marks no classifier heads" in err and "Traceback" not in err
    assert main(["train", "--model_name", "lenet", "--dataset_name", "digits", "--train_dir", str(tmp_path / "r2"),
                 "--max_number_of_steps", "1", "--num_workers", "0", "--head_learning_rate", "0.1"]) == 2
    assert "--head_learning_rate is the rate of the --head_epochs phase: add --head_epochs K" in \
        capsys.readouterr().err


# The distributed test's plain net (no dropout, no BatchNorm), its last layer marked as the head.
HEADED_NET = PLAIN_NET.replace("    return nn.Sequential(", "    net = nn.Sequential(").replace(
    "nn.Linear(8, num_classes))", "nn.Linear(8, num_classes))\n    net.classifier_scopes = ('6',)\n    return net")


@pytest.mark.slow
def test_two_phase_under_ddp_equals_one_process(tmp_path):
    """Phase 2 rewraps the model in DDP: a wrapper made in phase 1 would not average the body's gradients."""
    net = tmp_path / "headed_net.py"
    net.write_text(HEADED_NET)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes, batch in ((2, 16), (1, 32)):
        train_dir = tmp_path / f"p{processes}"
        done = subprocess.run(_train_command(net, train_dir, batch, processes) + ["--head_epochs", "0.05"],
                              capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = load_file(str(train_dir / "model.ckpt-9.safetensors"))  # 3 head steps + 6
    assert runs[1].keys() == runs[2].keys()
    for name in runs[1]:
        assert torch.allclose(runs[1][name], runs[2][name], atol=1e-5, rtol=1e-4), name


def test_batch_norm_statistics_stay_put_in_the_head_phase_and_move_after_it(tmp_path, cats_vs_dogs):
    # 12 images in batches of 4: one head epoch is 3 steps, then 2 steps of the whole net.
    result = train(TrainConfig(model_name="mobilenet_v1_025", dataset_dir=str(cats_vs_dogs), train_dir=str(tmp_path),
                               train_image_size=64, batch_size=4, head_epochs=1, max_number_of_steps=2,
                               save_every_n_steps=3, num_workers=0, optimizer="sgd", learning_rate=0.1,
                               save_summaries_secs=1e9))
    assert result.step == 5
    torch.manual_seed(0)
    fresh = create_model("mobilenet_v1_025", num_classes=2).state_dict()
    statistics = [k for k in fresh if k.endswith(("running_mean", "running_var"))]
    after_heads = _weights(tmp_path / "model.ckpt-3.safetensors")
    assert statistics and all(torch.equal(after_heads[k], fresh[k]) for k in statistics)
    final = _weights(result.checkpoint)
    assert all(not torch.equal(final[k], fresh[k]) for k in statistics)  # phase 2 unfroze every BatchNorm


THIN_AUX_NET = '''
from slimtune.nets.inception import InceptionV3


def thin_v3(num_classes, **kwargs):
    return InceptionV3(num_classes, depth_multiplier=0.1, min_depth=8, image_size=107)

thin_v3.default_image_size = 107
thin_v3.preprocessing = "inception"
'''


def test_a_weightless_aux_head_stays_frozen_after_the_head_phase(tmp_path, cats_vs_dogs):
    # --aux_loss_weight 0 freezes the aux head (no loss reaches it: DDP would wait for its gradients);
    # the switch to the whole net must not make it trainable again.
    net = tmp_path / "net.py"
    net.write_text(THIN_AUX_NET)
    result = train(TrainConfig(model_name=f"{net}:thin_v3", dataset_dir=str(cats_vs_dogs), train_dir=str(tmp_path / "r"),
                               batch_size=4, head_epochs=1, max_number_of_steps=1, aux_loss_weight=0.0,
                               num_workers=0, optimizer="sgd", save_summaries_secs=1e9))
    assert result.step == 4    # 3 head steps (12 images in batches of 4), then 1 of the whole net
    trainable = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "r"))["trainable"]
    assert any(name.startswith("InceptionV3.Mixed_7c") for name in trainable)   # the body trains now
    assert not [name for name in trainable if "AuxLogits" in name]
