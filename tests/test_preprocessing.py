"""slimtune.preprocessing against TensorFlow-Slim's numbers, plus the behaviour of the train paths.

Golden outputs come from tools/tf_reference/make_preprocessing_fixtures.py (slim's own
preprocessing run in TF on scikit-image's bundled photos); the photos are rebuilt here offline.
"""

from __future__ import annotations

import json
import math
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.errors import ConfigError, DataError
from slimtune.preprocessing import (cifarnet, get_preprocessing, inception, list_preprocessing, ops,
                                    resolve_preprocessing_name, vgg)

import skimage.data as skimage_data  # noqa: E402  (a test dependency: fail loudly if missing)

GOLDEN_PATH = Path(__file__).parent / "golden" / "preprocessing" / "tf_preprocessing.npz"

# Eval parity bounds: the brief allows 1/255 of the value range per pixel; the implementation
# reproduces TF's float32 arithmetic, so the observed differences are 0 (resizes) or a few ulps
# (reductions in per_image_standardization). The bounds leave room for other BLAS/CPU rounding.
VGG_TOL = 1e-3          # 0..255 units (brief: <= 1.0)
INCEPTION_TOL = 1e-5    # [-1, 1] units (brief: <= 2/255)
STANDARDIZED_TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_PATH) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["meta"] = json.loads(bytes(arrays["meta"]).decode())
    return arrays


@lru_cache(maxsize=None)
def photo(name: str, transform: str | None = None) -> np.ndarray:
    """A skimage.data photo as uint8 HWC (grayscale as HxWx1)."""
    image = getattr(skimage_data, name)()
    if transform == "rot90":
        image = np.ascontiguousarray(np.rot90(image))
    return image[:, :, None] if image.ndim == 2 else image


def chw(array: np.ndarray) -> torch.Tensor:
    """HWC numpy -> CHW tensor (a permuted view, as a DataLoader would usually get)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    """Same shape, max abs difference <= atol (torch.testing's first call costs seconds of imports)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = float((actual.double() - expected.double()).abs().max()) if actual.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff} > {atol}"


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())


def check_big(golden, key: str, ours: torch.Tensor, tol: float) -> float:
    """Compare against a stored grid + whole-output summary; returns the max abs difference."""
    out = hwc(ours)
    assert tuple(golden[key + "/shape"]) == out.shape
    stride = int(golden[key + "/stride"])
    diff = max_diff(out[::stride, ::stride], golden[key + "/grid"])
    flat = out.reshape(-1, out.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(np.stack([flat.mean(0), flat.std(0)]), golden[key + "/summary"],
                               rtol=1e-5, atol=tol)
    assert diff <= tol, f"{key}: max abs diff {diff}"
    return diff


def photo_cases():
    with np.load(GOLDEN_PATH) as data:
        meta = json.loads(bytes(data["meta"]).decode())
    return [tuple(p) for p in meta["photos"]]


PHOTO_CASES = photo_cases()


# ----------------------------------------------------------------------------------------------
# Eval parity with slim's own preprocessing (TensorFlow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,name,transform", PHOTO_CASES, ids=[p[0] for p in PHOTO_CASES])
def test_eval_matches_tensorflow(golden, key, name, transform):
    image = chw(photo(name, transform))
    check_big(golden, f"eval/vgg224/{key}", get_preprocessing("vgg_16", False)(image, 224, 224), VGG_TOL)
    inception_eval = get_preprocessing("inception_v3", False)
    check_big(golden, f"eval/inception224/{key}", inception_eval(image, 224, 224), INCEPTION_TOL)
    check_big(golden, f"eval/inception299/{key}", inception_eval(image, 299, 299), INCEPTION_TOL)
    ours = hwc(get_preprocessing("cifarnet", False)(image, 32, 32))
    assert max_diff(ours, golden[f"eval/cifarnet32/{key}"]) <= STANDARDIZED_TOL


def test_eval_full_resolution_small_sizes(golden):
    """Every pixel, not a grid: small output sizes through the same code paths."""
    for key, name, transform in (PHOTO_CASES[0], PHOTO_CASES[6]):
        image = chw(photo(name, transform))
        ours = vgg.preprocess_image(image, 64, 48, is_training=False, resize_side_min=72)
        assert max_diff(hwc(ours), golden[f"eval_full/vgg_64x48_side72/{key}"]) <= VGG_TOL
        ours = inception.preprocess_image(image, 72, 56, is_training=False)
        assert max_diff(hwc(ours), golden[f"eval_full/inception_72x56/{key}"]) <= INCEPTION_TOL
        # slim's cifarnet eval swaps height and width: a 24x32 request comes out 32x24
        ours = get_preprocessing("cifarnet", False)(image, 24, 32)
        assert ours.shape == (3, 32, 24)
        assert max_diff(hwc(ours), golden[f"eval_full/cifarnet_24x32/{key}"]) <= STANDARDIZED_TOL
        unswapped = cifarnet.preprocess_for_eval(image, 24, 32, slim_size_swap=False)
        assert unswapped.shape == (3, 24, 32)


def test_lenet_matches_tensorflow_on_grayscale_photos(golden):
    for key in ("coins", "camera"):
        image = chw(photo(key))
        fn = get_preprocessing("lenet", True)
        assert max_diff(hwc(fn(image, 28, 28)), golden[f"eval/lenet28/{key}"]) == 0.0
        swapped = fn(image, 20, 28)        # slim's (width, height) swap: comes out 28x20
        assert swapped.shape == (1, 28, 20)
        assert max_diff(hwc(swapped), golden[f"eval/lenet_20x28/{key}"]) == 0.0


def test_lenet_keeps_the_images_channels_as_slim_does():
    rgb = chw(photo("chelsea"))
    out = get_preprocessing("lenet", False)(rgb, 28, 28)
    assert out.shape == (3, 28, 28)
    assert_close(out, (ops.crop_or_pad(rgb, 28, 28).float() - 128) / 128)
    gray = get_preprocessing("lenet", False, use_grayscale=True)(rgb, 28, 28)
    assert_close(gray, (ops.rgb_to_grayscale(ops.crop_or_pad(rgb, 28, 28).float()) - 128) / 128)


# ----------------------------------------------------------------------------------------------
# Train paths with fixed randomness against TensorFlow
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [256, 301, 384, 512])
def test_vgg_aspect_preserving_resize_matches_tensorflow(golden, side):
    ours = ops.aspect_preserving_resize(chw(photo("chelsea")), side)
    assert check_big(golden, f"train/vgg_resize/chelsea_{side}", ours, 0.0) == 0.0


