"""Golden outputs of TF-Slim's preprocessing, for tests/test_preprocessing.py (developer-only).

Run with the TensorFlow reference environment (never at test time):

    /work/tfenv/bin/python tools/tf_reference/make_preprocessing_fixtures.py \
        --slim_src /work/slim_src --out tests/golden/preprocessing/tf_preprocessing.npz

What it records (inputs are scikit-image's bundled photos, rebuilt by the tests offline):
  * eval/<net>/<photo>: slim's own eval preprocessing (research/slim preprocessing_factory, run in
    TF) for vgg 224, inception 224 and 299, cifarnet 32 and lenet 28. To stay small, 224/299
    outputs are stored on a stride-5 grid (rows and columns 0, 5, 10, ...; both parities) plus
    per-channel mean/std of the whole output; small outputs are stored whole. A few photos also
    get a full-resolution eval at a small size (every pixel checked).
  * train/...: TF ops that make up slim's train paths, with the randomness fixed: vgg's
    aspect-preserving resize to chosen sides and its crop/flip, inception's fixed-box crop with each
    resize method, flip and colour ops in each ordering, cifarnet's pad/crop/brightness/contrast/
    standardisation, and each colour op alone with fixed factors.
  * sdbb/<case>: 4000 draws of tf.image.sample_distorted_bounding_box with slim's settings, for
    distribution comparisons.
  * ops/...: central_crop / crop_or_pad / aspect-size tables and small op outputs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# (key, skimage.data name, transform): transform 'rot90' makes a portrait photo.
PHOTOS = [
    ("chelsea", "chelsea", None),          # 300x451, the odd-size case
    ("coffee", "coffee", None),            # 400x600
    ("astronaut", "astronaut", None),      # 512x512
    ("rocket", "rocket", None),            # 427x640
    ("colorwheel", "colorwheel", None),    # 370x371, saturated colours
    ("coffee_portrait", "coffee", "rot90"),  # 600x400
    ("coins", "coins", None),              # 303x384 grayscale
    ("camera", "camera", None),            # 512x512 grayscale
]
GRID_STRIDE = 5      # both parities of rows and columns are sampled
COARSE_STRIDE = 11   # for large intermediate images


def load_photo(name: str, transform: str | None) -> np.ndarray:
    """A uint8 HWC photo from skimage.data (grayscale kept as HxWx1)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if transform == "rot90":
        image = np.ascontiguousarray(np.rot90(image))
    if image.ndim == 2:
        image = image[:, :, None]
    return image


