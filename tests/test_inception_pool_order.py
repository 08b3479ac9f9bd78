"""Inception branches run an average pool after the narrowing 1x1 convolution that follows it.

The reference is the same net with the move switched off (slim's order: pool, then convolution),
in eval mode (BN folded) and in training mode (batch statistics), logits and gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune import create_model
from slimtune.nets.inception import Branch
from slimtune.nets.layers import AvgPool2d, BatchNorm


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.running_mean.normal_(0.0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)


@pytest.mark.parametrize("name, moved", [("inception_v3", 9), ("inception_resnet_v2", 1), ("inception_v4", 14)])
def test_average_pools_move_after_narrowing_1x1_convs_with_the_same_results(name, moved):
    model = create_model(name, num_classes=5, image_size=107)
    _randomise_batch_norms(model)
    branches = [m for m in model.modules() if isinstance(m, Branch)]
    assert sum(len(b.pooled_after) for b in branches) == moved
    slim_order = copy.deepcopy(model)
    for branch in (m for m in slim_order.modules() if isinstance(m, Branch)):
        branch.pooled_after = {}
    pooled_channels: list[int] = []
    for branch in branches:
        for conv_name, pool_name in branch.pooled_after.items():
            assert isinstance(branch._modules[pool_name], AvgPool2d)
            branch._modules[pool_name].register_forward_hook(
                lambda m, inputs, out: pooled_channels.append(inputs[0].shape[1]))
    # The float64 net in slim's order is the truth; float32 in either order differs from it by rounding
    # (training-mode BatchNorm over a batch of 2 on small late maps amplifies that rounding).
    truth = copy.deepcopy(slim_order).double()
    x = torch.randn(2, 3, 107, 107, generator=torch.Generator().manual_seed(1))
    for training in (False, True):
        outputs, gradients = {}, {}
        for label, net in (("moved", model), ("slim", slim_order), ("truth", truth)):
            net.train(training)
            net.zero_grad()
            torch.manual_seed(2)  # the same dropout mask for all three in training mode
            out = net(x.to(next(net.parameters()).dtype))
            out.square().sum().backward()
            outputs[label] = out.detach().double()
            gradients[label] = torch.cat([p.grad.double().flatten() for p in net.parameters() if p.grad is not None])
        for values in (outputs, gradients):
            error_moved = (values["moved"] - values["truth"]).abs().max().item()
            error_slim = (values["slim"] - values["truth"]).abs().max().item()
            scale = values["truth"].abs().max().item()
            assert error_moved <= 4 * error_slim + 1e-6 * scale, (training, error_moved, error_slim, scale)
    # Each moved pool averaged the convolution's output channels, narrower than its input.
    moved_convs = [branch._modules[c] for branch in branches for c in branch.pooled_after]
    assert pooled_channels == [conv.out_channels for conv in moved_convs] * 2
    assert all(conv.out_channels < conv.in_channels for conv in moved_convs)