def test_vgg_train_with_fixed_parameters_matches_tensorflow(golden):
    image = chw(photo("coffee"))
    for side, top, left, flip in golden["train/vgg_fixed/params"].tolist():
        params = vgg.VggTrainParams(side, top, left, bool(flip))
        key = f"train/vgg_fixed/coffee_{side}_{top}_{left}_{flip}"
        assert check_big(golden, key, vgg.apply_train(image, 224, 224, params, exact=True), 0.0) == 0.0
        # the training default takes the cheaper pass order: float rounding apart, the same
        check_big(golden, key, vgg.apply_train(image, 224, 224, params), 1e-4)


@pytest.mark.parametrize("index", range(6))
def test_inception_train_with_fixed_parameters_matches_tensorflow(golden, index):
    spec = golden["meta"]["inception_cases"][index]
    params = inception.InceptionTrainParams(ops.CropBox(*spec["crop"]), spec["method"], spec["flip"],
                                            tuple((name, value) for name, value in spec["color_ops"]))
    image = chw(photo("chelsea"))
    key = f"train/inception_fixed/{index}"
    check_big(golden, key, inception.apply_train(image, 224, 224, params, exact=True), 2e-6)
    # default: 0..255 units, fused brightness + saturation; same numbers up to float rounding
    check_big(golden, key, inception.apply_train(image, 224, 224, params), 2e-5)


def test_cifarnet_train_with_fixed_parameters_matches_tensorflow(golden):
    image = chw(photo("coffee")[100:132, 200:232])
    for index, ((top, left), flip, delta, factor) in enumerate(golden["meta"]["cifar_cases"]):
        params = cifarnet.CifarnetTrainParams(top, left, flip, delta, factor)
        ours = cifarnet.apply_train(image, 32, 32, params)
        assert max_diff(hwc(ours), golden[f"train/cifarnet_fixed/{index}"]) <= STANDARDIZED_TOL


# ----------------------------------------------------------------------------------------------
# TF-compatible primitives
# ----------------------------------------------------------------------------------------------

