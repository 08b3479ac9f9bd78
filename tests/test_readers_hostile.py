"""Crafted hostile files for the non-TF weight readers and the data readers (issue 11).

Each case is one reproduced failure: the reader must give exact values, slimtune's own error in
one line, or a counted skip; never a traceback, never silently different values.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from slimtune.checkpoint import read_checkpoint
from slimtune.errors import CheckpointError, DataError, SlimtuneError


def fails(path: Path, match: str | None = None, error: type = CheckpointError) -> str:
    with pytest.raises(error, match=match) as caught:
        reader = read_checkpoint(path)
        for name in reader:
            reader[name]
    message = str(caught.value)
    assert "\n" not in message
    return message


def npy_with_pickle(path: Path, body: bytes) -> None:
    header = np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object))
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(body)


# -- item 1: .npy pickles only rebuild arrays whose bytes come from the file -------------------
class _Reduce:
    """Pickles as an arbitrary (callable, args[, state]) triple."""

    def __init__(self, *reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


def test_npy_pickle_cannot_call_ndarray_for_uninitialised_memory(tmp_path: Path) -> None:
    # numpy.ndarray(shape, dtype) hands out uninitialised memory of any size (1 GiB here, from ~300 bytes).
    body = pickle.dumps({"w": _Reduce(np.ndarray, ((1 << 28,), np.dtype("<f4")))}, protocol=2)
    npy_with_pickle(tmp_path / "alloc.npy", body)
    assert (tmp_path / "alloc.npy").stat().st_size < 400
    fails(tmp_path / "alloc.npy", "refusing to unpickle numpy.ndarray")


def test_npy_pickle_reconstruct_without_data_is_refused(tmp_path: Path) -> None:
    # _reconstruct with a shape and no BUILD: memory the file never filled.
    body = pickle.dumps({"w": _Reduce(np._core.multiarray._reconstruct, (np.ndarray, (64,), b"b"))}, protocol=2)
    npy_with_pickle(tmp_path / "nodata.npy", body)
    fails(tmp_path / "nodata.npy", "no data|claims")


def test_npy_pickle_state_larger_than_its_bytes(tmp_path: Path) -> None:
    state = (1, (1 << 30,), np.dtype("<f4"), False, b"\0" * 16)
    body = pickle.dumps({"w": _Reduce(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), state)},
                        protocol=2)
    npy_with_pickle(tmp_path / "short.npy", body)
    fails(tmp_path / "short.npy", "bytes")


def test_npy_pickle_scalar_with_wrong_length(tmp_path: Path) -> None:
    body = pickle.dumps({"w": _Reduce(np._core.multiarray.scalar, (np.dtype("<f8"), b"\0" * 3))}, protocol=2)
    npy_with_pickle(tmp_path / "scalar.npy", body)
    fails(tmp_path / "scalar.npy")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_npy_pickle_good_dicts_read_exactly(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
              "c": np.float64(2.5), "d": np.asfortranarray(rng.standard_normal((2, 3)))}
    npy_with_pickle(tmp_path / "good.npy", pickle.dumps({"net": arrays}, protocol=protocol))
    with read_checkpoint(tmp_path / "good.npy") as reader:
        assert sorted(reader) == ["net/a", "net/b", "net/c", "net/d"]
        for key, value in arrays.items():
            np.testing.assert_array_equal(reader[f"net/{key}"], value)
            assert reader[f"net/{key}"].dtype == np.asarray(value).dtype


# -- item 3 / 7: safetensors as strict as the reference library --------------------------------
def safetensors_bytes(header: bytes | dict, data: bytes) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


F32_12 = np.array([1.0, 2.0], np.float32).tobytes()


@pytest.mark.parametrize("case, header, data, match", [
    ("extra bytes after the data", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     F32_12 + b"\0\0\0\0", "cover|covered"),
    ("gap before a tensor", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32_12, "gap|cover|offset"),
    ("overlapping tensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32_12, "overlap|offset"),
    ("duplicate key", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                      b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', F32_12, "duplicate|offset"),
    ("data but no tensors", {}, b"abcd", "cover"),
    ("deep nesting", b"{\"__metadata__\":" + b"[" * 100000 + b"]" * 100000 + b"}", b"", None),
    ("huge integer", b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', F32_12, None),
    ("huge offset", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 30 + b']}}', F32_12, None),
    ("metadata not strings", {"__metadata__": {"x": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     F32_12, None),
])
def test_safetensors_refused_as_the_reference_library_refuses(tmp_path: Path, case, header, data, match) -> None:
    from safetensors.numpy import load_file

    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    with pytest.raises(Exception):
        load_file(path)            # the reference refuses these files ...
    fails(path, match)             # ... and so do we, in one line of our own error


def test_safetensors_values_match_the_reference_library(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int16),
               "e": np.zeros((0, 4), np.float64), "m": rng.integers(0, 255, (2, 2, 2)).astype(np.uint8)}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"k": "v"})
    expected = load_file(tmp_path / "w.safetensors")
    with read_checkpoint(tmp_path / "w.safetensors") as reader:
        assert sorted(reader) == sorted(expected)
        for name, value in expected.items():
            assert reader[name].dtype == value.dtype and reader[name].shape == value.shape
            np.testing.assert_array_equal(reader[name], value)


# -- item 2: .pth zip members are CRC-checked and storage records sized to their tensors -------
def _torch_file(path: Path) -> dict:
    import torch

    state = {"w": torch.ones(64), "b": torch.arange(16, dtype=torch.int32)}
    torch.save(state, path)
    return state


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a zip member by member (stored, as torch writes), letting `change` edit members' bytes."""
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, change(info.filename, archive.read(info)))