def rgb(image: np.ndarray) -> np.ndarray:
    """What slim's decoders give for channels=3: grayscale replicated."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def summary(out: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of an HWC output (float64)."""
    flat = out.reshape(-1, out.shape[-1]).astype(np.float64)
    return np.stack([flat.mean(0), flat.std(0)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slim_src", default="/work/slim_src")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "..", "tests", "golden", "preprocessing",
                                                      "tf_preprocessing.npz"))
    args = parser.parse_args()

    from slim_env import load_slim

    env = load_slim(args.slim_src)
    tf = env.tf
    factory = env.preprocessing_factory
    inception_pre = env.import_module("preprocessing.inception_preprocessing")
    vgg_pre = env.import_module("preprocessing.vgg_preprocessing")
    golden: dict[str, np.ndarray] = {}

    def run(build, *inputs):
        """Build a graph from placeholders for `inputs`, run it once, return numpy outputs."""
        with tf.Graph().as_default():
            holders = [tf.placeholder(tf.as_dtype(x.dtype), x.shape) for x in inputs]
            outputs = build(*holders)
            with tf.Session() as sess:
                return sess.run(outputs, dict(zip(holders, inputs)))

    def store_big(key: str, out: np.ndarray, stride: int = GRID_STRIDE) -> None:
        golden[key + "/grid"] = out[::stride, ::stride].astype(np.float32)
        golden[key + "/stride"] = np.array(stride, np.int64)
        golden[key + "/shape"] = np.array(out.shape, np.int64)
        golden[key + "/summary"] = summary(out)

    # ---- eval paths through slim's own preprocessing_factory -------------------------------
    eval_cases = [("vgg_16", 224), ("inception_v3", 224), ("inception_v3", 299), ("cifarnet", 32)]
    for key, name, transform in PHOTOS:
        photo = load_photo(name, transform)
        image = rgb(photo)
        for net, size in eval_cases:
            fn = factory.get_preprocessing(net, is_training=False)
            out = run(lambda x, fn=fn, size=size: fn(x, size, size), image)
            family = {"vgg_16": "vgg", "inception_v3": "inception", "cifarnet": "cifarnet"}[net]
            target = f"eval/{family}{size}/{key}"
            if size >= 224:
                store_big(target, out)
            else:
                golden[target] = out.astype(np.float32)
        if photo.shape[2] == 1:   # slim's lenet runs on 1-channel MNIST-like input
            fn = factory.get_preprocessing("lenet", is_training=False)
            golden[f"eval/lenet28/{key}"] = run(lambda x: fn(x, 28, 28), photo)
            golden[f"eval/lenet_20x28/{key}"] = run(lambda x: fn(x, 20, 28), photo)
    # full-resolution checks at small sizes: every pixel compared
    for key, name, transform in (PHOTOS[0], PHOTOS[6]):
        image = rgb(load_photo(name, transform))
        vgg_small = run(lambda x: vgg_pre.preprocess_image(x, 64, 48, is_training=False,
                                                           resize_side_min=72), image)
        golden[f"eval_full/vgg_64x48_side72/{key}"] = vgg_small
        inc_small = run(lambda x: inception_pre.preprocess_image(x, 72, 56, is_training=False), image)
        golden[f"eval_full/inception_72x56/{key}"] = inc_small
        cif = factory.get_preprocessing("cifarnet", is_training=False)
        golden[f"eval_full/cifarnet_24x32/{key}"] = run(lambda x: cif(x, 24, 32, add_image_summaries=False),
                                                         image)

    # ---- deterministic train pieces ---------------------------------------------------------
    chelsea = load_photo("chelsea", None)
    coffee = load_photo("coffee", None)
    for side in (256, 301, 384, 512):
        out = run(lambda x, side=side: vgg_pre._aspect_preserving_resize(x, side), chelsea)
        store_big(f"train/vgg_resize/chelsea_{side}", out, stride=COARSE_STRIDE)
    # vgg train with fixed side / crop / flip: resize, slice, flip, float, mean subtraction
    for side, top, left, flip in ((256, 17, 60, True), (333, 0, 0, False), (512, 288, 539, True)):
        def vgg_train(x, side=side, top=top, left=left, flip=flip):
            image = vgg_pre._aspect_preserving_resize(x, side)
            image = tf.slice(image, [top, left, 0], [224, 224, 3])
            image = tf.image.flip_left_right(image) if flip else image
            return vgg_pre._mean_image_subtraction(tf.to_float(image), [vgg_pre._R_MEAN, vgg_pre._G_MEAN,
                                                                         vgg_pre._B_MEAN])
        store_big(f"train/vgg_fixed/coffee_{side}_{top}_{left}_{int(flip)}", run(vgg_train, coffee))
    golden["train/vgg_fixed/params"] = np.array([[256, 17, 60, 1], [333, 0, 0, 0], [512, 288, 539, 1]])

    # inception train with fixed crop / method / flip / colour ops (slim's distort_color arithmetic)
    inception_cases = [
        # crop (top, left, h, w), method, flip, [(op, value), ...]
        ((40, 70, 210, 300), 0, True, [("brightness", 0.09), ("saturation", 1.31)]),
        ((0, 0, 300, 451), 0, False, [("brightness", -0.12), ("saturation", 0.55)]),
        ((120, 200, 95, 130), 0, True, [("brightness", 0.0), ("saturation", 1.49)]),      # upsampling
        ((40, 70, 210, 300), 1, False, [("saturation", 0.8), ("brightness", 0.05), ("contrast", 1.3),
                                        ("hue", -0.15)]),
        ((10, 20, 250, 400), 2, True, [("contrast", 0.6), ("hue", 0.18), ("brightness", -0.1),
                                       ("saturation", 1.2)]),
        ((33, 51, 180, 170), 3, False, [("hue", 0.07), ("saturation", 0.7), ("contrast", 1.45),
                                        ("brightness", 0.12)]),
    ]
    applies = {"brightness": lambda im, v: tf.image.adjust_brightness(im, v),
               "saturation": lambda im, v: tf.image.adjust_saturation(im, v),
               "hue": lambda im, v: tf.image.adjust_hue(im, v),
               "contrast": lambda im, v: tf.image.adjust_contrast(im, v)}
    specs = []
    for index, (crop, method, flip, color_ops) in enumerate(inception_cases):
        def inception_train(x, crop=crop, method=method, flip=flip, color_ops=color_ops):
            image = tf.image.convert_image_dtype(x, tf.float32)
            image = tf.slice(image, [crop[0], crop[1], 0], [crop[2], crop[3], 3])
            image = tf.image.resize_images(image, [224, 224], method)
            image = tf.image.flip_left_right(image) if flip else image
            for name, value in color_ops:
                image = applies[name](image, value)
            image = tf.clip_by_value(image, 0.0, 1.0)
            return tf.multiply(tf.subtract(image, 0.5), 2.0)
        store_big(f"train/inception_fixed/{index}", run(inception_train, chelsea))
        specs.append({"crop": crop, "method": method, "flip": flip, "color_ops": color_ops})

    # cifarnet train with fixed pad/crop/flip/brightness/contrast
    cifar_cases = [((3, 5), True, 40.0, 1.6), ((0, 8), False, -63.0, 0.2), ((8, 0), True, 12.5, 1.0)]
    cifar_input = np.ascontiguousarray(coffee[100:132, 200:232])
    for index, ((top, left), flip, delta, factor) in enumerate(cifar_cases):
        def cifar_train(x, top=top, left=left, flip=flip, delta=delta, factor=factor):
            image = tf.pad(tf.to_float(x), [[4, 4], [4, 4], [0, 0]])
            image = tf.slice(image, [top, left, 0], [32, 32, 3])
            image = tf.image.flip_left_right(image) if flip else image
            image = tf.image.adjust_brightness(image, delta)
            image = tf.image.adjust_contrast(image, factor)
            return tf.image.per_image_standardization(image)
        golden[f"train/cifarnet_fixed/{index}"] = run(cifar_train, cifar_input)

    # each colour op alone, on a crop of a photo pushed partly outside [0, 1]
    patch = np.ascontiguousarray(load_photo("astronaut", None)[180:220, 200:248]).astype(np.float32) / 255.0
    shifted = (patch * 1.3 - 0.15).astype(np.float32)
    golden["ops/color_input_scale_shift"] = np.array([1.3, -0.15], np.float32)
    for name, values in (("brightness", (-0.2, 0.11)), ("saturation", (0.0, 0.5, 1.37, 3.0)),
                         ("hue", (-0.5, -0.2, 0.13, 0.5)), ("contrast", (0.2, 0.5, 1.8))):
        for value in values:
            golden[f"ops/{name}/{value}"] = run(lambda x, name=name, value=value: applies[name](x, value),
                                                shifted)
    golden["ops/grayscale"] = run(lambda x: tf.image.rgb_to_grayscale(x), shifted)
    golden["ops/standardize_uniform"] = run(lambda x: tf.image.per_image_standardization(x),
                                            np.full((5, 7, 3), 9.0, np.float32))

    # geometry tables
    sizes = [(300, 451), (451, 300), (224, 224), (225, 300), (1, 7), (511, 512), (377, 999), (17, 16)]
    table = []
    for h, w in sizes:
        cropped = run(lambda x: tf.shape(tf.image.central_crop(x, 0.875)), np.zeros((h, w, 1), np.float32))
        table.append([h, w, *cropped[:2]])
    golden["ops/central_crop_0.875"] = np.array(table, np.int64)
    aspect = []
    for h, w in sizes + [(375, 500), (500, 375), (333, 500), (640, 427)]:
        for side in (256, 257, 299, 512):
            nh, nw = run(lambda x, side=side: vgg_pre._smallest_size_at_least(tf.shape(x)[0], tf.shape(x)[1],
                                                                              side),
                         np.zeros((h, w, 1), np.uint8))
            aspect.append([h, w, side, nh, nw])
    golden["ops/aspect_size"] = np.array(aspect, np.int64)
    ramp = np.arange(7 * 9 * 2, dtype=np.float32).reshape(7, 9, 2)
    for th, tw in ((4, 4), (10, 12), (5, 10), (7, 9), (3, 15), (8, 8)):
        golden[f"ops/crop_or_pad/{th}x{tw}"] = run(lambda x: tf.image.resize_image_with_crop_or_pad(x, th, tw),
                                                   ramp)
    for h, w in ((7, 5), (200, 300), (517, 611)):
        store_big(f"ops/resize_bilinear/chelsea_{h}x{w}",
                  run(lambda x: tf.image.resize_bilinear(x[None], [h, w], align_corners=False)[0], chelsea),
                  stride=1 if h < 10 else COARSE_STRIDE)

    # ---- sample_distorted_bounding_box statistics ---------------------------------------------
    draws = 4000
    for case, (height, width, box) in {"whole_375x500": (375, 500, None),
                                       "box_375x500": (375, 500, [0.1, 0.2, 0.5, 0.6]),
                                       "whole_100x1000": (100, 1000, None)}.items():
        def sample(x, box=box):
            bbox = tf.constant(box if box is not None else [0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
            begin, size, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(x), bounding_boxes=bbox, min_object_covered=0.1, aspect_ratio_range=(0.75, 1.33),
                area_range=(0.05, 1.0), max_attempts=100, use_image_if_no_bounding_boxes=True, seed=1234)
            return tf.stack([begin[0], begin[1], size[0], size[1]])
        with tf.Graph().as_default():
            holder = tf.placeholder(tf.uint8, (height, width, 3))
            op = sample(holder)
            with tf.Session() as sess:
                rows = [sess.run(op, {holder: np.zeros((height, width, 3), np.uint8)}) for _ in range(draws)]
        golden[f"sdbb/{case}"] = np.array(rows, np.int16)

    meta = {"versions": env.versions, "photos": PHOTOS,
            "inception_cases": specs, "cifar_cases": cifar_cases,
            "cifar_input": "coffee[100:132, 200:232]", "color_patch": "astronaut[180:220, 200:248]"}
    golden["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **golden)
    with open(args.out, "wb") as handle:
        handle.write(buffer.getvalue())
    print(f"wrote {len(golden)} arrays, {len(buffer.getvalue()) / 1e6:.2f} MB -> {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