def color_patch(golden) -> torch.Tensor:
    scale, shift = golden["ops/color_input_scale_shift"].tolist()
    patch = photo("astronaut")[180:220, 200:248].astype(np.float32) / np.float32(255.0)
    return chw((patch * np.float32(scale) + np.float32(shift)).astype(np.float32))


@pytest.mark.parametrize("name,fn,tol", [
    ("brightness", ops.adjust_brightness, 0.0),
    ("saturation", ops.adjust_saturation, 5e-7),
    ("hue", ops.adjust_hue, 0.0),
    ("contrast", ops.adjust_contrast, 5e-7),
])
def test_color_ops_match_tensorflow(golden, name, fn, tol):
    patch = color_patch(golden)
    keys = [k for k in golden if k.startswith(f"ops/{name}/")]
    assert len(keys) >= 2
    for key in keys:
        value = float(key.rsplit("/", 1)[1])
        assert max_diff(hwc(fn(patch.clone(), value)), golden[key]) <= tol, key


def test_grayscale_and_standardization_match_tensorflow(golden):
    assert max_diff(hwc(ops.rgb_to_grayscale(color_patch(golden))), golden["ops/grayscale"]) == 0.0
    uniform = torch.full((3, 5, 7), 9.0)
    assert max_diff(hwc(ops.per_image_standardization(uniform)), golden["ops/standardize_uniform"]) == 0.0


def test_central_crop_rule_matches_tensorflow(golden):
    for h, w, crop_h, crop_w in golden["ops/central_crop_0.875"].tolist():
        box = ops.central_crop_box(h, w, 0.875)
        assert (box.height, box.width) == (crop_h, crop_w)
        assert box.top == (h - crop_h) // 2 and box.left == (w - crop_w) // 2
    assert ops.central_crop_box(300, 451, 0.875)[2:] == (264, 395)   # not round(0.875 * n)


def test_aspect_preserving_size_matches_tensorflow(golden):
    for h, w, side, new_h, new_w in golden["ops/aspect_size"].tolist():
        assert ops.aspect_preserving_size(h, w, side) == (new_h, new_w), (h, w, side)


def test_crop_or_pad_matches_tensorflow(golden):
    ramp = torch.arange(7 * 9 * 2, dtype=torch.float32).view(7, 9, 2).permute(2, 0, 1)
    for key in (k for k in golden if k.startswith("ops/crop_or_pad/")):
        th, tw = map(int, key.rsplit("/", 1)[1].split("x"))
        assert max_diff(hwc(ops.crop_or_pad(ramp, th, tw)), golden[key]) == 0.0


def test_resize_bilinear_tf1_matches_tensorflow(golden):
    image = chw(photo("chelsea"))
    for h, w in ((7, 5), (200, 300), (517, 611)):
        key = f"ops/resize_bilinear/chelsea_{h}x{w}"
        out = ops.resize_bilinear_tf1(image, h, w)
        assert out.dtype == torch.float32
        assert check_big(golden, key, out, 0.0) == 0.0


def test_resize_window_equals_crop_of_full_resize():
    image = chw(photo("rocket"))
    full = ops.resize_bilinear_tf1(image, 300, 450)
    for window in ((0, 0, 300, 450), (17, 33, 100, 211), (299, 449, 1, 1), (5, 0, 37, 450)):
        top, left, h, w = window
        expected = full[:, top:top + h, left:left + w]
        for exact in (True, False):
            ours = ops.resize_bilinear_tf1_window(image, 300, 450, window, exact=exact)
            mirrored = ops.resize_bilinear_tf1_window(image, 300, 450, window, flip=True, exact=exact)
            tol = 0.0 if exact else 1e-4
            assert_close(ours, expected, atol=tol)
            assert_close(mirrored, expected.flip(-1), atol=tol)
    scaled = ops.resize_bilinear_tf1_window(image, 100, 100, value_scale=1 / 255)
    unit = image.float() * float(np.float32(1 / 255))     # TF: convert_image_dtype, then resize
    assert_close(scaled, ops.resize_bilinear_tf1(unit, 100, 100), atol=0.0)


def test_resize_methods_agree_on_identity_and_constant_images():
    constant = torch.full((3, 13, 17), 77, dtype=torch.uint8)
    ramp = torch.arange(3 * 6 * 8, dtype=torch.float32).view(3, 6, 8)
    for method in range(4):
        # TF's bicubic weights come from a quantised table, so they sum to 1 only approximately
        assert_close(ops.resize_tf1(constant, 9, 31, method), torch.full((3, 9, 31), 77.0), atol=1e-3)
        assert torch.equal(ops.resize_tf1(ramp, 6, 8, method), ramp)
    with pytest.raises(ConfigError):
        ops.resize_tf1(ramp, 4, 4, "lanczos")


