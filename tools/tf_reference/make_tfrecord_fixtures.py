"""Write the TFRecord test fixtures with real TensorFlow, and check slimtune's converter output.

Run (developer machine, after /work/tfenv/READY exists)::

    /work/tfenv/bin/python tools/tf_reference/make_tfrecord_fixtures.py [tests/fixtures/tfrecord]

Part 1, TensorFlow writes (tf.io.TFRecordWriter, tf.train.Example):
  flowers/         slim's dataset_utils.image_to_tfexample records (TF-encoded JPEG and PNG),
                   sharded flowers_<split>_0000N-of-0000M.tfrecord, labels.txt by write_label_file
  mnist/           mnist_train.tfrecord: format b'raw' 28x28x1 pixels (slim's reader default) + a PNG
  imagenet/        train-00000-of-00001 / validation-00000-of-00001: build_imagenet_data.py's keys
                   (bbox lists, class text, synset, colorspace) plus a multi-valued bytes list
  visualwakewords/ train.record-00000-of-00001 / val.record-00000-of-00001, labels.txt
  gzip/, zlib/     a flowers-style shard written with TFRecordOptions GZIP / ZLIB
  expected.json    every record of every file as TensorFlow's protobuf parser sees it
Part 2, slimtune writes (this file re-runs itself under slimtune's venv): converted/ holds shards
from `convert_to_tfrecord` (a single-label manifest of awkward images and the VOC fixture).
TensorFlow reads them back with tf.data.TFRecordDataset and slim's own flowers decoder (single
label) or tf.io.parse_single_example with VarLen labels (multi-label) and records what it parsed
in converted/tf_readback.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLIMTUNE_PYTHON = REPO / ".venv" / "bin" / "python"
SLIM_SRC = "/work/slim_src"


# ---------------------------------------------------------------------------------------------
# Part 2a: runs under slimtune's venv (no TensorFlow there)
# ---------------------------------------------------------------------------------------------

def _slimtune_side(out: Path) -> None:
    """Build awkward input images and the VOC fixture, convert both with slimtune."""
    import numpy as np
    import skimage.data
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from voc_fixture import make_voc_fixture

    from slimtune.data.convert import convert_to_tfrecord
    from slimtune.data.manifest import ManifestSource
    from slimtune.data.voc import VOCSource

    work = Path(tempfile.mkdtemp())
    images = work / "images"
    images.mkdir()

    def small(array, side=40):
        image = Image.fromarray(array)
        image.thumbnail((side, side))
        return image

    chelsea, coffee, astronaut = skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()
    small(chelsea).save(images / "cat_rgb.jpg", quality=90)
    small(skimage.data.camera()).save(images / "person_gray.jpg", quality=90)
    small(coffee).convert("CMYK").save(images / "cup_cmyk.jpg", quality=90)
    rgba = small(astronaut).convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(images / "person_alpha.png")
    rotated = small(chelsea)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers rotate 90 degrees clockwise
    rotated.save(images / "cat_exif6.jpg", quality=90, exif=exif.tobytes())
    gray16 = (np.asarray(small(skimage.data.camera())).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(images / "person_16bit.png")
    small(coffee).save(images / "cup_rgb.png")
    rows = [("cat_rgb.jpg", "cat"), ("person_gray.jpg", "person"), ("cup_cmyk.jpg", "cup"),
            ("person_alpha.png", "person"), ("cat_exif6.jpg", "cat"), ("person_16bit.png", "person"),
            ("cup_rgb.png", "cup")]
    (images / "manifest.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    single = ManifestSource(images / "manifest.csv")
    convert_to_tfrecord(single, out / "single", "tiny", num_shards=2, split="train", progress=False)

    devkit = make_voc_fixture(work / "voc", copies=1, max_side=48)
    convert_to_tfrecord(VOCSource(devkit, "trainval"), out / "multi", "voc2007", num_shards=2,
                        split="trainval", progress=False)
    shutil.rmtree(work)


# ---------------------------------------------------------------------------------------------
# Part 1: TensorFlow writes
# ---------------------------------------------------------------------------------------------

def _describe_feature(feature) -> dict:
    kind = feature.WhichOneof("kind")
    if kind is None:
        return {"kind": None, "values": []}
    values = list(getattr(feature, kind).value)
    if kind == "bytes_list":
        described = []
        for value in values:
            if len(value) <= 64:
                described.append({"hex": value.hex()})
            else:
                described.append({"len": len(value), "sha256": hashlib.sha256(value).hexdigest()})
        return {"kind": "bytes", "values": described}
    if kind == "float_list":
        return {"kind": "float", "values": [float(v) for v in values]}
    return {"kind": "int64", "values": [int(v) for v in values]}


def _expected_for(path: Path, tf, compression: str = "") -> list[dict]:
    records = []
    for raw in tf.data.TFRecordDataset(str(path), compression_type=compression):
        example = tf.train.Example.FromString(raw.numpy())
        records.append({key: _describe_feature(feature) for key, feature in example.features.feature.items()})
    return records


def _small_photos(tf, np):
    import skimage.data

    def resize(array, size):
        return tf.cast(tf.image.resize(array, size, antialias=True), tf.uint8).numpy()

    chelsea = resize(skimage.data.chelsea(), (24, 36))
    astronaut = resize(skimage.data.astronaut(), (32, 32))
    coffee = resize(skimage.data.coffee(), (20, 30))
    camera = resize(skimage.data.camera()[:, :, None], (28, 28))
    return chelsea, astronaut, coffee, camera


def _tf_side(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(HERE))
    from slim_env import load_slim

    env = load_slim(SLIM_SRC)
    dataset_utils = env.import_module("datasets.dataset_utils")
    chelsea, astronaut, coffee, camera = _small_photos(tf, np)

    def jpeg(array):
        return tf.io.encode_jpeg(array, quality=90).numpy()

    def png(array):
        return tf.io.encode_png(array).numpy()

    expected: dict[str, list] = {}

    def write(relative: str, examples, compression: str = ""):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        options = tf.io.TFRecordOptions(compression_type=compression)
        with tf.io.TFRecordWriter(str(path), options) as writer:
            for example in examples:
                # deterministic: map entries sorted by key, so re-running gives the same bytes.
                writer.write(example.SerializeToString(deterministic=True))
        expected[relative] = _expected_for(path, tf, compression)

    # flowers: slim's own Example builder, JPEG bytes as the flowers converter stores them.
    flowers = [
        dataset_utils.image_to_tfexample(jpeg(chelsea), b"jpg", 24, 36, 2),
        dataset_utils.image_to_tfexample(png(astronaut), b"png", 32, 32, 4),
        dataset_utils.image_to_tfexample(jpeg(coffee), b"jpg", 20, 30, 0),
    ]
    write("flowers/flowers_train_00000-of-00002.tfrecord", flowers[:2])
    write("flowers/flowers_train_00001-of-00002.tfrecord", flowers[2:])
    write("flowers/flowers_validation_00000-of-00001.tfrecord",
          [dataset_utils.image_to_tfexample(jpeg(astronaut), b"jpg", 32, 32, 1)])
    _write_label_file(dataset_utils, {0: "daisy", 1: "dandelion", 2: "roses", 3: "sunflowers", 4: "tulips"},
                      out / "flowers")

    # mnist: 'raw' is the format slim's mnist reader defaults to; the converter writes PNG.
    digit = camera[:, :, :1]
    write("mnist/mnist_train.tfrecord", [
        dataset_utils.image_to_tfexample(digit.tobytes(), b"raw", 28, 28, 7),
        dataset_utils.image_to_tfexample(png(digit), b"png", 28, 28, 3),
    ])

    # imagenet: build_imagenet_data.py's keys; labels 1..1000 with 0 = background.
    def imagenet_example(image, label, synset, text, boxes, filename):
        xmin, ymin, xmax, ymax = ([b[i] for b in boxes] for i in range(4))
        feature = {
            "image/height": dataset_utils.int64_feature(image.shape[0]),
            "image/width": dataset_utils.int64_feature(image.shape[1]),
            "image/colorspace": dataset_utils.bytes_feature(b"RGB"),
            "image/channels": dataset_utils.int64_feature(3),
            "image/class/label": dataset_utils.int64_feature(label),
            "image/class/synset": dataset_utils.bytes_feature(synset),
            "image/class/text": dataset_utils.bytes_feature(text),
            "image/object/bbox/xmin": dataset_utils.float_list_feature(xmin),
            "image/object/bbox/xmax": dataset_utils.float_list_feature(xmax),
            "image/object/bbox/ymin": dataset_utils.float_list_feature(ymin),
            "image/object/bbox/ymax": dataset_utils.float_list_feature(ymax),
            "image/object/bbox/label": dataset_utils.int64_feature([label] * len(boxes)),
            "image/format": dataset_utils.bytes_feature(b"JPEG"),
            "image/filename": dataset_utils.bytes_feature(filename),
            "image/encoded": dataset_utils.bytes_feature(jpeg(image)),
            # Not an ImageNet key: a multi-valued bytes list (with an empty and a binary value),
            # which readers that keep only value[0] get wrong.
            "image/extra/tags": dataset_utils.bytes_list_feature([b"tabby", b"", b"\x00\xff\xfe", b"cat"]),
        }
        return tf.train.Example(features=tf.train.Features(feature=feature))

    write("imagenet/train-00000-of-00001", [
        imagenet_example(chelsea, 282, b"n02123045", b"tabby, tabby cat",
                         [(0.1, 0.05, 0.9, 0.95), (0.5, 0.25, 0.75, 0.5)], b"n02123045_1.JPEG"),
        imagenet_example(coffee, 968, b"n07930864", b"cup", [], b"n07930864_7.JPEG"),
    ])
    write("imagenet/validation-00000-of-00001", [
        imagenet_example(astronaut, 835, b"n04228054", b"ski", [(0.0, 0.0, 1.0, 1.0)],
                         b"ILSVRC2012_val_00000001.JPEG"),
    ])

    # visualwakewords: the keys of build_visualwakewords_data_lib._create_tf_example.
    def vww_example(image, label, boxes):
        xmin, ymin, xmax, ymax = ([b[i] for b in boxes] for i in range(4))
        feature = {
            "image/height": dataset_utils.int64_feature(image.shape[0]),
            "image/width": dataset_utils.int64_feature(image.shape[1]),
            "image/filename": dataset_utils.bytes_feature(b"COCO_val2014_000000000042.jpg"),
            "image/source_id": dataset_utils.bytes_feature(b"42"),
            "image/key/sha256": dataset_utils.bytes_feature(b"0" * 64),
            "image/encoded": dataset_utils.bytes_feature(jpeg(image)),
            "image/format": dataset_utils.bytes_feature(b"jpeg"),
            "image/class/label": dataset_utils.int64_feature(label),
            "image/object/bbox/xmin": dataset_utils.float_list_feature(xmin),
            "image/object/bbox/xmax": dataset_utils.float_list_feature(xmax),
            "image/object/bbox/ymin": dataset_utils.float_list_feature(ymin),
            "image/object/bbox/ymax": dataset_utils.float_list_feature(ymax),
            "image/object/class/label": dataset_utils.int64_feature(label),
            "image/object/area": dataset_utils.float_list_feature([100.0] * len(boxes)),
        }
        return tf.train.Example(features=tf.train.Features(feature=feature))

    write("visualwakewords/train.record-00000-of-00001",
          [vww_example(astronaut, 1, [(0.0, 0.02, 0.7, 1.0)]), vww_example(coffee, 0, [])])
    write("visualwakewords/val.record-00000-of-00001", [vww_example(chelsea, 0, [])])
    _write_label_file(dataset_utils, {0: "background", 1: "person"}, out / "visualwakewords")

    # Compressed streams.
    write("gzip/flowers_train_00000-of-00001.tfrecord", flowers, compression="GZIP")
    write("zlib/flowers_train_00000-of-00001.tfrecord", flowers, compression="ZLIB")

    (out / "expected.json").write_text(json.dumps(
        {"tensorflow": tf.__version__, "files": expected}, indent=1, sort_keys=True) + "\n")


def _write_label_file(dataset_utils, labels: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dataset_utils.write_label_file(labels, str(directory))


# ---------------------------------------------------------------------------------------------
# Part 2b: TensorFlow reads slimtune's shards
# ---------------------------------------------------------------------------------------------

def _read_back(out: Path) -> None:
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(HERE))
    from slim_env import load_slim

    env = load_slim(SLIM_SRC)
    from tensorflow.python.ops import control_flow_ops

    # tf_slim's Image handler calls control_flow_ops.case/cond, which TF 2.21 moved elsewhere.
    for name in ("case", "cond"):
        if not hasattr(control_flow_ops, name):
            setattr(control_flow_ops, name, getattr(tf.compat.v1, name))
    flowers = env.import_module("datasets.flowers")
    tf1 = env.tf
    readback: dict = {"tensorflow": tf.__version__, "single": [], "multi": []}

    # Single label: slim's own flowers reader (its keys_to_features and TFExampleDecoder).
    single_dir = out / "single"
    with tf1.Graph().as_default():
        dataset = flowers.get_split("train", str(single_dir), file_pattern="tiny_%s_*.tfrecord")
        serialized = tf1.placeholder(tf.string, [])
        image, label = dataset.decoder.decode(serialized, ["image", "label"])
        with tf1.Session() as session:
            for shard in sorted(single_dir.glob("tiny_train_*.tfrecord")):
                for index, raw in enumerate(tf.compat.v1.io.tf_record_iterator(str(shard))):
                    pixels, value = session.run([image, label], {serialized: raw})
                    parsed = tf.train.Example.FromString(raw).features.feature
                    readback["single"].append({
                        "shard": shard.name, "record": index, "label": int(value),
                        "shape": list(pixels.shape), "mean": float(pixels.astype(np.float64).mean()),
                        "pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                        "filename": parsed["image/filename"].bytes_list.value[0].decode(),
                        "format": parsed["image/format"].bytes_list.value[0].decode(),
                        "height": int(parsed["image/height"].int64_list.value[0]),
                        "width": int(parsed["image/width"].int64_list.value[0]),
                    })

    # Multi-label: tf.data + parse_single_example with VarLen label lists.
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.VarLenFeature(tf.int64),
        "image/class/ignore": tf.io.VarLenFeature(tf.int64),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
    }
    multi_dir = out / "multi"
    for shard in sorted(multi_dir.glob("voc2007_trainval_*.tfrecord")):
        for index, raw in enumerate(tf.data.TFRecordDataset(str(shard))):
            parsed = tf.io.parse_single_example(raw, features)
            pixels = tf.io.decode_image(parsed["image/encoded"], channels=3).numpy()
            readback["multi"].append({
                "shard": shard.name, "record": index,
                "labels": tf.sparse.to_dense(parsed["image/class/label"]).numpy().tolist(),
                "ignore": tf.sparse.to_dense(parsed["image/class/ignore"]).numpy().tolist(),
                "filename": parsed["image/filename"].numpy().decode(),
                "height": int(parsed["image/height"]), "width": int(parsed["image/width"]),
                "shape": list(pixels.shape), "mean": float(pixels.astype(np.float64).mean()),
            })
    (out / "tf_readback.json").write_text(json.dumps(readback, indent=1) + "\n")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--slimtune-side":
        _slimtune_side(Path(sys.argv[2]))
        return
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "fixtures" / "tfrecord"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _tf_side(out)
    converted = out / "converted"
    subprocess.run([str(SLIMTUNE_PYTHON), str(Path(__file__).resolve()), "--slimtune-side", str(converted)],
                   check=True, cwd=REPO)
    _read_back(converted)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
