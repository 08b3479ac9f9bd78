"""One optimizer step's mechanics (issue 16, items 3 and 4): --precision, --compile,
--accumulate_steps, --clip_gradient_norm."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import slimtune.nets.lenet as lenet_module
from slimtune import compiled_inference
from slimtune.cli import main
from slimtune.config import EvalConfig
from slimtune.errors import ConfigError
from slimtune.evaluate.run import evaluate_checkpoint
from slimtune.nets.registry import get_model_spec
from slimtune.train import mechanics
from slimtune.train.loop import build_model, train
from test_train import lenet_config


# --- item 4: accumulation and clipping ---------------------------------------------------------

@pytest.fixture
def lenet_without_dropout(monkeypatch):
    """lenet with its dropout layer an identity: dropout draws one mask per forward, so N micro-batches
    and one batch of N x B would draw different masks. lenet has no BatchNorm (whose batch statistics
    would also differ between micro-batches and the big batch), so nothing else differs."""
    monkeypatch.setattr(lenet_module, "dropout_module", lambda keep_prob: nn.Identity())


def test_accumulation_equals_one_large_batch(tmp_path, lenet_without_dropout):
    """3 micro-batches of 20 with --accumulate_steps 3 == one batch of 60: same weights after two
    epochs of the 144 images left by --validation_fraction 0.9 (3 steps an epoch; each epoch's last
    step holds 24 images: micro-batches of 20 and 4, weighted 20/24 and 4/24), under a schedule that
    decays twice an epoch (it must count optimizer steps, not micro-batches)."""
    common = dict(optimizer="momentum", learning_rate=0.005, learning_rate_decay_type="exponential",
                  num_epochs_per_decay=0.5, learning_rate_decay_factor=0.5, weight_decay=1e-3,
                  validation_fraction=0.9, num_epochs=2, deterministic=True, log_every_n_steps=1)
    big = train(lenet_config(tmp_path / "big", batch_size=60, **common))
    small = train(lenet_config(tmp_path / "small", batch_size=20, accumulate_steps=3, **common))
    assert yaml.safe_load((tmp_path / "big" / "config.yaml").read_text())["resolved"]["num_samples"] == 144
    assert big.step == small.step == 2 * math.ceil(144 / 60)
    a, b = load_file(str(big.checkpoint)), load_file(str(small.checkpoint))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    # The logged loss and accuracy are those of the whole step, not of its last micro-batch.
    assert len(big.history) == len(small.history) == big.step
    for x, y in zip(big.history, small.history):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-6)
        assert y["lr"] == x["lr"]
    # Without accumulation the same micro-batches train to other weights: the comparison can fail.
    lone = train(lenet_config(tmp_path / "lone", batch_size=20, **{**common, "num_epochs": None},
                              max_number_of_steps=small.step))
    assert not torch.allclose(load_file(str(lone.checkpoint))["LeNet.fc4.weight"], a["LeNet.fc4.weight"],
                              rtol=1e-3, atol=1e-4)


def test_accumulated_run_resumes_mid_epoch_where_it_left_off(tmp_path, lenet_without_dropout):
    common = dict(batch_size=16, accumulate_steps=3, optimizer="sgd", learning_rate=0.01, deterministic=True)
    whole = train(lenet_config(tmp_path / "whole", max_number_of_steps=8, **common))
    train(lenet_config(tmp_path / "split", max_number_of_steps=5, **common))
    resumed = train(lenet_config(tmp_path / "split", max_number_of_steps=8, **common))
    a, b = load_file(str(whole.checkpoint)), load_file(str(resumed.checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_shares_weight_micro_batches_by_what_their_mean_averages():
    assert mechanics.loss_shares([torch.zeros(16), torch.zeros(16), torch.zeros(2)], False) == \
        pytest.approx([16 / 34, 16 / 34, 2 / 34])
    # multi-label: the mean runs over labelled (non -1) entries
    targets = [torch.tensor([[1.0, -1.0], [0.0, 1.0]]), torch.tensor([[-1.0, -1.0]])]
    assert mechanics.loss_shares(targets, True) == pytest.approx([1.0, 0.0])
    assert list(mechanics.micro_batch_groups(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_clipping_per_tensor_is_tfs_clip_by_norm_and_global_is_torchs():
    def grads() -> list[nn.Parameter]:
        big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
        big.grad = torch.tensor([3.0, 4.0])         # norm 5
        small.grad = torch.tensor([0.1, 0.2, 0.2])  # norm 0.3
        return [big, small]

    big, small = grads()
    total = mechanics.clip_gradients([big, small], 1.0, "per_tensor")
    assert float(total) == pytest.approx(math.sqrt(25 + 0.09))
    # tf.clip_by_norm(t, c) = t * c / max(||t||, c), tensor by tensor
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(small.grad, torch.tensor([0.1, 0.2, 0.2]))
    big, small = grads()
    reference = grads()
    mechanics.clip_gradients([big, small], 1.0, "global")
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(big.grad, reference[0].grad)
    torch.testing.assert_close(small.grad, reference[1].grad)


def test_clip_gradient_norm_bounds_every_sgd_update(tmp_path):
    """Plain SGD moves each tensor by lr x its clipped gradient: per tensor at most lr x clip, and
    exactly that for a tensor whose gradient was larger (every lenet tensor, at so small a clip)."""
    lr, clip = 0.1, 1e-3
    config = lenet_config(tmp_path, optimizer="sgd", learning_rate=lr, max_number_of_steps=1,
                          clip_gradient_norm=clip)
    result = train(config)
    before = build_model(get_model_spec("lenet"), 10, config).state_dict()
    after = load_file(str(result.checkpoint))
    moved = {name: float((after[name] - before[name]).norm()) for name in after}
    # (the differences of float32 weights carry rounding of about 1e-7 x the weights' size)
    assert all(m == pytest.approx(lr * clip, rel=1e-3) for m in moved.values()), moved
    unclipped = train(lenet_config(tmp_path / "free", optimizer="sgd", learning_rate=lr, max_number_of_steps=1))
    free = load_file(str(unclipped.checkpoint))
    assert max(float((free[n] - before[n]).norm()) for n in free) > 10 * lr * clip


# --- item 3: precision and compilation ---------------------------------------------------------

def test_fp16_on_cpu_is_one_line_naming_the_valid_choices(tmp_path, capsys):
    train_dir = tmp_path / "run"
    assert main(["train", "--model_name", "lenet", "--dataset_name", "digits", "--train_dir", str(train_dir),
                 "--precision", "fp16", "--max_number_of_steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16 needs a CUDA device" in err and "valid choices here: fp32, bf16" in err
    assert "Traceback" not in err and not train_dir.exists()
    with pytest.raises(SystemExit):
        main(["train", "--model_name", "lenet", "--precision", "fp8"])
    err = capsys.readouterr().err
    assert "invalid choice: 'fp8'" in err and all(choice in err for choice in ("fp32", "bf16", "fp16"))


def test_amp_is_the_deprecated_spelling_of_bf16_on_cpu(tmp_path):
    # on the CPU (the default device is CUDA where there is one, and there amp means fp16)
    via_amp = train(lenet_config(tmp_path / "amp", max_number_of_steps=3, deterministic=True, amp=True,
                                 device="cpu"))
    via_precision = train(lenet_config(tmp_path / "bf16", max_number_of_steps=3, deterministic=True,
                                       precision="bf16", device="cpu"))
    a, b = load_file(str(via_amp.checkpoint)), load_file(str(via_precision.checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mechanics.autocast_dtype("fp32", True, torch.device("cuda")) == torch.float16


@pytest.mark.skipif(not mechanics.cpu_has_bf16(), reason="this CPU has no bfloat16 instructions")
def test_bf16_run_trains_lenet_on_digits_to_95_percent(tmp_path):
    train(lenet_config(tmp_path, max_number_of_steps=150, precision="bf16"))
    fp32 = train(lenet_config(tmp_path / "fp32", max_number_of_steps=3, deterministic=True))
    bf16 = train(lenet_config(tmp_path / "bf16", max_number_of_steps=3, deterministic=True, precision="bf16"))
    a, b = load_file(str(fp32.checkpoint)), load_file(str(bf16.checkpoint))
    assert all(t.dtype == torch.float32 for t in b.values())  # master weights stay float32
    assert not all(torch.equal(a[k], b[k]) for k in a)  # autocast really ran in bfloat16
    results = evaluate_checkpoint(EvalConfig(checkpoint_path=str(tmp_path), dataset_name="digits",
                                             dataset_split_name="test", num_workers=0, report=False))
    assert results["Accuracy"] >= 0.95, results["Accuracy"]


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(compiled_inference.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="--compile on CPU needs a C.. compiler"):
        compiled_inference.check_compiler(torch.device("cpu"))


@pytest.mark.slow  # inductor compiles lenet's forward and backward for about a minute on 2 cores
@pytest.mark.skipif(not any(map(compiled_inference.shutil.which, ("g++", "c++", "clang++"))), reason="no C++ compiler")
def test_compiled_steps_give_the_losses_of_eager_steps(tmp_path, lenet_without_dropout):
    eager = train(lenet_config(tmp_path / "eager", max_number_of_steps=4, log_every_n_steps=1, deterministic=True))
    compiled = train(lenet_config(tmp_path / "compiled", max_number_of_steps=4, log_every_n_steps=1,
                                  deterministic=True, compile=True))
    for x, y in zip(eager.history, compiled.history):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    a, b = load_file(str(eager.checkpoint)), load_file(str(compiled.checkpoint))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