def test_saturation_handles_out_of_range_pixels_like_tensorflow():
    # v <= 0: TF sets saturation 0, so the pixel becomes grey at its max
    pixel = torch.tensor([-0.3, -0.1, -0.2]).view(3, 1, 1)
    assert_close(ops.adjust_saturation(pixel, 1.5), torch.full((3, 1, 1), -0.1))
    # v > 0 > min: saturation > 1 is clamped to 1, so the minimum lands on 0
    pixel = torch.tensor([0.8, -0.2, 0.3]).view(3, 1, 1)
    out = ops.adjust_saturation(pixel, 1.0)
    assert float(out.min()) == pytest.approx(0.0, abs=1e-7) and float(out.max()) == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------
# sample_distorted_bounding_box: the distribution TF draws from
# ----------------------------------------------------------------------------------------------

def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("case,height,width,box", [
    ("whole_375x500", 375, 500, None),
    ("box_375x500", 375, 500, [0.1, 0.2, 0.5, 0.6]),
    ("whole_100x1000", 100, 1000, None),
])
def test_distorted_bbox_distribution_matches_tensorflow(golden, case, height, width, box):
    theirs = golden[f"sdbb/{case}"].astype(np.int64)               # 4000 TF draws
    generator = torch.Generator().manual_seed(7)
    ours = np.array([ops.sample_distorted_bounding_box(height, width, bbox=box, generator=generator)
                     for _ in range(2000)])
    # 2000 vs 4000 draws: a KS distance above 0.054 has p < 0.001 under equal distributions
    for column, what in ((0, "top"), (1, "left"), (2, "height"), (3, "width")):
        assert ks_distance(ours[:, column], theirs[:, column]) < 0.054, what
    area = lambda rows: rows[:, 2] * rows[:, 3] / (height * width)
    assert ks_distance(area(ours), area(theirs)) < 0.054
    fallback = lambda rows: np.mean((rows[:, 2] == height) & (rows[:, 3] == width))
    assert abs(fallback(ours) - fallback(theirs)) < 0.03


def test_distorted_bbox_scalar_and_batched_attempts_agree():
    """The first attempt runs in scalar code, the rest batched: both must follow the same rules."""
    rng = np.random.default_rng(0)
    for height, width in ((375, 500), (100, 1000), (12, 12), (1, 5), (640, 427)):
        draws = rng.random((400, 4))
        aspect = draws[:, 3].astype(np.float32) * np.float32(1.33 - 0.75) + np.float32(0.75)
        aspect = np.clip(aspect, np.float32(0.75), np.float32(1.33)).astype(np.float32)
        ok, top, left, crop_h, crop_w = ops._generate_random_crops(width, height, 0.05, 1.0, aspect, draws)
        for i in range(len(draws)):
            one = ops._generate_random_crop(width, height, 0.05, 1.0, aspect[i], draws[i].tolist())
            assert (one is not None) == bool(ok[i])
            if one is not None:
                assert one == (top[i], left[i], crop_h[i], crop_w[i])


def test_distorted_bbox_respects_slim_ranges():
    generator = torch.Generator().manual_seed(3)
    height, width = 375, 500
    boxes = [ops.sample_distorted_bounding_box(height, width, generator=generator) for _ in range(3000)]
    crops = np.array([b for b in boxes if (b.height, b.width) != (height, width)])
    area = crops[:, 2] * crops[:, 3] / (height * width)
    # the whole-image box with min_object_covered=0.1 makes the effective minimum area 0.1
    assert area.min() >= 0.1 and area.max() <= 1.0
    aspect = crops[:, 3] / crops[:, 2]
    slack = 0.5 / crops[:, 2] + 1e-6            # width is rounded to whole pixels
    assert np.all(aspect >= 0.75 - slack) and np.all(aspect <= 1.33 + slack)
    # TF draws offsets from [0, n - size): a smaller crop never reaches the bottom/right edge
    assert np.all((crops[:, 0] + crops[:, 2] < height) | (crops[:, 2] == height))
    assert np.all((crops[:, 1] + crops[:, 3] < width) | (crops[:, 3] == width))
    assert len(np.unique(crops[:, 2])) > 100 and len(np.unique(crops[:, 0])) > 100
    # with an object box the crop must cover at least 10% of it
    box = (0.1, 0.2, 0.3, 0.35)
    for _ in range(500):
        top, left, h, w = ops.sample_distorted_bounding_box(height, width, bbox=box, generator=generator)
        y0, x0, y1, x1 = int(0.1 * height), int(0.2 * width), int(0.3 * height), int(0.35 * width)
        inter = max(0, min(top + h, y1) - max(top, y0)) * max(0, min(left + w, x1) - max(left, x0))
        assert inter / ((y1 - y0) * (x1 - x0)) >= 0.1 or (h, w) == (height, width)


