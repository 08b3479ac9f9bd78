"""Shared pieces of the TF-Slim parity tests: goldens, inputs, and one checkpoint per net family."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from slimtune.checkpoint import write_tf_checkpoint
from slimtune.testing import Golden, load_golden, seeded_slim_weights

GOLDEN_DIR = Path(__file__).parent / "golden"


def sgd_losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """Plain SGD steps on one batch; asserts every parameter gets a finite gradient at each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
    return losses


def golden(config: str) -> Golden:
    """The golden of a config (tests/golden/<config>.npz)."""
    return load_golden(GOLDEN_DIR / f"{config}.npz")


def net_kwargs(reference: Golden) -> dict:
    """The slim net's keyword arguments, minus num_classes (given separately)."""
    return {k: v for k, v in reference.model_kwargs.items() if k != "num_classes"}


def nchw(reference: Golden) -> torch.Tensor:
    """The golden's NHWC inputs as a contiguous NCHW tensor."""
    return torch.from_numpy(reference.inputs).permute(0, 3, 1, 2).contiguous()


class FamilyCheckpoints:
    """One TF checkpoint per net family, kept only while that family's tests run (they are large).

    Seeded weights depend only on (seed, name, shape), so every config of a family with the same
    variables can load the family's checkpoint.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.family = None
        self.path = None
        self.variables: dict[str, tuple[int, ...]] = {}

    def get(self, family: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
        """The checkpoint path of `family`'s golden weights and their TF shapes."""
        if family != self.family:
            self.release()
            reference = golden(family)
            weights = seeded_slim_weights(reference.variables, reference.seed)
            self.path = write_tf_checkpoint(self.directory / f"{family}.ckpt", weights)
            self.variables = {name: tuple(value.shape) for name, value in weights.items()}
            self.family = family
            del weights
            gc.collect()
        return self.path, self.variables

    def release(self) -> None:
        """Delete the current family's checkpoint files."""
        if self.path is not None:
            for file in self.directory.glob(f"{self.family}.ckpt*"):
                file.unlink()
        self.family = self.path = None


#: slim's variable leaf -> the torch parameter/buffer name (the documented naming rule).
TORCH_LEAVES = {"weights": "weight", "biases": "bias", "depthwise_weights": "depthwise_weight",
                "pointwise_weights": "pointwise_weight", "gamma": "weight", "beta": "bias",
                "moving_mean": "running_mean", "moving_variance": "running_var"}


def slim_to_torch_name_and_shape(name: str, shape) -> tuple[str, tuple[int, ...]]:
    """slim variable (TF layout) -> torch state_dict key and shape, written out independently of slimtune."""
    scope, leaf = name.rsplit("/", 1)
    key = scope.replace("/", ".") + "." + TORCH_LEAVES[leaf]
    if leaf == "depthwise_weights":   # [H, W, C, M] -> [C*M, 1, H, W]
        return key, (shape[2] * shape[3], 1, shape[0], shape[1])
    if len(shape) == 4:               # HWIO -> OIHW
        return key, (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:               # dense [in, out] -> [out, in]
        return key, (shape[1], shape[0])
    return key, tuple(shape)


def check_headless_matches_pooled_end_point(config: str, pooled_end_point: str) -> None:
    """num_classes=0 against a golden: no Logits variables; model(x) is slim's pooled map
    `pooled_end_point` ([N, 1, 1, C] in TF) as [N, C], and the end points are slim's but the last two."""
    import numpy as np

    from slimtune.checkpoint.restore import restore
    from slimtune.nets import create_model

    reference = golden(config)
    model = create_model(reference.model_name, num_classes=0, **net_kwargs(reference)).eval()
    trunk = {name: value for name, value in seeded_slim_weights(reference.variables, reference.seed).items()
             if "/Logits/" not in name}
    assert len(trunk) == len(reference.variables) - 2   # the classifier's weights and biases
    assert set(model.state_dict()) == {slim_to_torch_name_and_shape(name, value.shape)[0]
                                       for name, value in trunk.items()}
    restore(model, trunk)
    images = nchw(reference)
    with torch.no_grad():
        features, end_points = model.forward_endpoints(images)
        assert torch.equal(model(images), features)
    pooled = reference.end_points[pooled_end_point]
    assert features.shape == (reference.batch, model.num_features)
    assert pooled.shape == (reference.batch, 1, 1, model.num_features)
    assert list(end_points) == list(reference.end_points)[:-2]   # everything but Logits, Predictions
    error = np.abs(features.numpy() - pooled.full.reshape(features.shape)).max()
    assert error <= 1e-4 * pooled.max_abs
