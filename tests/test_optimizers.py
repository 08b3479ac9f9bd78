"""Optimizers and schedules follow TensorFlow's update rules and slim's schedule arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.train.optimizers import OPTIMIZERS, build_optimizer
from slimtune.train.schedules import learning_rate_at


def _run(name: str, grads: list[np.ndarray], start: np.ndarray, **options) -> np.ndarray:
    parameter = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = build_optimizer(name, [{"params": [parameter], "weight_decay": 0.0}], 0.1, **options)
    for grad in grads:
        parameter.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    return parameter.detach().numpy()


GRADS = [np.array([0.5, -1.0, 2.0]), np.array([0.1, 0.3, -0.7]), np.array([-0.4, 0.0, 1.5])]
START = np.array([1.0, -2.0, 0.5])


def test_rmsprop_matches_tensorflow_rule():
    # tf.train.RMSPropOptimizer: ms starts at 1; mom = m*mom + lr*g/sqrt(ms + eps); var -= mom.
    ms, mom, var = np.ones(3), np.zeros(3), START.copy()
    for g in GRADS:
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + 0.1 * g / np.sqrt(ms + 1.0)
        var = var - mom
    np.testing.assert_allclose(_run("rmsprop", GRADS, START), var, rtol=1e-12)


def test_ftrl_matches_tensorflow_rule():
    accum, linear, var = np.full(3, 0.1), np.zeros(3), START.copy()
    l1, l2, lr = 0.01, 0.02, 0.1
    for g in GRADS:
        new_accum = accum + g * g
        linear = linear + g - (np.sqrt(new_accum) - np.sqrt(accum)) / lr * var
        quadratic = np.sqrt(new_accum) / lr + 2 * l2
        var = np.where(np.abs(linear) > l1, (np.sign(linear) * l1 - linear) / quadratic, 0.0)
        accum = new_accum
    np.testing.assert_allclose(_run("ftrl", GRADS, START, ftrl_l1=l1, ftrl_l2=l2), var, rtol=1e-12)


def test_momentum_matches_tensorflow_rule():
    accum, var = np.zeros(3), START.copy()
    for g in GRADS:
        accum = 0.9 * accum + g
        var = var - 0.1 * accum
    np.testing.assert_allclose(_run("momentum", GRADS, START), var, rtol=1e-12)


def test_adam_default_epsilon_is_not_slims_trap():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer("adam", [{"params": [parameter]}], 0.1)
    assert optimizer.param_groups[0]["eps"] == 1e-8
    assert build_optimizer("adam", [{"params": [parameter]}], 0.1, opt_epsilon=1.0).param_groups[0]["eps"] == 1.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_decreases_a_quadratic(name):
    parameter = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    optimizer = build_optimizer(name, [{"params": [parameter], "weight_decay": 0.0}], 0.1 if name != "adadelta" else 1.0)
    for _ in range(50):
        optimizer.zero_grad()
        (parameter ** 2).sum().backward()
        optimizer.step()
    assert (parameter ** 2).sum().item() < 13.0 * 0.9


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of"):
        build_optimizer("lion", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 0.1)


def test_exponential_schedule_is_staircase_over_global_epochs():
    # 1000 samples, global batch 100 -> 10 steps per epoch; decay every 2 epochs = 20 steps.
    rate = lambda step: learning_rate_at(step, learning_rate=0.1, decay_type="exponential", steps_per_epoch=10,
                                         num_epochs_per_decay=2, decay_factor=0.5)
    assert [rate(s) for s in (0, 19, 20, 39, 40)] == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_polynomial_cosine_fixed_and_warmup():
    poly = lambda step: learning_rate_at(step, learning_rate=0.1, decay_type="polynomial", steps_per_epoch=10,
                                         num_epochs_per_decay=1, end_learning_rate=0.01)
    assert poly(0) == pytest.approx(0.1) and poly(5) == pytest.approx(0.055) and poly(10) == poly(99) == pytest.approx(0.01)
    cosine = lambda step: learning_rate_at(step, learning_rate=1.0, decay_type="cosine", steps_per_epoch=10,
                                           end_learning_rate=0.0, total_steps=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    warm = lambda step: learning_rate_at(step, learning_rate=0.2, decay_type="fixed", steps_per_epoch=10,
                                         warmup_epochs=1)
    assert [warm(s) for s in (0, 5, 10, 50)] == [0.0, pytest.approx(0.1), 0.2, 0.2]
    assert math.isclose(learning_rate_at(3, learning_rate=0.3, decay_type="fixed", steps_per_epoch=1), 0.3)
