"""TFRecord framing and tf.train.Example codec, checked against files TensorFlow wrote."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from slimtune.data.tfrecord import (TFRecordError, TFRecordWriter, count_records, encode_example,
                                    iter_examples, iter_tfrecord, parse_example, sniff_compression,
                                    write_tfrecord)
from slimtune.errors import DataError
from slimtune.utils import protowire as pw
from slimtune.utils.crc import masked_crc32c

FIXTURES = Path(__file__).parent / "fixtures" / "tfrecord"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["files"]


def _as_expected(value) -> dict:
    """Describe one parsed feature the way the fixture script describes TF's parse."""
    if isinstance(value, list):
        described = [{"hex": v.hex()} if len(v) <= 64 else
                     {"len": len(v), "sha256": hashlib.sha256(v).hexdigest()} for v in value]
        return {"kind": "bytes", "values": described}
    if value.dtype == np.float32:
        return {"kind": "float", "values": value.tolist()}
    assert value.dtype == np.int64
    return {"kind": "int64", "values": value.tolist()}


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_every_tf_written_record_parses_as_tensorflow_parses_it(relative):
    parsed = list(iter_examples(FIXTURES / relative))
    expected = EXPECTED[relative]
    assert len(parsed) == len(expected)
    for ours, theirs in zip(parsed, expected):
        assert set(ours) == set(theirs)
        for key, feature in theirs.items():
            got = _as_expected(ours[key])
            if feature["kind"] == "float":
                assert got["kind"] == "float"
                # TF's values went through float32 too: equal after the same rounding.
                np.testing.assert_array_equal(np.float32(got["values"]), np.float32(feature["values"]))
            elif feature["values"]:
                assert got == feature, key
            else:  # an empty list of a known kind
                assert len(ours[key]) == 0


def test_multi_valued_bytes_list_keeps_every_value():
    first = next(iter_examples(FIXTURES / "imagenet" / "train-00000-of-00001"))
    assert first["image/extra/tags"] == [b"tabby", b"", b"\x00\xff\xfe", b"cat"]
    assert first["image/object/bbox/xmin"].tolist() == pytest.approx([0.1, 0.5])
    assert first["image/object/bbox/label"].tolist() == [282, 282]


def test_compressed_files_hold_the_same_records_as_plain_ones():
    plain = [r for name in ("flowers_train_00000-of-00002.tfrecord", "flowers_train_00001-of-00002.tfrecord")
             for r in iter_tfrecord(FIXTURES / "flowers" / name)]
    for folder, codec in (("gzip", "GZIP"), ("zlib", "ZLIB")):
        path = FIXTURES / folder / "flowers_train_00000-of-00001.tfrecord"
        assert sniff_compression(path) == codec
        assert list(iter_tfrecord(path)) == plain
        assert list(iter_tfrecord(path, compression=codec)) == plain
    assert sniff_compression(FIXTURES / "flowers" / "flowers_train_00000-of-00002.tfrecord") == ""


@pytest.mark.parametrize("compression", [None, "GZIP", "ZLIB"])
def test_writer_round_trip_and_deterministic_bytes(tmp_path, compression):
    records = [b"", b"x", bytes(range(256)) * 300, encode_example({"k": [1, 2, 3]})]
    first, second = tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"
    write_tfrecord(first, records, compression)
    write_tfrecord(second, records, compression)
    assert first.read_bytes() == second.read_bytes()
    assert list(iter_tfrecord(first)) == records
    assert count_records(first) == len(records)
    assert not list(tmp_path.glob("*.tmp"))


def test_plain_framing_bytes_are_tfs(tmp_path):
    """Length, masked CRC of the length, payload, masked CRC of the payload."""
    raw = (FIXTURES / "flowers" / "flowers_validation_00000-of-00001.tfrecord").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(raw[:8])
    payload = raw[12:12 + length]
    assert struct.unpack("<I", raw[12 + length:16 + length])[0] == masked_crc32c(payload)
    assert len(raw) == 16 + length
    # Our writer produces the very same file from the same payload.
    ours = tmp_path / "one.tfrecord"
    write_tfrecord(ours, [payload])
    assert ours.read_bytes() == raw


