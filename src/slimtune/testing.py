"""Parity-test helpers: seeded slim weights, seeded inputs and TF-made golden outputs.

A golden file (``tests/golden/<config>.npz``) records what TF-Slim's research/slim net computed
for seeded weights on two seeded inputs.  A PyTorch net proves parity by loading the same
weights (``golden.weights()``), running ``golden.inputs`` and passing its outputs to
``assert_matches_golden``.  Everything here is numpy-only so tests need neither TF nor torch
(torch tensors are accepted and converted lazily).

This module is public API (kept in the installed package on purpose): whoever adds a network,
in slimtune or in their own package through ``register_model``, proves it matches TF-Slim with
it, as slimtune's own parity tests do. Make goldens with ``tools/tf_reference/make_parity_fixtures.py``
(or ``write_golden`` from any TF run), then in a test::

    golden = load_golden("tests/golden/my_net.npz")
    model = slimtune.create_model(golden.model_name, num_classes=golden.num_classes or 0).eval()
    slimtune.restore(model, golden.weights())
    logits, end_points = model.forward_endpoints(torch.from_numpy(golden.inputs).permute(0, 3, 1, 2))
    assert_matches_golden(logits, end_points, golden)

Golden file layout (compressed .npz, loaded with ``allow_pickle=False``):
  ``header``            uint8 bytes of a UTF-8 JSON object (names, kwargs, shapes, versions, and
                        ``weights_probe``: the first values of a few seeded variables, checked on
                        load so that a changed weights generator says "regenerate the goldens");
  ``logits``            the full reference logits (NHWC when 4-D);
  ``input_probe_idx/val`` a few input values, to detect drift when inputs are regenerated;
  ``ep_index_deltas``   per end point (in header order) its sorted sampled flat NHWC indices,
                        stored as first index then successive differences (compresses well);
  ``ep_values``         the reference values at those indices, all end points concatenated;
  ``ep_full``           flattened whole end points that have at most ``FULL_END_POINT_LIMIT``
                        elements, concatenated (header ``full`` says which).
One array per kind, not per end point: per-entry zip/npy overhead would dominate small files.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EndPointGolden", "FULL_END_POINT_LIMIT", "GOLDEN_FORMAT_VERSION", "Golden", "assert_matches_golden",
    "check_weights_probe", "end_point_samples", "flat_sample_indices", "load_golden", "seeded_inputs",
    "seeded_slim_weights", "seeded_value", "seeded_weights_probe", "to_nhwc", "write_golden",
]

GOLDEN_FORMAT_VERSION = 2
FULL_END_POINT_LIMIT = 4096
MAX_SAMPLES_PER_END_POINT = 512

# BatchNorm statistics and affine parameters; kept in ranges that keep 200-layer nets finite.
_BN_GAMMA_RANGE = (0.5, 1.5)
_BN_BETA_STD = 0.1
_BN_MEAN_STD = 0.1
_BN_VARIANCE_RANGE = (0.5, 1.5)
_BIAS_STD = 0.05
_UNKNOWN_STD = 0.05
# The last layer of a ResNet residual branch (slim's bottleneck "conv3") is damped, in the spirit
# of zero-gamma residual init: with random BN statistics nothing re-normalises the residual
# stream, so undamped branches double its variance per unit (1e16 after resnet_*_200's 66 units)
# and make all inputs look alike.  ResNet v1 ends the branch with BatchNorm (damp gamma and beta);
# the pre-activation v2 unit ends it with a plain biased conv (damp weights and biases).
_RESIDUAL_END_BN = re.compile(r"/bottleneck[^/]*/conv3/BatchNorm/(gamma|beta)$")
_RESIDUAL_END_CONV = re.compile(r"/bottleneck_v2/conv3/(weights|biases)$")
_RESIDUAL_GAMMA_RANGE = (0.1, 0.3)
_RESIDUAL_GAIN = 0.2
# Kernels that read at least this many channels are made zero-mean over their input channels.
# Post-ReLU inputs have a positive mean in every channel; trained BN statistics would remove it,
# random ones do not, so uncentered kernels turn it into an offset shared by all images and deep
# nets (MobileNet most) give nearly the same logits for any input.  RGB/grayscale first layers
# are left alone: centering over 3 channels would erase brightness.
_CENTER_MIN_INPUTS = 16


def _name_rng(seed: int, name: str, shape: Sequence[int] = ()) -> np.random.Generator:
    """A generator that depends only on (seed, name, shape), never on call order."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8")), len(shape), *map(int, shape)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _fan_in(leaf: str, shape: Sequence[int]) -> int:
    """Fan-in of a TF-layout kernel: HWIO conv, [H,W,C,M] depthwise, or [in,out] dense."""
    if leaf == "depthwise_weights" and len(shape) == 4:
        return int(shape[0] * shape[1])
    if len(shape) == 4:
        return int(shape[0] * shape[1] * shape[2])
    if len(shape) == 5:  # 3-D conv kernels (DHWIO)
        return int(np.prod(shape[:4]))
    if len(shape) >= 2:
        return int(shape[0])
    return max(int(np.prod(shape)) if shape else 1, 1)