def test_pth_flipped_data_byte_fails_its_crc(tmp_path: Path) -> None:
    _torch_file(tmp_path / "good.pth")
    data = bytearray((tmp_path / "good.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.pth") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    # Local extra fields may differ from the central ones; find the record's bytes directly.
    start = data.index(np.ones(64, np.float32).tobytes()[:16], info.header_offset)
    data[start + 1] ^= 0x04          # 1.0 -> 1.0019531 if nobody checks
    (tmp_path / "flipped.pth").write_bytes(bytes(data))
    fails(tmp_path / "flipped.pth", "CRC")


def test_pth_short_storage_record_is_refused(tmp_path: Path) -> None:
    _torch_file(tmp_path / "good.pth")
    _rewrite_zip(tmp_path / "good.pth", tmp_path / "short.pth",
                 lambda name, body: body[:8] if name.endswith("/data/0") else body)
    fails(tmp_path / "short.pth", "record")


def test_pth_good_file_reads_exactly(tmp_path: Path) -> None:
    state = _torch_file(tmp_path / "good.pth")
    with read_checkpoint(tmp_path / "good.pth") as reader:
        for name, tensor in state.items():
            np.testing.assert_array_equal(reader[name], tensor.numpy())


# -- item 4 / 7: npz central directory cross-checked; zlib and zip-version errors in one line ----
def _npz(path: Path, compressed: bool = False, size: int = 64) -> dict:
    arrays = {"a": np.arange(size, dtype=np.float32), "b": np.full((3, 3), 7, np.int64)}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def _drop_first_central_entry(data: bytes) -> bytes:
    eocd = data.rindex(b"PK\x05\x06")
    (disk, cd_disk, count_here, count, cd_size, cd_offset, comment) = struct.unpack(
        "<4H2LH", data[eocd + 4:eocd + 22])
    first = cd_offset
    name_len, extra_len, comment_len = struct.unpack("<3H", data[first + 28:first + 34])
    entry = 46 + name_len + extra_len + comment_len
    new_eocd = data[eocd:eocd + 4] + struct.pack("<4H2LH", disk, cd_disk, count_here - 1, count - 1,
                                                 cd_size - entry, cd_offset + entry, comment)
    return data[:eocd] + new_eocd + data[eocd + 22:]


def test_npz_with_a_dropped_central_entry_is_refused(tmp_path: Path) -> None:
    _npz(tmp_path / "good.npz")
    damaged = _drop_first_central_entry((tmp_path / "good.npz").read_bytes())
    (tmp_path / "dropped.npz").write_bytes(damaged)
    with zipfile.ZipFile(tmp_path / "dropped.npz") as archive:
        assert archive.namelist() == ["b.npy"]     # zipfile alone silently lists one array
    fails(tmp_path / "dropped.npz", "central directory")


def _set_method(data: bytes, method: int, version: int | None = None) -> bytes:
    data = bytearray(data)
    for signature, method_at, version_at in ((b"PK\x03\x04", 8, 4), (b"PK\x01\x02", 10, 6)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + method_at:start + method_at + 2] = struct.pack("<H", method)
            if version is not None:
                data[start + version_at:start + version_at + 2] = struct.pack("<H", version)
            start += 4
    return bytes(data)


@pytest.mark.parametrize("case", ["zlib", "method", "version", "flip"])
def test_npz_decompression_errors_are_one_line(tmp_path: Path, case: str) -> None:
    _npz(tmp_path / "good.npz", compressed=case == "zlib", size=1 << 16)
    data = (tmp_path / "good.npz").read_bytes()
    if case == "zlib":
        with zipfile.ZipFile(tmp_path / "good.npz") as archive:
            info = archive.getinfo("a.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
        data = data[:start] + bytes(64) + data[start + 64:]
    elif case == "method":
        data = _set_method(data, 97)
    elif case == "version":
        data = _set_method(data, 0, version=99)
    else:   # a data byte deep in a stored member: only the member's CRC-32 can see it
        pos = data.index(np.arange(1000, 1004, dtype=np.float32).tobytes())
        data = data[:pos] + bytes([data[pos] ^ 1]) + data[pos + 1:]
    (tmp_path / "bad.npz").write_bytes(data)
    fails(tmp_path / "bad.npz")


def test_npz_good_file_reads_exactly(tmp_path: Path) -> None:
    for compressed in (False, True):
        arrays = _npz(tmp_path / f"good{compressed}.npz", compressed=compressed, size=5000)
        with read_checkpoint(tmp_path / f"good{compressed}.npz") as reader:
            assert sorted(reader) == sorted(arrays)
            for name, value in arrays.items():
                np.testing.assert_array_equal(reader[name], value)


# -- item 7: a fifo or device file passed as a checkpoint -----------------------------------------
def test_fifo_or_device_is_not_a_regular_file(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.pth")
    for path in (tmp_path / "pipe.pth", Path("/dev/zero")):
        message = fails(path, "not a regular file")
        assert "not found" not in message


# -- items 5-7: labels.txt, manifests, VOC ---------------------------------------------------------
def _tiny_images(folder: Path, count: int = 3) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        Image.new("RGB", (8, 8), (index * 40, 10, 200)).save(folder / f"{index}.png")
        names.append(f"{index}.png")
    return names


@pytest.mark.parametrize("content", [b"--1:cat\n", "\u00b2:cat\n".encode(), b"\xff\xfe0:cat\n",
                                     b"999999999999:cat\n", b"0:cat\n5000000000:dog\n"])
def test_labels_file_hostile_ids(tmp_path: Path, content: bytes) -> None:
    from slimtune.data.labels import labels_to_names, read_labels_file

    (tmp_path / "labels.txt").write_bytes(content)
    with pytest.raises(DataError) as caught:
        labels_to_names(read_labels_file(tmp_path / "labels.txt"))
    assert "\n" not in str(caught.value) and "labels.txt" in str(caught.value)


def test_labels_file_good(tmp_path: Path) -> None:
    from slimtune.data.labels import labels_to_names, read_labels_file

    (tmp_path / "labels.txt").write_text("1:dog\n0:cat: tabby\n\n2:-3\n", encoding="utf-8")
    assert labels_to_names(read_labels_file(tmp_path)) == ["cat: tabby", "dog", "-3"]


@pytest.mark.parametrize("manifest, text", [
    ("m.csv", "path,label\n0.png,999999999999\n1.png,1\n"),
    ("m.jsonl", '{"path": "0.png", "label": 999999999999}\n{"path": "1.png", "label": 1}\n'),
    ("m.csv", "0.png,--1\n1.png,1\n"),
    ("m.csv", "0.png,\u00b2\n1.png,1\n"),
    ("m.csv", "path,label\n0.png,0\n\"1.png,1\n2.png,0\n"),          # unterminated quote
    ("m.csv", "path,label\n0.png,0\n1.png," + "x" * 200_000 + "\n"),  # over csv's field limit
])
def test_manifest_hostile_lines(tmp_path: Path, manifest: str, text: str) -> None:
    from slimtune.data.manifest import ManifestSource

    _tiny_images(tmp_path)
    (tmp_path / manifest).write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        ManifestSource(tmp_path / manifest)
    assert "\n" not in str(caught.value) and manifest in str(caught.value)


def test_manifest_quoted_comma_still_reads(tmp_path: Path) -> None:
    from slimtune.data.manifest import ManifestSource

    _tiny_images(tmp_path)
    (tmp_path / "0,b.png").write_bytes((tmp_path / "0.png").read_bytes())
    (tmp_path / "m.csv").write_text('path,label\n"0,b.png",1\n1.png,0\n2.png,1\n', encoding="utf-8")
    source = ManifestSource(tmp_path / "m.csv")
    assert [p.name for p in source.paths] == ["0,b.png", "1.png", "2.png"]
    assert source.targets() == [1, 0, 1]


def _voc_tree(root: Path, size_xml: str = "<width>8</width><height>8</height>", ids: bytes = b"000001\n") -> Path:
    voc = root / "VOC2007"
    _tiny_images(voc / "JPEGImages", 1)
    (voc / "JPEGImages" / "0.png").rename(voc / "JPEGImages" / "000001.jpg")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_bytes(ids)
    (voc / "Annotations").mkdir()
    (voc / "Annotations" / "000001.xml").write_text(
        f"<annotation><filename>000001.jpg</filename><size>{size_xml}</size>"
        "<object><name>cat</name><difficult>0</difficult></object></annotation>")
    return voc


@pytest.mark.parametrize("size_xml", ["<width>inf</width><height>8</height>", "<width>nan</width><height>8</height>",
                                      "<width>-3</width><height>8</height>", "<width>1e400</width><height>8</height>"])
def test_voc_hostile_sizes(tmp_path: Path, size_xml: str) -> None:
    from slimtune.data.voc import read_annotation

    voc = _voc_tree(tmp_path, size_xml)
    with pytest.raises(DataError, match="000001.xml"):
        read_annotation(voc / "Annotations" / "000001.xml")


def test_voc_non_utf8_image_sets(tmp_path: Path) -> None:
    from slimtune.data.voc import VOCSource

    voc = _voc_tree(tmp_path, ids=b"0000\xff1\n")
    with pytest.raises(DataError, match="train.txt.*UTF-8"):
        VOCSource(voc, split="train")
    voc_good = _voc_tree(tmp_path / "good")
    assert VOCSource(voc_good, split="train").targets()[0][7] == 1.0   # 'cat' is VOC class 7


# -- item 7: TFRecord features of the wrong kind are bad records, skipped and counted in training --
def _png_bytes(value: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (value, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hostile_shard(path: Path) -> list[str]:
    from slimtune.data.tfrecord import encode_example, write_tfrecord

    good = {"image/encoded": _png_bytes(), "image/format": b"png", "image/class/label": 1}
    bad = [
        {**good, "image/encoded": np.array([1.0, 2.0], np.float32)},      # image as floats
        {**good, "image/encoded": np.zeros(0, np.int64)},                 # an empty list
        {**good, "image/width": b"wide"},                                 # width as bytes
        {**good, "image/format": np.array([3.0], np.float32)},            # format as floats
        {**good, "image/class/text": np.array([7], np.int64)},            # label text as ints
        {**good, "image/object/bbox/ymin": [b"x"], "image/object/bbox/xmin": [0.0],
         "image/object/bbox/ymax": [1.0], "image/object/bbox/xmax": [1.0]},
    ]
    records = [encode_example(good)] + [encode_example(example) for example in bad] + [b"\xff\xff\xff"]
    write_tfrecord(path, records)
    return ["good"] + ["bad"] * (len(records) - 1)


def _source(shard: Path):
    from slimtune.data.slim_datasets import TFRecordSource

    return TFRecordSource([shard], ["a", "b"], 8, name="hostile")


def _identity(image, height, width):
    import torch

    return torch.nn.functional.interpolate(image[None].float(), size=(height, width))[0]


def test_wrong_kind_features_are_skipped_and_counted_in_training(tmp_path: Path) -> None:
    from slimtune.data.loader import build_loader

    kinds = _hostile_shard(tmp_path / "train-00000-of-00001")
    loader = build_loader(_source(tmp_path / "train-00000-of-00001"), _identity, (4, 4), batch_size=8,
                          training=False, on_bad_image="skip")
    batches = list(loader)
    assert sum(len(batch.targets) for batch in batches) == kinds.count("good") == 1
    bad = [description for batch in batches for description in batch.bad]
    assert len(bad) == kinds.count("bad") == 7
    assert all("record" in description for description in bad)
    assert batches[0].targets.tolist() == [1]


def test_wrong_kind_feature_with_on_bad_image_fail_is_one_line(tmp_path: Path) -> None:
    from slimtune.data.decode import BadImageError
    from slimtune.data.loader import build_loader

    _hostile_shard(tmp_path / "train-00000-of-00001")
    loader = build_loader(_source(tmp_path / "train-00000-of-00001"), _identity, (4, 4), batch_size=8,
                          training=False, on_bad_image="fail")
    with pytest.raises(BadImageError, match="record 1") as caught:
        list(loader)
    assert "\n" not in str(caught.value)


# -- item 7: dataset descriptions ------------------------------------------------------------------
def _spec(tmp_path: Path, **changes) -> Path:
    content = {"format": "slimtune-dataset-spec", "version": 1, "name": "mine", "file_pattern": "%s-*",
               "splits": {"train": 2}, "num_classes": 2}
    content.update(changes)
    (tmp_path / "slimtune_dataset.json").write_text(json.dumps(content) if not isinstance(changes.get("raw"), str)
                                                    else changes["raw"])
    return tmp_path


@pytest.mark.parametrize("changes, match", [
    ({"file_pattern": "/etc/%s*"}, "inside|outside|absolute"),
    ({"file_pattern": "../other/%s-*"}, "inside"),
    ({"splits": {"train": -5}}, "split"),
    ({"num_classes": 10_000_000_000}, "classes"),
    ({"raw": '{"a":' * 100_000 + "1" + "}" * 100_000}, "malformed"),
    ({"splits": {"train": 1e400}}, "split|malformed"),
])
def test_hostile_dataset_descriptions(tmp_path: Path, changes: dict, match: str) -> None:
    from slimtune.data.slim_datasets import get_split

    _spec(tmp_path, **changes)
    (tmp_path / "train-00000").write_bytes(b"")
    with pytest.raises(SlimtuneError, match=match) as caught:
        get_split(None, "train", tmp_path)
    assert "\n" not in str(caught.value)


def test_user_file_pattern_outside_the_dataset_dir_is_refused(tmp_path: Path) -> None:
    from slimtune.data.slim_datasets import find_shards

    with pytest.raises(DataError, match="inside"):
        find_shards(tmp_path, "/etc/pass*")


# -- items 5/6: oversized images are refused from their header, naming the file ---------------------
def _jpeg_claiming(width: int, height: int, size: int = 3000) -> bytes:
    """A real JPEG's first `size` bytes with its frame header rewritten to claim width x height."""
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data[:size])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("payload", [_jpeg_claiming(9000, 9000), _png_header_only(12000, 12000)])
def test_oversized_images_are_bad_images_naming_the_file(tmp_path: Path, payload: bytes) -> None:
    from slimtune.data.decode import BadImageError, decode_image, decode_tensor

    (tmp_path / "big.img").write_bytes(payload)
    for decode in (decode_image, decode_tensor):
        with pytest.raises(BadImageError, match=r"big.img: .*over the limit of 50000000 pixels") as caught:
            decode(tmp_path / "big.img")
        assert "\n" not in str(caught.value)


def test_max_image_pixels_is_configurable(tmp_path: Path, monkeypatch) -> None:
    from slimtune.config import TrainConfig
    from slimtune.data.decode import BadImageError, decode_tensor

    monkeypatch.delenv("SLIMTUNE_MAX_IMAGE_PIXELS", raising=False)
    (tmp_path / "small.png").write_bytes(_png_bytes())           # 6 x 5 = 30 pixels
    assert decode_tensor(tmp_path / "small.png").shape == (3, 5, 6)
    TrainConfig(max_image_pixels=29)
    with pytest.raises(BadImageError, match="small.png: 6x5 image"):
        decode_tensor(tmp_path / "small.png")
    TrainConfig(max_image_pixels=30)
    assert decode_tensor(tmp_path / "small.png").shape == (3, 5, 6)
    with pytest.raises(SlimtuneError):
        TrainConfig(max_image_pixels=0)
    TrainConfig()


def test_truncated_jpeg_claiming_a_moderate_size_is_a_bad_image_in_training(tmp_path: Path) -> None:
    from slimtune.data.loader import build_loader
    from slimtune.data.manifest import ManifestSource

    _tiny_images(tmp_path, 2)
    (tmp_path / "liar.jpg").write_bytes(_jpeg_claiming(3000, 3000))   # 9 M pixels, 3 KB of data
    (tmp_path / "m.csv").write_text("0.png,0\nliar.jpg,1\n1.png,1\n")
    loader = build_loader(ManifestSource(tmp_path / "m.csv"), _identity, (4, 4), batch_size=4, training=False)
    batches = list(loader)
    assert [description.split(" ")[0].endswith("liar.jpg") for batch in batches for description in batch.bad] == [True]
    assert sum(len(batch.targets) for batch in batches) == 2


# -- item 6: a compressed TFRecord whose record expands beyond the record limit ----------------------
@pytest.mark.parametrize("codec", ["GZIP", "ZLIB"])
def test_compressed_record_expanding_past_the_limit_is_refused(tmp_path: Path, monkeypatch, codec: str) -> None:
    import gzip

    from slimtune.data import tfrecord
    from slimtune.utils.crc import masked_crc32c

    monkeypatch.setattr(tfrecord, "MAX_RECORD_BYTES", 1 << 20)
    length = struct.pack("<Q", 8 << 20)                      # 8 MiB of zeros: ~8 KB compressed
    stream = length + struct.pack("<I", masked_crc32c(length)) + bytes(8 << 20) + b"\0" * 4
    packed = gzip.compress(stream, mtime=0) if codec == "GZIP" else zlib.compress(stream)
    (tmp_path / "bomb.tfrecord").write_bytes(packed)
    assert len(packed) < 64 << 10
    with pytest.raises(tfrecord.TFRecordError, match="bomb.tfrecord.*record 0.*limit") as caught:
        list(tfrecord.iter_tfrecord(tmp_path / "bomb.tfrecord"))
    assert "\n" not in str(caught.value)


def test_on_bad_image_fail_with_workers_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from slimtune.data.decode import BadImageError
    from slimtune.data.loader import build_loader
    from slimtune.data.manifest import ManifestSource

    _tiny_images(tmp_path, 2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "m.csv").write_text("0.png,0\nempty.jpg,1\n1.png,1\n")
    loader = build_loader(ManifestSource(tmp_path / "m.csv"), _identity, (4, 4), batch_size=4, training=False,
                          num_workers=1, on_bad_image="fail")
    with pytest.raises(BadImageError) as caught:
        list(loader)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("empty.jpg: empty file (0 bytes)") or "empty.jpg (m.csv:2): empty file (0 bytes)" in message


def test_npz_scalar_arrays_keep_their_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", step=np.array(7, np.int64), w=np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    with read_checkpoint(tmp_path / "s.npz") as reader:
        assert reader["step"].shape == () and int(reader["step"]) == 7
        np.testing.assert_array_equal(reader["w"], np.arange(6.0).reshape(2, 3))


def test_npy_header_cut_inside_its_dict_is_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "good.npy", {"w": np.ones(2)}, allow_pickle=True)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:30] + b"\n")
    fails(tmp_path / "cut.npy", "not a valid .npy")


def test_png_whose_data_stream_is_broken_is_a_bad_image_not_a_blank_one() -> None:
    from PIL import Image

    from slimtune.data.decode import BadImageError, decode_image, decode_tensor

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 4:idat + 40] = bytes(36)      # the zlib stream broken (chunk CRC left as is)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(bytes(data))).convert("RGB")     # Pillow refuses it ...
    for decode in (decode_image, decode_tensor):
        with pytest.raises(BadImageError, match="cannot decode image"):   # ... and so do we
            decode(bytes(data))


