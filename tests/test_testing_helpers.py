"""Tests for slimtune.testing: seeded weights/inputs and the golden-file round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from slimtune.testing import (
    FULL_END_POINT_LIMIT,
    assert_matches_golden,
    end_point_samples,
    flat_sample_indices,
    load_golden,
    seeded_inputs,
    seeded_slim_weights,
    to_nhwc,
    write_golden,
)

GOLDEN_DIR = Path(__file__).parent / "golden"

MANIFEST = [
    ("net/conv1/weights", (3, 3, 64, 128)),
    ("net/conv1/BatchNorm/gamma", (128,)),
    ("net/conv1/BatchNorm/beta", (128,)),
    ("net/conv1/BatchNorm/moving_mean", (128,)),
    ("net/conv1/BatchNorm/moving_variance", (128,)),
    ("net/dw/depthwise_weights", (3, 3, 512, 1)),
    ("net/fc/weights", (2048, 16)),
    ("net/fc/biases", (16,)),
    ("net/odd/global_step_like", (40, 50)),
]


# ----------------------------------------------------------------------------- seeded weights

def test_seeded_weights_are_deterministic_float32_in_tf_layout():
    first = seeded_slim_weights(MANIFEST, seed=3)
    second = seeded_slim_weights(MANIFEST, seed=3)
    assert list(first) == [name for name, _ in MANIFEST]
    for name, shape in MANIFEST:
        assert first[name].shape == shape
        assert first[name].dtype == np.float32
        np.testing.assert_array_equal(first[name], second[name])


def test_seeded_weights_depend_on_seed_name_and_shape():
    base = seeded_slim_weights(MANIFEST, seed=0)
    other_seed = seeded_slim_weights(MANIFEST, seed=1)
    for name, _ in MANIFEST:
        assert not np.array_equal(base[name], other_seed[name]), name
    renamed = seeded_slim_weights([("net/conv2/weights", (3, 3, 64, 128))], seed=0)
    assert not np.array_equal(renamed["net/conv2/weights"], base["net/conv1/weights"])
    reshaped = seeded_slim_weights([("net/fc/biases", (17,))], seed=0)
    assert not np.array_equal(reshaped["net/fc/biases"][:16], base["net/fc/biases"])


def test_seeded_weights_do_not_depend_on_order_or_neighbours():
    base = seeded_slim_weights(MANIFEST, seed=7)
    shuffled = list(MANIFEST)
    random.Random(0).shuffle(shuffled)
    again = seeded_slim_weights(shuffled[:4], seed=7)
    for name, value in again.items():
        np.testing.assert_array_equal(value, base[name])


def test_tensor_suffix_is_ignored():
    plain = seeded_slim_weights([("a/weights", (2, 3))])
    suffixed = seeded_slim_weights([("a/weights:0", (2, 3))])
    np.testing.assert_array_equal(plain["a/weights"], suffixed["a/weights"])


@pytest.mark.parametrize(
    "name, shape, fan_in",
    [
        ("c/weights", (3, 3, 64, 128), 3 * 3 * 64),           # conv HWIO
        ("c/weights", (7, 7, 512, 64), 7 * 7 * 512),           # FC-as-conv (vgg fc6)
        ("d/depthwise_weights", (3, 3, 2048, 1), 3 * 3),       # depthwise [H, W, C, M]
        ("f/weights", (4096, 100), 4096),                      # fully connected [in, out]
    ],
)
def test_weights_use_he_scaling(name, shape, fan_in):
    value = seeded_slim_weights([(name, shape)])[name].astype(np.float64)
    expected = np.sqrt(2.0 / fan_in)
    assert abs(value.mean()) < 0.05 * expected
    assert value.std() == pytest.approx(expected, rel=0.03)


def test_wide_kernels_are_zero_mean_over_input_channels_narrow_ones_are_not():
    values = seeded_slim_weights([("a/weights", (3, 3, 64, 32)), ("b/weights", (512, 10)),
                                  ("rgb/weights", (3, 3, 3, 64)), ("d/depthwise_weights", (3, 3, 64, 1))])
    np.testing.assert_allclose(values["a/weights"].astype(np.float64).mean(axis=2), 0.0, atol=1e-6)
    np.testing.assert_allclose(values["b/weights"].astype(np.float64).mean(axis=0), 0.0, atol=1e-6)
    assert np.abs(values["rgb/weights"].mean(axis=2)).max() > 0.05
    assert np.abs(values["d/depthwise_weights"].sum(axis=(0, 1))).max() > 0.1


def test_residual_branch_ends_are_damped():
    names = [("r/block1/unit_1/bottleneck_v1/conv3/BatchNorm/gamma", (256,)),
             ("r/block1/unit_1/bottleneck_v1/conv2/BatchNorm/gamma", (256,)),
             ("r/block1/unit_1/bottleneck_v2/conv3/weights", (1, 1, 64, 256)),
             ("r/block1/unit_1/bottleneck_v2/conv2/weights", (1, 1, 64, 256))]
    values = seeded_slim_weights(names)
    damped_gamma, gamma, damped_w, w = (values[name] for name, _ in names)
    assert damped_gamma.max() <= 0.3 and gamma.min() >= 0.5
    assert damped_w.std() == pytest.approx(0.2 * w.std(), rel=0.05)


def test_batch_norm_and_bias_ranges():
    names = [("bn/gamma", (4096,)), ("bn/beta", (4096,)), ("bn/moving_mean", (4096,)),
             ("bn/moving_variance", (4096,)), ("fc/biases", (4096,)), ("x/unknown", (4096,))]
    values = {k: v.astype(np.float64) for k, v in seeded_slim_weights(names, seed=5).items()}
    gamma, variance = values["bn/gamma"], values["bn/moving_variance"]
    assert gamma.min() >= 0.5 and gamma.max() <= 1.5 and gamma.std() > 0.25
    assert variance.min() >= 0.5 and variance.max() <= 1.5 and variance.std() > 0.25
    assert values["bn/beta"].std() == pytest.approx(0.1, rel=0.1)
    assert values["bn/moving_mean"].std() == pytest.approx(0.1, rel=0.1)
    assert 0 < values["fc/biases"].std() < 0.1
    assert 0 < values["x/unknown"].std() < 0.1
    assert len({float(v[0]) for v in values.values()}) == len(values)


# ----------------------------------------------------------------------------- seeded inputs

def test_seeded_inputs_shape_range_and_determinism():
    images = seeded_inputs(2, 40, 48, 3, seed=11)
    assert images.shape == (2, 40, 48, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0.3
    np.testing.assert_array_equal(images, seeded_inputs(2, 40, 48, 3, seed=11))
    assert not np.array_equal(images, seeded_inputs(2, 40, 48, 3, seed=12))


def test_seeded_inputs_differ_between_images_and_are_spatially_smooth():
    images = seeded_inputs(2, 64, 64, 3, seed=0).astype(np.float64)
    correlation = np.corrcoef(images[0].ravel(), images[1].ravel())[0, 1]
    assert abs(correlation) < 0.5
    assert np.abs(images[0] - images[1]).mean() > 0.3
    # Neighbouring pixels are strongly correlated: these are images, not white noise.
    neighbour = np.corrcoef(images[:, :, :-1].ravel(), images[:, :, 1:].ravel())[0, 1]
    assert neighbour > 0.6


def test_single_channel_inputs():
    images = seeded_inputs(2, 28, 28, 1, seed=0)
    assert images.shape == (2, 28, 28, 1)
    assert not np.array_equal(images[0], images[1])


# ----------------------------------------------------------------------------- sampling

def test_flat_sample_indices_are_sorted_distinct_and_seeded():
    idx = flat_sample_indices(10_000, "block1", seed=0, count=300)
    assert idx.shape == (300,) and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 10_000
    np.testing.assert_array_equal(idx, flat_sample_indices(10_000, "block1", seed=0, count=300))
    assert not np.array_equal(idx, flat_sample_indices(10_000, "block2", seed=0, count=300))
    assert flat_sample_indices(5, "tiny", seed=0, count=300).tolist() == [0, 1, 2, 3, 4]


def test_end_point_samples_permutes_nchw_to_nhwc():
    nhwc = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    nchw = nhwc.transpose(0, 3, 1, 2)
    indices = np.array([0, 7, 33, 119])
    np.testing.assert_array_equal(end_point_samples(nchw, indices), nhwc.reshape(-1)[indices])
    two_d = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(end_point_samples(two_d, [1, 11]), [1.0, 11.0])
    with pytest.raises(ValueError):
        to_nhwc(np.zeros((2, 3, 4)))


def test_end_point_samples_accepts_torch_tensors():
    import torch
    nhwc = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    tensor = torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy()).requires_grad_()
    indices = np.array([3, 50, 100])
    np.testing.assert_array_equal(end_point_samples(tensor, indices), nhwc.reshape(-1)[indices])


# ----------------------------------------------------------------------------- golden files

def _synthetic_golden(tmp_path: Path):
    """A tiny golden: one big 4-D end point (sampled), one small (stored whole), 2-D logits."""
    rng = np.random.default_rng(1)
    inputs = seeded_inputs(2, 16, 16, 3, seed=4)
    big = rng.standard_normal((2, 16, 16, 32)).astype(np.float32)           # 16384 > limit
    small = rng.standard_normal((2, 1, 1, 10)).astype(np.float32) * 3.0
    logits = small.reshape(2, 10)
    assert big.size > FULL_END_POINT_LIMIT >= small.size
    path = write_golden(
        tmp_path / "toy.npz", config_name="toy", model_name="toynet",
        model_kwargs={"num_classes": 10, "global_pool": True}, seed=9, input_seed=4, inputs=inputs,
        variables=[("toynet/conv1/weights", (3, 3, 3, 32)), ("toynet/logits/biases", (10,))],
        logits=logits, end_points={"toynet/conv1": big, "toynet/logits": small},
        versions={"tensorflow": "test"})
    return path, inputs, big, small, logits


def test_golden_round_trip(tmp_path):
    path, inputs, big, small, logits = _synthetic_golden(tmp_path)
    golden = load_golden(path)
    assert golden.config_name == "toy" and golden.model_name == "toynet"
    assert golden.model_kwargs == {"num_classes": 10, "global_pool": True} and golden.num_classes == 10
    assert golden.seed == 9 and golden.input_seed == 4
    assert golden.image_size == (16, 16) and golden.channels == 3 and golden.batch == 2
    assert golden.variables == [("toynet/conv1/weights", (3, 3, 3, 32)), ("toynet/logits/biases", (10,))]
    assert golden.versions == {"tensorflow": "test"}
    np.testing.assert_array_equal(golden.inputs, inputs)
    np.testing.assert_array_equal(golden.logits, logits)
    conv = golden.end_points["toynet/conv1"]
    assert conv.shape == (2, 16, 16, 32) and conv.full is None
    assert 32 <= conv.indices.size <= 512
    np.testing.assert_array_equal(conv.values, big.reshape(-1)[conv.indices])
    assert conv.max_abs == pytest.approx(float(np.abs(big).max()))
    np.testing.assert_array_equal(golden.end_points["toynet/logits"].full, small)
    weights = golden.weights()
    assert weights["toynet/conv1/weights"].shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(weights["toynet/logits/biases"],
                                  seeded_slim_weights([("toynet/logits/biases", (10,))], 9)["toynet/logits/biases"])


def test_write_golden_rejects_inputs_that_cannot_be_regenerated(tmp_path):
    with pytest.raises(ValueError, match="seeded_inputs"):
        write_golden(tmp_path / "bad.npz", config_name="bad", model_name="m", model_kwargs={}, seed=0,
                     input_seed=0, inputs=np.zeros((2, 4, 4, 3), np.float32), variables=[],
                     logits=np.ones((2, 3), np.float32), end_points={})


def test_assert_matches_golden_accepts_torch_layout_outputs(tmp_path):
    path, _, big, small, logits = _synthetic_golden(tmp_path)
    golden = load_golden(path)
    outputs = {"toynet/conv1": big.transpose(0, 3, 1, 2), "toynet/logits": small.transpose(0, 3, 1, 2),
               "extra/end_point": np.zeros((2, 3))}
    assert_matches_golden(logits, outputs, golden)
    # Perturbations below the tolerance pass (1e-4 of max|ref| is the default budget).
    nudged = dict(outputs, **{"toynet/conv1": outputs["toynet/conv1"] + 0.5e-4 * np.abs(big).max()})
    assert_matches_golden(logits, nudged, golden)


def test_assert_matches_golden_names_the_worst_end_point(tmp_path):
    path, _, big, small, logits = _synthetic_golden(tmp_path)
    golden = load_golden(path)
    broken = big.copy()
    broken.reshape(-1)[golden.end_points["toynet/conv1"].indices[5]] += 0.01 * np.abs(big).max()
    slightly = small * (1 + 3e-4)
    outputs = {"toynet/conv1": broken.transpose(0, 3, 1, 2), "toynet/logits": slightly.transpose(0, 3, 1, 2)}
    with pytest.raises(AssertionError, match=r"worst: end point 'toynet/conv1'") as info:
        assert_matches_golden(logits, outputs, golden)
    assert "toynet/logits" in str(info.value) and "2 mismatch" in str(info.value)


def test_assert_matches_golden_checks_logits_missing_points_and_shapes(tmp_path):
    path, _, big, small, logits = _synthetic_golden(tmp_path)
    golden = load_golden(path)
    good = {"toynet/conv1": big.transpose(0, 3, 1, 2), "toynet/logits": small.transpose(0, 3, 1, 2)}
    with pytest.raises(AssertionError, match="worst: logits"):
        assert_matches_golden(logits * 1.01, good, golden)
    with pytest.raises(AssertionError, match="logits: shape"):
        assert_matches_golden(logits[:, :9], good, golden)
    with pytest.raises(AssertionError, match="1 end point.*missing: toynet/conv1"):
        assert_matches_golden(logits, {"toynet/logits": good["toynet/logits"]}, golden)
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_golden(logits, dict(good, **{"toynet/conv1": big}), golden)  # NHWC given as NCHW
    with pytest.raises(AssertionError, match="2-D or 4-D"):
        assert_matches_golden(logits, dict(good, **{"toynet/conv1": big[0]}), golden)
    with pytest.raises(AssertionError, match="toynet/conv1"):
        nan = big.copy()
        nan.reshape(-1)[golden.end_points["toynet/conv1"].indices[0]] = np.nan
        assert_matches_golden(logits, dict(good, **{"toynet/conv1": nan.transpose(0, 3, 1, 2)}), golden)


def test_load_golden_detects_input_drift(tmp_path):
    path, *_ = _synthetic_golden(tmp_path)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["input_probe_val"] = arrays["input_probe_val"] + 0.01
    tampered = tmp_path / "tampered.npz"
    np.savez_compressed(tampered, **arrays)
    with pytest.raises(ValueError, match="regenerate"):
        load_golden(tampered)
    with pytest.raises(FileNotFoundError):
        load_golden(tmp_path / "missing.npz")


def test_load_golden_detects_a_changed_weights_generator(tmp_path, monkeypatch):
    """The header's weights probe: a golden made with other seeded weights says "regenerate"."""
    path, *_ = _synthetic_golden(tmp_path)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(arrays["header"].tobytes().decode("utf-8"))
    assert [name for name, _ in header["weights_probe"]] == ["toynet/conv1/weights", "toynet/logits/biases"]
    load_golden(path)
    # The generator changes (here: every seeded value scaled), the goldens stay as they were.
    import slimtune.testing as testing

    original = testing.seeded_value
    monkeypatch.setattr(testing, "seeded_value", lambda *args, **kwargs: original(*args, **kwargs) * 1.001)
    with pytest.raises(ValueError, match="toynet/conv1/weights.*regenerate the goldens"):
        load_golden(path)
    monkeypatch.undo()
    # Goldens written before the probe existed load unchecked.
    del header["weights_probe"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(tmp_path / "old.npz", **arrays)
    monkeypatch.setattr(testing, "seeded_value", lambda *args, **kwargs: original(*args, **kwargs) * 1.001)
    load_golden(tmp_path / "old.npz")


def test_the_probe_skips_huge_variables():
    from slimtune.testing import seeded_weights_probe

    probe = seeded_weights_probe([("n/fc6/weights", (7, 7, 512, 4096)), ("n/fc6/biases", (4096,))], 0)
    assert [name for name, _ in probe] == ["n/fc6/biases"] and len(probe[0][1]) == 16


# ----------------------------------------------------------------------------- committed goldens

COMMITTED = sorted(GOLDEN_DIR.glob("*.npz"))


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_golden_is_well_formed(path):
    golden = load_golden(path)
    assert golden.config_name == path.stem
    assert golden.versions.get("tensorflow") and golden.versions.get("tf_slim")
    assert golden.variables and golden.end_points
    assert np.all(np.isfinite(golden.logits))
    flat = golden.logits.reshape(golden.batch, -1).astype(np.float64)
    assert np.linalg.norm(flat[0] - flat[1]) > 0.05 * np.linalg.norm(flat[0])
    for ref in golden.end_points.values():
        assert ref.values.shape == ref.indices.shape and np.all(np.isfinite(ref.values))
        assert ref.indices.max() < np.prod(ref.shape)
        if ref.full is not None:
            np.testing.assert_array_equal(ref.full.reshape(-1)[ref.indices], ref.values)
    header = json.loads(json.dumps(golden.header))  # header is plain JSON
    assert header["logits_shape"] == list(golden.logits.shape)