def _center_over_inputs(leaf: str, value: np.ndarray) -> np.ndarray:
    """Zero-mean over the input-channel axis (unit variance kept) for wide dense/conv kernels."""
    if leaf == "depthwise_weights":  # one input channel per filter: nothing to center over
        return value
    axis = {2: 0, 4: 2, 5: 3}.get(value.ndim)  # [in, out], HWIO, DHWIO
    if axis is None or value.shape[axis] < _CENTER_MIN_INPUTS:
        return value
    count = value.shape[axis]
    return (value - value.mean(axis=axis, keepdims=True)) * np.sqrt(count / (count - 1))


def seeded_value(name: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The float32 value ``seeded_slim_weights`` gives one variable (TF layout)."""
    name = name[:-2] if name.endswith(":0") else name
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit("/", 1)[-1]
    rng = _name_rng(seed, name, shape)
    # Damping factor for the end of a residual branch (1.0 everywhere else).
    damp = _RESIDUAL_GAIN if (_RESIDUAL_END_BN.search(name) or _RESIDUAL_END_CONV.search(name)) else 1.0
    if leaf in ("weights", "depthwise_weights", "pointwise_weights", "kernel"):
        std = np.sqrt(2.0 / _fan_in(leaf, shape))  # He scaling keeps ReLU nets' variance steady
        value = _center_over_inputs(leaf, rng.standard_normal(shape)) * std * damp
    elif leaf in ("biases", "bias"):
        value = rng.standard_normal(shape) * _BIAS_STD * damp
    elif leaf == "gamma":
        value = rng.uniform(*(_RESIDUAL_GAMMA_RANGE if damp != 1.0 else _BN_GAMMA_RANGE), size=shape)
    elif leaf == "beta":
        value = rng.standard_normal(shape) * _BN_BETA_STD * damp
    elif leaf == "moving_mean":
        value = rng.standard_normal(shape) * _BN_MEAN_STD
    elif leaf == "moving_variance":
        value = rng.uniform(*_BN_VARIANCE_RANGE, size=shape)
    else:
        value = rng.standard_normal(shape) * _UNKNOWN_STD
    return np.asarray(value, dtype=np.float32)


def seeded_slim_weights(variables: Iterable[tuple[str, Sequence[int]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 TF-layout values for slim variables, each a function of (seed, name, shape) only."""
    weights: dict[str, np.ndarray] = {}
    for name, shape in variables:
        key = name[:-2] if name.endswith(":0") else name
        weights[key] = seeded_value(key, shape, seed)
    return weights


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A random (cells+1)x(cells+1) grid, bilinearly interpolated up to height x width."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    ys = np.linspace(0.0, cells, height)
    xs = np.linspace(0.0, cells, width)
    y0 = np.minimum(np.floor(ys).astype(int), cells - 1)
    x0 = np.minimum(np.floor(xs).astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def seeded_inputs(batch: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """NHWC float32 images in [-1, 1]: smooth random blobs plus texture, distinct per image."""
    images = np.empty((batch, height, width, channels), dtype=np.float32)
    for b in range(batch):
        rng = _name_rng(seed, f"input/{b}", (height, width, channels))
        for c in range(channels):
            # Coarse blobs give large-scale structure; finer octaves and pixel noise give edges.
            coarse = _smooth_noise(rng, height, width, 3)
            medium = _smooth_noise(rng, height, width, max(4, min(height, width) // 8))
            fine = rng.standard_normal((height, width))
            # Per-image brightness and contrast: globally pooled features must differ too.
            offset = rng.uniform(-0.5, 0.5)
            contrast = rng.uniform(0.6, 1.4)
            value = contrast * (coarse + 0.6 * medium + 0.25 * fine) + offset
            images[b, :, :, c] = np.tanh(0.9 * value)
    return images


def flat_sample_indices(size: int, name: str, seed: int, count: int) -> np.ndarray:
    """Sorted distinct flat indices into a tensor of ``size`` elements, seeded by (seed, name)."""
    count = int(min(count, size))
    rng = _name_rng(seed, "sample/" + name, (size,))
    return np.sort(rng.choice(size, size=count, replace=False)).astype(np.int64)


def _to_numpy(tensor: Any) -> np.ndarray:
    """A numpy copy of a numpy array or torch tensor (torch imported only if given one)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16; float32 is what slim computed in
        return tensor.numpy()
    return np.asarray(tensor)


def to_nhwc(tensor_nchw_or_2d: Any) -> np.ndarray:
    """Torch layout -> slim layout: 4-D NCHW becomes NHWC; 1-D/2-D are returned as is."""
    array = _to_numpy(tensor_nchw_or_2d)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    if array.ndim in (1, 2):
        return array
    raise ValueError(f"end points are 2-D or 4-D tensors, got shape {array.shape}")


def end_point_samples(tensor_nchw_or_2d: Any, indices: np.ndarray) -> np.ndarray:
    """Values of a torch-layout end point at flat NHWC indices (NCHW is permuted first)."""
    return to_nhwc(tensor_nchw_or_2d).reshape(-1)[np.asarray(indices, dtype=np.int64)]


@dataclass(frozen=True)
class EndPointGolden:
    """Reference values of one slim end point."""

    name: str
    shape: tuple[int, ...]          # slim (NHWC or 2-D) shape
    max_abs: float                  # max |value| over the whole reference tensor
    indices: np.ndarray             # sampled flat indices into the NHWC tensor
    values: np.ndarray              # reference values at those indices
    full: np.ndarray | None = None  # the whole tensor when small


@dataclass(frozen=True)
class Golden:
    """A TF-Slim reference run: what to build, which weights and inputs, what came out."""

    path: str
    config_name: str
    model_name: str
    model_kwargs: dict[str, Any]
    seed: int
    image_size: tuple[int, int]
    channels: int
    batch: int
    input_seed: int
    variables: list[tuple[str, tuple[int, ...]]]
    inputs: np.ndarray
    logits: np.ndarray
    end_points: dict[str, EndPointGolden]
    versions: dict[str, str] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        """The ``num_classes`` the slim net was built with (0/None = headless)."""
        return self.model_kwargs.get("num_classes")

    def weights(self) -> dict[str, np.ndarray]:
        """The seeded TF-layout weights the reference run used, keyed by slim variable name."""
        return seeded_slim_weights(self.variables, self.seed)


# The weights probe: a few values of the first few (small) seeded variables, recorded in each
# golden's header. A change of the seeded-weights generator would otherwise show up only as a
# parity failure that looks like a bug in a net; with the probe it says "regenerate the goldens".
_PROBE_VARIABLES = 3
_PROBE_VALUES = 16
_PROBE_MAX_ELEMENTS = 1 << 20  # never generate a huge tensor (VGG's fc6) just for the probe


def seeded_weights_probe(variables: Sequence[tuple[str, Sequence[int]]], seed: int) -> list:
    """[[name, [first values]], ...] of the first few small variables' seeded values."""
    probe = []
    for name, shape in variables:
        if int(np.prod(shape)) > _PROBE_MAX_ELEMENTS:
            continue
        value = seeded_value(name, shape, seed).reshape(-1)[:_PROBE_VALUES]
        probe.append([name[:-2] if name.endswith(":0") else name, [float(v) for v in value]])
        if len(probe) == _PROBE_VARIABLES:
            break
    return probe


def check_weights_probe(header: Mapping[str, Any], path: str | Path = "golden") -> None:
    """Raise ValueError when the seeded weights differ from those the golden was made with.

    Goldens written before the probe existed have none and pass unchecked.
    """
    recorded = header.get("weights_probe")
    if not recorded:
        return
    shapes = {name: shape for name, shape in header["variables"]}
    for name, values in recorded:
        current = seeded_value(name, shapes[name], header["seed"]).reshape(-1)[:len(values)]
        expected = np.asarray(values, dtype=np.float32)
        if not np.allclose(current, expected, rtol=1e-6, atol=1e-7):
            raise ValueError(f"{path}: the seeded weights of {name} differ from those this golden was made "
                             "with; the weights generator changed: regenerate the goldens "
                             "(tools/tf_reference/make_parity_fixtures.py)")


def _header_bytes(header: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def write_golden(path: str | Path, *, config_name: str, model_name: str, model_kwargs: Mapping[str, Any],
                 seed: int, input_seed: int, inputs: np.ndarray, variables: Sequence[tuple[str, Sequence[int]]],
                 logits: np.ndarray, end_points: Mapping[str, np.ndarray],
                 versions: Mapping[str, str] | None = None, sample_budget: int = 16384) -> Path:
    """Write a golden .npz: full logits, sampled end points (full when small), JSON header."""
    inputs = np.asarray(inputs, dtype=np.float32)
    batch, height, width, channels = inputs.shape
    regenerated = seeded_inputs(batch, height, width, channels, input_seed)
    if not np.array_equal(regenerated, inputs):
        raise ValueError("inputs must be seeded_inputs(batch, height, width, channels, input_seed)")
    per_end_point = max(32, min(MAX_SAMPLES_PER_END_POINT, sample_budget // max(len(end_points), 1)))
    arrays: dict[str, np.ndarray] = {"logits": np.asarray(logits, dtype=np.float32)}
    probe = flat_sample_indices(inputs.size, "inputs", input_seed, 64)
    arrays["input_probe_idx"] = probe.astype(np.int32)
    arrays["input_probe_val"] = inputs.reshape(-1)[probe]
    records, deltas, values, fulls = [], [], [], []
    for name, value in end_points.items():
        value = np.asarray(value, dtype=np.float32)
        idx = flat_sample_indices(value.size, name, seed, per_end_point)
        deltas.append(np.diff(idx, prepend=0))
        values.append(value.reshape(-1)[idx])
        has_full = value.size <= FULL_END_POINT_LIMIT
        if has_full:
            fulls.append(value.reshape(-1))
        records.append({"name": name, "shape": list(value.shape), "max_abs": float(np.max(np.abs(value))),
                        "samples": int(idx.size), "full": has_full})
    arrays["ep_index_deltas"] = np.concatenate(deltas or [np.zeros(0)]).astype(np.int32)
    arrays["ep_values"] = np.concatenate(values or [np.zeros(0)]).astype(np.float32)
    arrays["ep_full"] = np.concatenate(fulls or [np.zeros(0)]).astype(np.float32)
    header = {
        "format_version": GOLDEN_FORMAT_VERSION,
        "config_name": config_name,
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "seed": int(seed),
        "input": {"batch": batch, "height": height, "width": width, "channels": channels,
                  "seed": int(input_seed)},
        "variables": [[name[:-2] if name.endswith(":0") else name, [int(s) for s in shape]]
                      for name, shape in variables],
        "logits_shape": list(arrays["logits"].shape),
        "end_points": records,
        "versions": dict(versions or {}),
        "weights_probe": seeded_weights_probe(variables, seed),
    }
    arrays["header"] = _header_bytes(header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(partial, path)  # readers never see a half-written golden
    return path


def load_golden(path: str | Path) -> Golden:
    """Read a golden .npz (no pickle) and regenerate its inputs from the recorded seed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} does not exist; regenerate with tools/tf_reference")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(arrays["header"].tobytes().decode("utf-8"))
    if header.get("format_version") != GOLDEN_FORMAT_VERSION:
        raise ValueError(f"{path}: golden format {header.get('format_version')} is not {GOLDEN_FORMAT_VERSION}")
    spec = header["input"]
    inputs = seeded_inputs(spec["batch"], spec["height"], spec["width"], spec["channels"], spec["seed"])
    probe = arrays["input_probe_idx"].astype(np.int64)
    drift = np.max(np.abs(inputs.reshape(-1)[probe] - arrays["input_probe_val"]))
    if drift > 1e-5:
        raise ValueError(f"{path}: regenerated inputs differ from the recorded ones by {drift:.3g}; "
                         "numpy's generator changed, regenerate the goldens")
    check_weights_probe(header, path)
    end_points = {}
    sample_at = full_at = 0
    for record in header["end_points"]:
        count = record["samples"]
        indices = np.cumsum(arrays["ep_index_deltas"][sample_at:sample_at + count].astype(np.int64))
        values = arrays["ep_values"][sample_at:sample_at + count]
        sample_at += count
        full = None
        if record["full"]:
            size = int(np.prod(record["shape"]))
            full = arrays["ep_full"][full_at:full_at + size].reshape(record["shape"])
            full_at += size
        end_points[record["name"]] = EndPointGolden(
            name=record["name"], shape=tuple(record["shape"]), max_abs=float(record["max_abs"]),
            indices=indices, values=values, full=full)
    return Golden(
        path=str(path), config_name=header["config_name"], model_name=header["model_name"],
        model_kwargs=header["model_kwargs"], seed=header["seed"],
        image_size=(spec["height"], spec["width"]), channels=spec["channels"], batch=spec["batch"],
        input_seed=spec["seed"], variables=[(name, tuple(shape)) for name, shape in header["variables"]],
        inputs=inputs, logits=arrays["logits"], end_points=end_points,
        versions=header.get("versions", {}), header=header)


def _relative_error(actual: np.ndarray, expected: np.ndarray, scale: float) -> float:
    """max|actual - expected| / scale (inf when shapes differ or values are not finite)."""
    if actual.shape != expected.shape:
        return float("inf")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max(initial=0.0)) / scale


def assert_matches_golden(logits: Any, end_points: Mapping[str, Any] | None, golden: Golden,
                          rtol_of_max: float = 1e-4, end_point_rtol_of_max: float | None = None) -> None:
    """Check logits within rtol_of_max x max|reference logit| and every golden end point within
    end_point_rtol_of_max (default: rtol_of_max) x max|reference end point|."""
    end_point_rtol = rtol_of_max if end_point_rtol_of_max is None else end_point_rtol_of_max
    tiny = float(np.finfo(np.float32).tiny)
    failures: list[tuple[float, str]] = []  # (error / tolerance, message)

    ref_logits = golden.logits
    logits_scale = max(float(np.max(np.abs(ref_logits))), tiny)
    try:
        actual_logits = to_nhwc(logits)
    except ValueError as error:
        raise AssertionError(f"{golden.config_name}: logits: {error}") from None
    if actual_logits.shape != ref_logits.shape:
        failures.append((float("inf"), f"logits: shape {actual_logits.shape} != slim {ref_logits.shape}"))
    else:
        err = _relative_error(actual_logits, ref_logits, logits_scale)
        if not err <= rtol_of_max:
            failures.append((err / rtol_of_max, f"logits: max error {err:.3g} x max|ref| > {rtol_of_max:g}"))

    end_points = end_points or {}
    missing = [name for name in golden.end_points if name not in end_points]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        failures.append((float("inf"), f"{len(missing)} end point(s) missing: {shown}"))
    for name, ref in golden.end_points.items():
        if name not in end_points:
            continue
        try:
            actual = to_nhwc(end_points[name])
        except ValueError as error:
            failures.append((float("inf"), f"end point {name!r}: {error}"))
            continue
        if tuple(actual.shape) != ref.shape:
            failures.append((float("inf"), f"end point {name!r}: shape {tuple(actual.shape)} != slim {ref.shape}"))
            continue
        scale = max(ref.max_abs, tiny)
        if ref.full is not None:
            err = _relative_error(actual, ref.full, scale)
        else:
            err = _relative_error(actual.reshape(-1)[ref.indices], ref.values, scale)
        if not err <= end_point_rtol:
            failures.append((err / end_point_rtol,
                             f"end point {name!r}: max error {err:.3g} x max|ref| > {end_point_rtol:g}"))
    if failures:
        failures.sort(key=lambda item: -item[0])
        worst = failures[0][1]
        raise AssertionError(f"{golden.config_name}: {len(failures)} mismatch(es) against TF-Slim; worst: {worst}"
                             + "".join(f"\n  {message}" for _, message in failures[1:8]))