def test_npy_version_byte_flipped_to_a_huge_header_length(tmp_path: Path) -> None:
    # Version 0.x read as 2.0 took bytes of the header as a 1.6 GB length, read in one call.
    np.save(tmp_path / "good.npy", {"w": np.ones(2)}, allow_pickle=True)
    data = bytearray((tmp_path / "good.npy").read_bytes())
    data[6] = 0
    (tmp_path / "v0.npy").write_bytes(bytes(data))
    fails(tmp_path / "v0.npy", "version")
    data[6:12] = b"\x02\x00\xff\xff\xff\x7f"
    (tmp_path / "long.npy").write_bytes(bytes(data))
    fails(tmp_path / "long.npy", "header claims")


def _read_under_memory_cap(path: Path, budget: int = 1 << 30) -> tuple[int, str]:
    """Read a checkpoint in a subprocess whose address space is capped at its size + budget."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from slimtune.checkpoint import read_checkpoint\n"
        "from slimtune.errors import SlimtuneError\n"
        "vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (vm + {budget}, vm + {budget}))\n"
        # VmHWM, not ru_maxrss: after exec, ru_maxrss still holds the forking parent's peak.
        "hwm = lambda: [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "before = hwm()\n"
        "try:\n"
        "    reader = read_checkpoint(sys.argv[1]); [reader[n] for n in reader]; outcome = 'OK'\n"
        "except SlimtuneError as error:\n"
        "    outcome = f'ERROR {error}'\n"
        "grown = (hwm() - before) * 1024\n"
        "print(grown, outcome)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": src})
    assert result.returncode == 0, result.stderr[-2000:]
    grown, outcome = result.stdout.strip().split(" ", 1)
    return int(grown), outcome


def test_npy_found_by_fuzzing_that_allocated_330_mb(tmp_path: Path) -> None:
    # A 1 KB mutated np.save dict (fuzz seed 5, case npy-222): the C unpickler peaked 330 MB
    # before failing on a bad opcode; the opcode walk refuses it first.
    path = Path(__file__).parent / "fixtures" / "hostile" / "npy_pickle_alloc.npy"
    grown, outcome = _read_under_memory_cap(path)
    assert outcome.startswith("ERROR") and "corrupt pickled dict" in outcome
    assert grown < 32 << 20, grown


def test_pth_stored_member_with_two_sizes_is_refused(tmp_path: Path) -> None:
    # Found by fuzzing: a central directory compressed size of 0xFFFFFFFF on a stored 8-byte
    # record; zipfile read it, torch.load (without mmap) refuses it, and so do we.
    _torch_file(tmp_path / "good.pth")
    data = bytearray((tmp_path / "good.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.pth") as archive:
        name = next(i.filename for i in archive.infolist() if i.filename.endswith("/data/1")).encode()
    entry = data.index(b"PK\x01\x02")                       # walk the central directory to the entry
    while data[entry + 46:entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 20:entry + 24] = b"\xff\xff\xff\xff"
    (tmp_path / "sizes.pth").write_bytes(bytes(data))
    fails(tmp_path / "sizes.pth", "two different sizes|impossible|damaged")


def test_manifest_paths_too_long_or_with_nul_are_counted_missing(tmp_path: Path) -> None:
    # Found by fuzzing: Path.is_file raised "File name too long" instead of answering.
    from slimtune.data.manifest import ManifestSource

    _tiny_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text("0.png,0\n" + "x" * 300 + ".png,1\nbad\x00name.png,0\n1.png,1\n")
    source = ManifestSource(tmp_path / "m.csv")
    assert [p.name for p in source.paths] == ["0.png", "1.png"] and source.targets() == [0, 1]
    assert [number for number, _ in source.missing] == [2, 3]


def test_voc_image_set_with_an_overlong_id_is_one_line(tmp_path: Path) -> None:
    from slimtune.data.voc import VOCSource

    voc = _voc_tree(tmp_path, ids=b"000001\n" + b"9" * 300 + b"\n")
    with pytest.raises(DataError, match="1 of the 2 images listed in train.txt are missing") as caught:
        VOCSource(voc, split="train")
    assert "\n" not in str(caught.value)


def test_names_with_newlines_stay_on_one_line(tmp_path: Path) -> None:
    # Found by fuzzing: an npz member name with a newline made a two-line error.
    with zipfile.ZipFile(tmp_path / "nl.npz", "w") as archive:
        archive.writestr("a\nb.txt", b"x")
    fails(tmp_path / "nl.npz", "is not a .npy array")
    header = {"a\nb": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}
    (tmp_path / "nl.safetensors").write_bytes(safetensors_bytes(header, b"\0" * 4))
    fails(tmp_path / "nl.safetensors", "cannot be read")
