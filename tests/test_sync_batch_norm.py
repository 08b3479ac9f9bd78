"""--sync_batch_norm: 2 processes x batch 4 compute what 1 process computes on batch 8.

The reference is torch's own F.batch_norm on the whole batch in one process; the two ranks run
slimtune's synchronized BatchNorm under DistributedDataParallel (gloo, CPU). Loss, gradients,
the weights after one SGD step and the moving statistics agree within float rounding; without
synchronization each rank normalizes its own half and they do not.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_support import run_ranks, save_result
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slimtune.nets.layers import BatchNorm, Conv2d, batch_norm_factory
from slimtune.nets.sync_batch_norm import enable_sync_batch_norm, sync_batch_norm

BATCH, RANKS = 8, 2


class SmallBNNet(nn.Module):
    """conv+BN (gamma and beta) -> conv+BN -> mean pool -> linear: gradients reach x through BN twice."""

    def __init__(self) -> None:
        super().__init__()
        norm = batch_norm_factory(scale=True, decay=0.9)
        self.conv1 = Conv2d(3, 6, 3, normalizer=norm)
        self.conv2 = Conv2d(6, 5, 3, stride=2, normalizer=norm)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv1(x)).mean((2, 3)))


def _data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    model = SmallBNNet()
    images = torch.randn(BATCH, 3, 9, 9) * 2 + 0.5
    labels = torch.randint(0, 4, (BATCH,))
    return images, labels, model


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, wrapped: nn.Module) -> dict:
    """One SGD step; the loss, gradients, new weights and moving statistics it gave."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = F.cross_entropy(wrapped(images), labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return {"loss": loss.detach(), "grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _rank(rank: int, world_size: int, out_dir, sync: bool) -> None:
    images, labels, model = _data()
    if sync:
        assert enable_sync_batch_norm(model) == 2
    ddp = DistributedDataParallel(model)
    share = BATCH // world_size
    result = _step(model, images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share], ddp)
    save_result(out_dir, rank, result)


def _reference() -> dict:
    images, labels, model = _data()
    return _step(model, images, labels, model)


@pytest.mark.slow
def test_synchronized_statistics_equal_one_process_on_the_global_batch(tmp_path):
    expected = _reference()
    ranks = run_ranks(_rank, RANKS, tmp_path / "sync", True)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected["loss"], rtol=1e-5, atol=1e-6)
    for result in ranks:
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, value in expected["state"].items():  # updated weights and moving mean / variance
            torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)

    unsynced = run_ranks(_rank, RANKS, tmp_path / "local", False)
    moving = "conv1.BatchNorm.running_var"
    assert not torch.allclose(unsynced[0]["state"][moving], expected["state"][moving], rtol=1e-3)
    assert not torch.allclose(unsynced[0]["grads"]["conv1.weight"], expected["grads"]["conv1.weight"], rtol=1e-3)


def test_single_process_and_eval_mode_keep_plain_batch_norm():
    # Outside a process group, or on moving statistics, a synchronized layer is F.batch_norm itself.
    torch.manual_seed(0)
    norm = BatchNorm(4, scale=True)
    enable_sync_batch_norm(norm)
    x = torch.randn(3, 4, 5, 5)
    expected = F.batch_norm(x, torch.zeros(4), torch.ones(4), norm.weight, norm.bias, True, 0.001, 0.001)
    torch.testing.assert_close(norm(x), expected)
    norm.eval()
    torch.testing.assert_close(norm(x), F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight,
                                                     norm.bias, False, 0.001, 0.001))


def test_synchronized_formula_and_its_gradient_match_torch_batch_norm():
    """The shifted-sum statistics and the all-reduce's backward, in a group of one: F.batch_norm's
    output, input/gamma/beta gradients and moving statistics (the cross-rank sum is the slow test)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        torch.manual_seed(1)
        x = (torch.randn(6, 3, 4, 4) * 3 + 5).requires_grad_()
        norm = BatchNorm(3, scale=True, decay=0.8)
        norm.running_mean.fill_(4.0)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        weight = norm.weight.detach().clone().requires_grad_()
        bias = norm.bias.detach().clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        mean, var = norm.running_mean.clone(), norm.running_var.clone()
        expected = F.batch_norm(x_ref, mean, var, weight, bias, True, 0.2, 0.001)
        out = sync_batch_norm(x, norm)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