def test_distorted_bbox_falls_back_to_whole_image():
    # an unreachable object coverage: every attempt fails, TF returns the whole image
    box = ops.sample_distorted_bounding_box(50, 60, bbox=[0.0, 0.0, 1.0, 1.0], min_object_covered=1.0,
                                            area_range=(0.05, 0.5), generator=torch.Generator().manual_seed(0))
    assert box == ops.CropBox(0, 0, 50, 60)
    with pytest.raises(DataError):
        ops.sample_distorted_bounding_box(50, 60, bbox=[0.0, 0.0, 1.2, 1.0])
    with pytest.raises(ConfigError):
        ops.sample_distorted_bounding_box(50, 60, area_range=(0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Train-mode behaviour
# ----------------------------------------------------------------------------------------------

TRAIN_SPECS = [("vgg", 224, 3), ("inception", 224, 3), ("inception", 299, 3), ("cifarnet", 32, 3),
               ("lenet", 28, 3)]


@pytest.mark.parametrize("name,size,channels", TRAIN_SPECS)
def test_train_outputs_shape_dtype_and_range(name, size, channels):
    fn = get_preprocessing(name, is_training=True)
    torch.manual_seed(0)
    image = chw(photo("chelsea"))
    outputs = torch.stack([fn(image, size, size) for _ in range(8)])
    assert outputs.shape == (8, channels, size, size) and outputs.dtype == torch.float32
    assert torch.isfinite(outputs).all()
    if name == "inception":
        assert outputs.min() >= -1.0 and outputs.max() <= 1.0
    elif name == "vgg":
        assert outputs.min() >= -vgg.R_MEAN - 1e-3 and outputs.max() <= 255 - vgg.B_MEAN + 1e-3
    elif name == "cifarnet":
        flat = outputs.view(8, -1)
        assert_close(flat.mean(1), torch.zeros(8), atol=1e-4)
        assert_close(flat.std(1, unbiased=False), torch.ones(8), atol=1e-3)
    if name != "lenet":
        assert len({tuple(o.flatten()[:50].tolist()) for o in outputs}) == 8   # draws differ


@pytest.mark.parametrize("name", ["vgg", "inception", "cifarnet"])
def test_train_is_reproducible_under_seed_and_generator(name):
    fn = get_preprocessing(name, is_training=True)
    image = chw(photo("coffee"))
    size = 32 if name == "cifarnet" else 96
    torch.manual_seed(1234)
    first = [fn(image, size, size) for _ in range(3)]
    torch.manual_seed(1234)
    second = [fn(image, size, size) for _ in range(3)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(fn(image, size, size, generator=g1), fn(image, size, size, generator=g2))
    state = torch.get_rng_state()
    fn(image, size, size, generator=torch.Generator().manual_seed(9))
    assert torch.equal(state, torch.get_rng_state())        # an explicit generator leaves the global one


def test_vgg_train_draws_stay_in_slim_ranges():
    generator = torch.Generator().manual_seed(0)
    draws = [vgg.sample_train_params(375, 500, 224, 224, generator=generator) for _ in range(6000)]
    sides = np.array([d.resize_side for d in draws])
    assert sides.min() == 256 and sides.max() == 512            # inclusive on both ends
    assert len(np.unique(sides)) > 250
    for d in draws[:500]:
        new_h, new_w = ops.aspect_preserving_size(375, 500, d.resize_side)
        assert 0 <= d.top <= new_h - 224 and 0 <= d.left <= new_w - 224
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    tops = [d.top for d in draws if d.resize_side == 256]
    assert min(tops) == 0 and max(tops) == 256 - 224         # the crop reaches both edges


def test_vgg_train_output_is_a_crop_of_the_resized_image():
    image = chw(photo("astronaut"))
    torch.manual_seed(11)
    out = vgg.preprocess_for_train(image, 64, 64)
    torch.manual_seed(11)
    params = vgg.sample_train_params(512, 512, 64, 64)
    full = ops.aspect_preserving_resize(image, params.resize_side)
    crop = full[:, params.top:params.top + 64, params.left:params.left + 64]
    crop = crop.flip(-1) if params.flip else crop
    assert_close(out, crop - vgg._RGB_MEANS, atol=1e-4)


def test_inception_train_draws_stay_in_slim_ranges():
    generator = torch.Generator().manual_seed(0)
    fast = [inception.sample_train_params(300, 451, generator=generator) for _ in range(2000)]
    assert {p.resize_method for p in fast} == {0}
    assert {tuple(n for n, _ in p.color_ops) for p in fast} == {("brightness", "saturation")}
    brightness = np.array([p.color_ops[0][1] for p in fast])
    saturation = np.array([p.color_ops[1][1] for p in fast])
    assert brightness.min() >= -32 / 255 and brightness.max() < 32 / 255 and brightness.std() > 0.03
    assert saturation.min() >= 0.5 and saturation.max() < 1.5
    assert 0.45 < np.mean([p.flip for p in fast]) < 0.55
    slow = [inception.sample_train_params(300, 451, fast_mode=False, generator=generator) for _ in range(800)]
    assert {p.resize_method for p in slow} == {0, 1, 2, 3}
    assert {tuple(n for n, _ in p.color_ops) for p in slow} == set(inception.COLOR_ORDERINGS)
    for p in slow:
        for name, value in p.color_ops:
            low, high = inception._COLOR_RANGES[name]
            assert low <= value < high


def test_inception_non_fast_mode_runs_every_method_and_ordering():
    image = chw(photo("chelsea"))
    generator = torch.Generator().manual_seed(2)
    for _ in range(12):
        out = inception.preprocess_for_train(image, 64, 64, fast_mode=False, generator=generator)
        assert out.shape == (3, 64, 64) and out.min() >= -1 and out.max() <= 1
    for method in range(4):
        for ordering in inception.COLOR_ORDERINGS:
            params = inception.InceptionTrainParams(ops.CropBox(10, 20, 150, 200), method, True,
                                                    tuple((n, sum(inception._COLOR_RANGES[n]) / 2 + 0.01)
                                                          for n in ordering))
            exact = inception.apply_train(image, 48, 40, params, exact=True)
            fast = inception.apply_train(image, 48, 40, params)
            assert_close(fast, exact, atol=2e-5)


def test_inception_bbox_keeps_the_object_in_view():
    image = chw(photo("coffee"))
    box = torch.tensor([[[0.5, 0.6, 0.9, 0.95]]])
    generator = torch.Generator().manual_seed(4)
    for _ in range(200):
        crop = inception.sample_train_params(400, 600, bbox=box, generator=generator).crop
        y0, x0, y1, x1 = 200, 360, 360, 570
        inter = max(0, min(crop.top + crop.height, y1) - max(crop.top, y0)) * \
            max(0, min(crop.left + crop.width, x1) - max(crop.left, x0))
        assert inter >= 0.1 * (y1 - y0) * (x1 - x0) or crop == ops.CropBox(0, 0, 400, 600)
    out = get_preprocessing("inception", True)(image, 64, 64, bbox=box)
    assert out.shape == (3, 64, 64)


def test_cifarnet_train_crop_stays_inside_padding():
    generator = torch.Generator().manual_seed(0)
    draws = [cifarnet.sample_train_params(32, 32, 32, 32, generator=generator) for _ in range(2000)]
    tops = {d.top for d in draws}
    assert tops == set(range(9))                     # 32 + 2*4 padding -> offsets 0..8
    deltas = np.array([d.brightness_delta for d in draws])
    factors = np.array([d.contrast_factor for d in draws])
    assert deltas.min() >= -63 and deltas.max() < 63 and factors.min() >= 0.2 and factors.max() < 1.8


# ----------------------------------------------------------------------------------------------
# Inputs, grayscale, factory
# ----------------------------------------------------------------------------------------------

def test_grayscale_input_matches_replicated_rgb():
    gray = chw(photo("coins"))
    replicated = gray.expand(3, -1, -1).contiguous()
    for name, size in (("vgg", 224), ("inception", 299), ("cifarnet", 32)):
        fn = get_preprocessing(name, False)
        assert torch.equal(fn(gray, size, size), fn(replicated, size, size))


def test_layout_of_the_input_does_not_matter():
    array = photo("rocket")
    view, contiguous = chw(array), chw(array).contiguous()
    assert not view.is_contiguous()
    for name, size in (("vgg", 224), ("inception", 299)):
        for training in (False, True):
            fn = get_preprocessing(name, training)
            torch.manual_seed(3)
            a = fn(view, size, size)
            torch.manual_seed(3)
            assert torch.equal(a, fn(contiguous, size, size))
            assert a.is_contiguous()


@pytest.mark.parametrize("name", ["vgg", "inception", "cifarnet"])
def test_use_grayscale_gives_one_channel(name):
    image = chw(photo("chelsea"))
    size = 32 if name == "cifarnet" else 128
    for training in (False, True):
        out = get_preprocessing(name, training, use_grayscale=True)(image, size, size)
        assert out.shape == (1, size, size) and torch.isfinite(out).all()
    if name == "vgg":
        rgb = get_preprocessing("vgg", False)(image, size, size) + vgg._RGB_MEANS
        gray = get_preprocessing("vgg", False, use_grayscale=True)(image, size, size)
        assert_close(gray, ops.rgb_to_grayscale(rgb) - vgg._GRAY_MEAN, atol=1e-4)


def test_factory_names_follow_slim():
    # slim's four families, plus the pretrained-config one of timm / torchvision backbones
    assert list_preprocessing() == ["cifarnet", "inception", "lenet", "pretrained", "vgg"]
    expected = {"inception_v3": "inception", "inception_resnet_v2": "inception", "mobilenet_v1": "inception",
                "nasnet_large": "inception", "resnet_v1_50": "vgg", "resnet_v2_101": "vgg", "vgg_16": "vgg",
                "vgg_a": "vgg", "cifarnet": "cifarnet", "lenet": "lenet"}
    for model, family in expected.items():
        assert resolve_preprocessing_name(model) == family
        assert get_preprocessing(model, False).name == family
    for missing in ("alexnet_v2", "overfeat", "nope"):
        with pytest.raises(ConfigError, match="cifarnet, inception, lenet, pretrained, vgg"):
            get_preprocessing(missing, True)


def test_factory_function_options_and_pickling():
    image = chw(photo("chelsea"))
    eval_fn = get_preprocessing("resnet_v1_50", is_training=False)
    restored = pickle.loads(pickle.dumps(eval_fn))
    assert torch.equal(restored(image, 224, 224), eval_fn(image, 224, 224))
    bigger = get_preprocessing("vgg", False, resize_side_min=320)(image, 224, 224)
    assert torch.equal(bigger, vgg.preprocess_for_eval(image, 224, 224, resize_side=320))
    slow = get_preprocessing("inception", True, fast_mode=False)
    assert slow.defaults == {"fast_mode": False}
    assert slow(image, 32, 32, generator=torch.Generator().manual_seed(0)).shape == (3, 32, 32)


def test_bad_inputs_raise_clear_errors():
    fn = get_preprocessing("inception", False)
    with pytest.raises(DataError, match="uint8"):
        fn(torch.rand(3, 20, 20), 10, 10)
    with pytest.raises(DataError, match="permute"):
        fn(torch.zeros(20, 20, 3, dtype=torch.uint8), 10, 10)
    with pytest.raises(DataError):
        fn(np.zeros((3, 20, 20), np.uint8), 10, 10)
    with pytest.raises(ConfigError, match="resize_side_min"):
        get_preprocessing("vgg", False)(torch.zeros(3, 300, 300, dtype=torch.uint8), 300, 300)
    with pytest.raises(ConfigError):
        get_preprocessing("cifarnet", True)(torch.zeros(3, 20, 20, dtype=torch.uint8), 32, 32)
    with pytest.raises(ConfigError):
        ops.central_crop_box(10, 10, 0.0)


def test_eval_of_tiny_and_extreme_aspect_images():
    for shape in ((3, 1, 1), (3, 2, 900), (1, 700, 3)):
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for name, size in (("inception", 299), ("cifarnet", 32), ("lenet", 28)):
            out = get_preprocessing(name, False)(image, size, size)
            assert torch.isfinite(out).all()
        out = get_preprocessing("vgg", True)(image, 224, 224)
        assert out.shape == (3, 224, 224) and math.isfinite(float(out.sum()))