def _plain_file(tmp_path: Path, records: list[bytes]) -> Path:
    path = tmp_path / "data.tfrecord"
    write_tfrecord(path, records)
    return path


def test_corrupt_payload_fails_its_crc_naming_record_and_offset(tmp_path):
    records = [b"a" * 10, b"b" * 20, b"c" * 30]
    path = _plain_file(tmp_path, records)
    data = bytearray(path.read_bytes())
    data[26 + 12 + 5] ^= 0xFF  # inside record 1's payload (record 0 is 26 bytes)
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match=r"record 1 at byte 26: data CRC mismatch"):
        list(iter_tfrecord(path))
    damaged = list(iter_tfrecord(path, verify=False))
    assert damaged[0] == records[0] and damaged[2] == records[2] and damaged[1] != records[1]


def test_corrupt_length_fails_its_crc(tmp_path):
    path = _plain_file(tmp_path, [b"a" * 10, b"b" * 20])
    data = bytearray(path.read_bytes())
    data[26] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match="record 1 at byte 26: length CRC mismatch"):
        list(iter_tfrecord(path))


@pytest.mark.parametrize("cut", [1, 3, 10, 20])
def test_truncated_file_is_reported(tmp_path, cut):
    path = _plain_file(tmp_path, [b"a" * 10, b"b" * 20])
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(TFRecordError, match="truncated"):
        list(iter_tfrecord(path))
    with pytest.raises(TFRecordError, match="truncated"):
        count_records(path)


def test_bogus_huge_length_without_verification_fails_as_truncated(tmp_path):
    """A corrupt length must never be trusted into a giant allocation."""
    path = tmp_path / "bad.tfrecord"
    length = struct.pack("<Q", 1 << 60)
    path.write_bytes(length + b"\0\0\0\0" + b"payload")
    with pytest.raises(TFRecordError, match="truncated record 0"):
        list(iter_tfrecord(path, verify=False, compression=None))


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB"])
def test_truncated_compressed_stream_is_reported(tmp_path, compression):
    path = tmp_path / "data.tfrecord"
    write_tfrecord(path, [bytes(range(256)) * 40] * 3, compression)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(TFRecordError):
        list(iter_tfrecord(path))


def test_not_a_tfrecord_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a TFRecord file at all")
    with pytest.raises(TFRecordError, match="not a TFRecord file"):
        list(iter_tfrecord(path))
    with pytest.raises(DataError, match="not found"):
        list(iter_tfrecord(tmp_path / "missing.tfrecord"))


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.tfrecord"
    path.write_bytes(b"")
    assert list(iter_tfrecord(path)) == []
    assert count_records(path) == 0


def test_start_step_selects_records_and_skips_payloads_unread(tmp_path):
    records = [bytes([i]) * (i + 5) for i in range(10)]
    path = _plain_file(tmp_path, records)
    parts = [list(iter_tfrecord(path, start=w, step=3)) for w in range(3)]
    assert parts[0] == records[0::3] and parts[1] == records[1::3] and parts[2] == records[2::3]
    # Damage record 1's payload: a reader that only wants records 0, 2, 4... never looks at it.
    offset = sum(16 + len(r) for r in records[:1]) + 12
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert list(iter_tfrecord(path, start=0, step=2)) == records[0::2]
    with pytest.raises(TFRecordError, match="record 1"):
        list(iter_tfrecord(path, start=1, step=2))


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    path = tmp_path / "out.tfrecord"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as writer:
            writer.write(b"one")
            raise RuntimeError("interrupted")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_example_round_trip_keeps_types_and_all_values():
    features = {
        "image/encoded": b"\xff\xd8\xff\x00binary",
        "names": ["tabby", "", "cat"],
        "blobs": [b"", b"\x00"],
        "ints": [0, -1, 2 ** 63 - 1, -(2 ** 63), 300],
        "flag": True,
        "floats": [0.5, -1.25, 3.0e38],
        "one_float": 0.1,
        "array_f": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float64),
        "array_i": np.arange(5, dtype=np.uint8),
        "empty_i": np.zeros(0, dtype=np.int64),
        "empty_f": np.zeros(0, dtype=np.float32),
    }
    parsed = parse_example(encode_example(features))
    assert list(parsed) == list(features)
    assert parsed["image/encoded"] == [features["image/encoded"]]
    assert parsed["names"] == [b"tabby", b"", b"cat"]
    assert parsed["blobs"] == [b"", b"\x00"]
    assert parsed["ints"].dtype == np.int64 and parsed["ints"].tolist() == features["ints"]
    assert parsed["flag"].tolist() == [1]
    assert parsed["floats"].dtype == np.float32
    np.testing.assert_array_equal(parsed["floats"], np.float32(features["floats"]))
    np.testing.assert_array_equal(parsed["one_float"], np.float32([0.1]))
    np.testing.assert_array_equal(parsed["array_f"], np.float32([1, 2, 3, 4]))
    assert parsed["array_i"].tolist() == [0, 1, 2, 3, 4]
    assert parsed["empty_i"].dtype == np.int64 and parsed["empty_i"].size == 0
    assert parsed["empty_f"].dtype == np.float32 and parsed["empty_f"].size == 0
    assert parsed["floats"].flags.writeable  # copies, not views pinning the record


