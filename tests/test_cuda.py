"""On a CUDA device the nets compute what they compute on the CPU.

The CPU runs through slimtune's C kernels (training BatchNorm + activation, 5x5/7x7 depthwise weight
gradients, pooling) and torch's CPU kernels; on CUDA the same modules fall back to torch's CUDA
kernels, two of which had bugs that slimtune works around (layers.BatchNorm, layers.AvgPool2d).

A training step is compared in float64 on both devices: there the comparison is exact up to
summation order. In float32 a max pool whose two best inputs are close can route a gradient
to either, so float32 gradients of the two devices differ by more than rounding (seen on an H200:
one NASNet stem gradient 6x the CPU's own float32 error) without either being wrong. Float32 is
checked where it is well defined: the loss and the eval logits, to the project's 1e-4 parity.
These tests need a GPU and are skipped (counted) without one.
"""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.train.losses import softmax_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: name -> (build keyword arguments, image size): randomness off (dropout, drop path), small inputs
NETS = {
    "mobilenet_v3_large": ({"dropout_keep_prob": 1.0}, 96),
    "nasnet_mobile": ({"dense_dropout_keep_prob": 1.0, "drop_path_keep_prob": 1.0, "image_size": 96}, 96),
    "inception_v3": ({"dropout_keep_prob": 1.0, "image_size": 107}, 107),
    # the other families, so that the next GPU session covers the whole zoo
    "resnet_v1_50": ({}, 64),
    "resnet_v2_50": ({}, 64),
    "mobilenet_v1": ({"dropout_keep_prob": 1.0}, 64),
    "mobilenet_v2": ({"dropout_keep_prob": 1.0}, 64),
    "inception_v1": ({"dropout_keep_prob": 1.0}, 193),
    "inception_v2": ({"dropout_keep_prob": 1.0}, 96),
    "inception_v4": ({"dropout_keep_prob": 1.0, "image_size": 107}, 107),
    "inception_resnet_v2": ({"dropout_keep_prob": 1.0, "image_size": 107}, 107),
    "pnasnet_mobile": ({"dense_dropout_keep_prob": 1.0, "drop_path_keep_prob": 1.0, "image_size": 96}, 96),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _training_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """Loss, gradients and updated BN moving statistics of one train-mode step."""
    model.train()
    logits, end_points = model(images, with_end_points=True)
    aux = end_points.get("AuxLogits")
    loss = softmax_loss(logits, labels, aux_logits=aux)
    loss.backward()
    grads = {name: p.grad.detach().double().cpu() for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b.detach().double().cpu() for name, b in model.named_buffers() if b.is_floating_point()}
    return loss.detach().double().cpu(), grads, buffers


def _runs(name: str):
    kwargs, size = NETS[name]
    torch.manual_seed(0)
    reference = slimtune.create_model(name, num_classes=10, **kwargs)
    images = torch.randn(4, 3, size, size)
    labels = torch.tensor([0, 3, 5, 9])
    results = {}
    for key, device, dtype in (("cpu64", "cpu", torch.float64), ("cuda64", "cuda", torch.float64),
                               ("cuda32", "cuda", torch.float32)):
        model = slimtune.create_model(name, num_classes=10, **kwargs)
        model.load_state_dict(reference.state_dict())
        model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = images.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        results[key] = _training_step(model, x, labels.to(device))
        model.eval()
        with torch.no_grad():
            results[key] += (model(x).double().cpu(),)
    return results


def _assert_close_to(got: torch.Tensor, exact: torch.Tensor, relative: float, what: str) -> None:
    error = (got - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert error <= relative * scale + 1e-12, f"{what}: error {error:.3g} against a largest value of {scale:.3g}"


@pytest.mark.parametrize("name", sorted(NETS))
def test_training_step_and_inference_on_cuda_match_the_cpu(name):
    results = _runs(name)
    exact, cuda64, cuda32 = results["cpu64"], results["cuda64"], results["cuda32"]
    assert exact[1].keys() == cuda64[1].keys() == cuda32[1].keys()
    _assert_close_to(cuda64[0], exact[0], 1e-10, "float64 loss")
    for key in exact[1]:
        _assert_close_to(cuda64[1][key], exact[1][key], 1e-8, f"float64 gradient {key}")
    for key in exact[2]:
        _assert_close_to(cuda64[2][key], exact[2][key], 1e-10, f"float64 buffer {key}")
    _assert_close_to(cuda64[3], exact[3], 1e-10, "float64 eval logits")
    _assert_close_to(cuda32[0], exact[0], 1e-4, "float32 loss")
    _assert_close_to(cuda32[3], exact[3], 1e-4, "float32 eval logits")


def test_gradient_checkpointing_on_cuda():
    torch.manual_seed(0)
    kwargs = {"dense_dropout_keep_prob": 1.0, "drop_path_keep_prob": 1.0, "image_size": 96}
    plain = slimtune.create_model("nasnet_mobile", num_classes=10, **kwargs).cuda().double()
    checkpointed = slimtune.create_model("nasnet_mobile", num_classes=10, gradient_checkpointing=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.cuda().double()
    x, y = torch.randn(2, 3, 96, 96, dtype=torch.float64, device="cuda"), torch.tensor([1, 2], device="cuda")
    loss_a, grads_a, buffers_a = _training_step(plain, x, y)
    loss_b, grads_b, buffers_b = _training_step(checkpointed, x, y)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for key in grads_a:
        scale = grads_a[key].abs().max().item()
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=1e-7 * scale + 1e-12, msg=key)
    for key in buffers_a:  # each BN's moving statistics updated once, not again in the recomputation
        torch.testing.assert_close(buffers_b[key], buffers_a[key], rtol=0, atol=1e-12, msg=key)