def test_encode_rejects_ambiguous_values():
    with pytest.raises(TypeError, match="empty list"):
        encode_example({"x": []})
    with pytest.raises(TypeError, match="all bytes/str"):
        encode_example({"x": [1, b"a"]})


def _feature_entry(key: str, feature: bytes) -> bytes:
    entry = pw.encode_bytes_field(1, key.encode()) + pw.encode_bytes_field(2, feature)
    return pw.encode_bytes_field(1, entry)


def test_unpacked_numbers_and_empty_feature_are_accepted():
    # Int64List with unpacked varints (one negative), FloatList with unpacked fixed32 values.
    ints = pw.encode_varint_field(1, 7) + pw.encode_varint_field(1, (1 << 64) - 3)
    floats = pw.encode_fixed32_field(1, struct.unpack("<I", struct.pack("<f", 1.5))[0]) + \
        pw.encode_fixed32_field(1, struct.unpack("<I", struct.pack("<f", -2.0))[0])
    body = (_feature_entry("i", pw.encode_bytes_field(3, ints)) +
            _feature_entry("f", pw.encode_bytes_field(2, floats)) +
            _feature_entry("none", b""))
    parsed = parse_example(pw.encode_bytes_field(1, body))
    assert parsed["i"].tolist() == [7, -3]
    assert parsed["f"].tolist() == [1.5, -2.0]
    assert parsed["none"] == []


def test_map_entries_in_any_order_and_last_duplicate_wins():
    body = (_feature_entry("b", pw.encode_bytes_field(3, pw.encode_bytes_field(1, b"\x01"))) +
            _feature_entry("a", pw.encode_bytes_field(3, pw.encode_bytes_field(1, b"\x02"))) +
            _feature_entry("b", pw.encode_bytes_field(3, pw.encode_bytes_field(1, b"\x03"))))
    parsed = parse_example(pw.encode_bytes_field(1, body))
    assert parsed["a"].tolist() == [2] and parsed["b"].tolist() == [3]


def test_malformed_examples_raise_tfrecord_error_never_anything_else():
    record = next(iter_tfrecord(FIXTURES / "imagenet" / "train-00000-of-00001"))
    rng = random.Random(1234)
    outcomes = {"parsed": 0, "rejected": 0}
    for trial in range(400):
        data = bytearray(record)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            data[position] = rng.randrange(256)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        try:
            parse_example(bytes(data))
            outcomes["parsed"] += 1
        except TFRecordError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0 and sum(outcomes.values()) == 400
    with pytest.raises(TFRecordError, match="malformed"):
        parse_example(b"\x0a\xff\xff\xff\xff\x0f")


def test_gzip_and_zlib_files_are_standard_streams(tmp_path):
    """What we write decompresses with the stdlib, i.e. TF's GZIP/ZLIB readers can read it."""
    for codec, opener in (("GZIP", gzip.decompress), ("ZLIB", zlib.decompress)):
        path = tmp_path / f"{codec}.tfrecord"
        write_tfrecord(path, [b"hello", b"world"], codec)
        plain = tmp_path / "plain.tfrecord"
        write_tfrecord(plain, [b"hello", b"world"])
        assert opener(path.read_bytes()) == plain.read_bytes()
