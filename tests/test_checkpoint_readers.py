"""slimtune.checkpoint: reading TF V1/V2 (fixtures written by TensorFlow 2.21), safetensors, torch and
numpy files, writing TF checkpoints, and the inspect / to-npy / convert functions."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.checkpoint import (
    checkpoint_to_npy,
    convert_checkpoint,
    inspect_checkpoint,
    read_checkpoint,
    sniff_format,
    write_tf_checkpoint,
)
from slimtune.checkpoint import snappy
from slimtune.checkpoint.tf_proto import (
    DTYPES_BY_NAME,
    decode_varint_array,
    encode_full_slice,
    encode_shape,
    encode_varint_array,
    tensor_slice_key,
)
from slimtune.checkpoint.tf_table import SNAPPY_COMPRESSION, TableReader, TableWriter
from slimtune.checkpoint.tf_v1 import decode_tensor_values, encode_tensor_values
from slimtune.checkpoint.torch_io import write_safetensors
from slimtune.errors import CheckpointError
from slimtune.utils.crc import crc32c, mask
from slimtune.utils.protowire import (
    encode_bytes_field,
    encode_fixed32_field,
    encode_key,
    encode_varint,
    encode_varint_field,
    read_varint,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tf_checkpoints"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))


def expected_value(fixture: str, name: str) -> np.ndarray:
    key = f"{fixture}/{name}"
    if key in EXPECTED:
        return EXPECTED[key]
    spec = MANIFEST["strings"][key]
    out = np.empty(len(spec["hex"]), dtype=object)
    out[:] = [bytes.fromhex(h) for h in spec["hex"]]
    return out.reshape(spec["shape"])


def all_dtypes(seed: int = 0) -> dict[str, object]:
    """One tensor of every dtype the writers accept (numpy, plus a torch bfloat16)."""
    rng = np.random.default_rng(seed)
    strings = np.array([b"", b"a", b"\x00\xff\x00", b"z" * 128, "\u00e9".encode()], dtype=object)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f32/scalar": np.float32(-2.5),
        "f32/empty": np.zeros((0, 5), np.float32),
        "f64": rng.standard_normal(6),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "i8": np.array([-128, -7, 0, 127], np.int8),
        "i16": np.array([-32768, 5, 32767], np.int16),
        "i32": np.array([[-(2 ** 31), -1, 2 ** 31 - 1]], np.int32),
        "i64": np.array([-(2 ** 63), -1, 0, 2 ** 63 - 1], np.int64),
        "u8": np.arange(0, 256, 51, dtype=np.uint8),
        "u16": np.array([0, 65535], np.uint16),
        "u32": np.array([0, 2 ** 32 - 1], np.uint32),
        "u64": np.array([0, 2 ** 64 - 1], np.uint64),
        "bool": np.array([[True, False], [False, True]]),
        "c64": (rng.standard_normal(2) + 1j * rng.standard_normal(2)).astype(np.complex64),
        "c128": rng.standard_normal(3) + 1j,
        "str": strings,
        "str/scalar": np.array(b"one", dtype=object),
        "str/empty": np.zeros((0, 2), dtype=object),
    }


def as_expected(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.float().numpy()
    return np.asarray(value)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype == object:
        assert actual.dtype == object and list(actual.reshape(-1)) == list(expected.reshape(-1))
    else:
        assert actual.dtype == expected.dtype
        assert np.array_equal(actual, expected)


# ---------------------------------------------------------------------------------------------
# TensorFlow-written fixtures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", sorted(MANIFEST["fixtures"]))
def test_tf_fixture_matches_what_tensorflow_read(fixture: str) -> None:
    spec = MANIFEST["fixtures"][fixture]
    with read_checkpoint(FIXTURES / spec["path"]) as reader:
        assert reader.format == ("tf_v1" if fixture.endswith("v1") else "tf_v2")
        assert sorted(reader) == sorted(spec["variables"])   # slice keys and the header never listed
        for name, variable in spec["variables"].items():
            assert list(reader.shape(name)) == variable["shape"]
            assert reader.dtype(name) == variable["dtype"]
            assert_same(reader[name], expected_value(fixture, name))


def test_tf_fixtures_cover_what_the_task_needs() -> None:
    v1 = MANIFEST["fixtures"]["dtypes_v1"]["variables"]
    v2 = MANIFEST["fixtures"]["dtypes_v2"]["variables"]
    assert {v["dtype"] for v in v2.values()} >= {
        "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool", "string", "complex64", "complex128"}
    assert {v["dtype"] for v in v1.values()} >= {"float16", "float32", "int8", "int64", "string", "bool"}
    assert MANIFEST["fixtures"]["snappy_v1"]["snappy_blocks"] >= 1
    assert len(MANIFEST["fixtures"]["sharded_v2"]["data_shards"]) == 2
    table = TableReader(FIXTURES / "snappy_v1.ckpt")
    assert any(table.compression(i) == SNAPPY_COMPRESSION for i in range(len(table.blocks)))
    table.close()


def test_bfloat16_is_widened_exactly_but_reported_and_handed_to_torch_as_bfloat16() -> None:
    with read_checkpoint(FIXTURES / "dtypes_v2" / "model.ckpt") as reader:
        value = reader["dtypes/bfloat16"]
        tensor = reader.to_torch("dtypes/bfloat16")
        assert reader.dtype("dtypes/bfloat16") == "bfloat16"
        assert reader.nbytes("dtypes/bfloat16") == 2 * value.size
    assert value.dtype == np.float32 and tensor.dtype == torch.bfloat16
    assert np.array_equal(tensor.float().numpy(), value)
    assert np.array_equal(value, EXPECTED["dtypes_v2/dtypes/bfloat16"])


def test_partitioned_variables_are_assembled_from_their_slices() -> None:
    for fixture in ("partitioned_v1", "partitioned_v2"):
        with read_checkpoint(FIXTURES / MANIFEST["fixtures"][fixture]["path"]) as reader:
            assert reader.shape("part/rows") == (7, 4) and reader.shape("part/cols") == (3, 5)
            assert_same(reader["part/cols"], EXPECTED[f"{fixture}/part/cols"])   # split along axis 1


@pytest.mark.parametrize("suffix", ["", ".index", ".data-00000-of-00002", ".data-00001-of-00002"])
def test_v2_opens_from_prefix_or_any_of_its_files(suffix: str) -> None:
    with read_checkpoint(str(FIXTURES / "sharded_v2" / "model.ckpt-7") + suffix) as reader:
        assert reader.format == "tf_v2" and len(reader) == 4
        assert_same(reader["shard/cpu1/weights"], EXPECTED["sharded_v2/shard/cpu1/weights"])


def test_directory_uses_its_checkpoint_state_file(tmp_path: Path) -> None:
    # TF wrote an absolute path from the developer's machine: the basename is found beside it.
    with read_checkpoint(FIXTURES / "sharded_v2") as reader:
        assert reader.path.name == "model.ckpt-7"
    shutil.copytree(FIXTURES / "dtypes_v2", tmp_path / "run")
    for step in (5, 9):
        for file in (tmp_path / "run").iterdir():
            if file.name.startswith("model.ckpt."):
                shutil.copy(file, tmp_path / "run" / file.name.replace("model.ckpt", f"model.ckpt-{step}"))
    (tmp_path / "run" / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt-5"\nall_model_checkpoint_paths: "model.ckpt-9"\n')
    assert read_checkpoint(tmp_path / "run").path.name == "model.ckpt-5"
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-404"\n')
    with pytest.raises(CheckpointError, match="model.ckpt-404"):
        read_checkpoint(tmp_path / "run")


def test_directory_without_state_file_takes_its_only_checkpoint_or_lists_them(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "dtypes_v1.ckpt", tmp_path / "model.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert read_checkpoint(tmp_path).format == "tf_v1"
    shutil.copytree(FIXTURES / "dtypes_v2", tmp_path / "v2", dirs_exist_ok=True)
    for file in (tmp_path / "v2").iterdir():
        shutil.move(file, tmp_path / file.name.replace("model.ckpt", "other.ckpt"))
    with pytest.raises(CheckpointError, match=r"several checkpoints \(model.ckpt, other.ckpt\)"):
        read_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        read_checkpoint(empty)


def test_missing_or_unknown_path_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as missing:
        read_checkpoint(tmp_path / "nope.ckpt")
    assert "not found" in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "weights.txt").write_text("hello world, this is plainly not a checkpoint file at all")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        read_checkpoint(tmp_path / "weights.txt")


def test_format_is_sniffed_from_content_not_extension(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "dtypes_v1.ckpt", tmp_path / "weights.pth")
    assert read_checkpoint(tmp_path / "weights.pth").format == "tf_v1"
    write_safetensors(tmp_path / "a.safetensors", ["x"], {"x": _info((2,), "float32")},
                      lambda n: np.ones(2, np.float32))
    os.rename(tmp_path / "a.safetensors", tmp_path / "pytorch_model.bin")
    assert sniff_format(tmp_path / "pytorch_model.bin") == "safetensors"
    assert read_checkpoint(tmp_path / "pytorch_model.bin")["x"].tolist() == [1.0, 1.0]


def test_reader_is_lazy_mapping_and_close_stops_reads(tmp_path: Path) -> None:
    prefix = write_tf_checkpoint(tmp_path / "m.ckpt", {"a": np.arange(3, dtype=np.float32), "b": np.int64(4)})
    os.remove(f"{prefix}.data-00000-of-00001")
    reader = read_checkpoint(prefix)                     # listing needs only the index
    assert dict(zip(reader, map(reader.shape, reader))) == {"a": (3,), "b": ()}
    assert "a" in reader and "zzz" not in reader and reader.get("zzz") is None
    with pytest.raises(CheckpointError, match="missing its data file"):
        reader["a"]
    with pytest.raises(KeyError, match="zzz"):
        reader["zzz"]
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader["a"]


def test_values_outlive_the_reader_and_are_fresh_writable_arrays(tmp_path: Path) -> None:
    big = np.arange(600_000, dtype=np.float32).reshape(600, 1000)   # above the own-mapping size
    for version in (1, 2):
        path = write_tf_checkpoint(tmp_path / f"v{version}" / "m.ckpt", {"big": big, "small": big[:2, :3]},
                                   version=version)
        with read_checkpoint(path) as reader:
            first, second = reader["big"], reader["big"]
            tensors = reader.load_all_torch()
        first[0, 0] = -1.0
        assert second[0, 0] == 0.0 and first.flags.writeable
        assert np.array_equal(second, big) and np.array_equal(tensors["big"].numpy(), big)
        assert np.array_equal(tensors["small"].numpy(), big[:2, :3])


# ---------------------------------------------------------------------------------------------
# Writer round trips (the writer's output was verified against TF by the fixture script)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_writer_round_trip_every_dtype(tmp_path: Path, version: int) -> None:
    tensors = all_dtypes()
    if version == 1:   # TF's V1 saver cannot hold these; the writer says so
        for name in ("bf16", "u32", "u64"):
            with pytest.raises(CheckpointError, match="version=2"):
                write_tf_checkpoint(tmp_path / "refused.ckpt", {name: tensors[name]}, version=1)
            del tensors[name]
    path = write_tf_checkpoint(tmp_path / "model.ckpt", tensors, version=version)
    with read_checkpoint(path) as reader:
        assert sorted(reader) == sorted(tensors)
        for name, value in tensors.items():
            assert_same(reader[name], as_expected(value))
        assert reader.dtype("f16") == "float16" and reader.dtype("str") == "string"


def test_writer_snappy_v1_and_multi_block_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {f"layer{i:03d}/w": np.tile(rng.standard_normal(8).astype(np.float32), 40) for i in range(60)}
    tensors["ints"] = np.arange(-500, 500, dtype=np.int64) // 7
    from slimtune.checkpoint.tf_v1 import write_v1
    from slimtune.checkpoint.tf_v2 import write_v2

    v1 = write_v1(tmp_path / "snappy.ckpt", tensors, compression=SNAPPY_COMPRESSION, block_size=512)
    v2 = write_v2(tmp_path / "v2" / "m.ckpt", tensors, block_size=128)
    table = TableReader(v1)
    kinds = [table.compression(i) for i in range(len(table.blocks))]
    table.close()
    assert len(kinds) > 10 and SNAPPY_COMPRESSION in kinds
    assert len(TableReader(f"{v2}.index").blocks) > 5
    for path in (v1, v2):
        with read_checkpoint(path) as reader:
            for name, value in tensors.items():
                assert_same(reader[name], value)


def test_big_endian_bundle_is_byte_swapped(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0], [3.25, 1e-3]], dtype=np.float32)
    ints = np.array([1, -2, 1 << 40], dtype=np.int64)
    data = b""
    entries = []
    for name, array in (("floats", values), ("ints", ints)):
        stored = array.astype(array.dtype.newbyteorder(">")).tobytes()
        dtype = DTYPES_BY_NAME["float32" if array.dtype.kind == "f" else "int64"].enum
        entries.append((name.encode(), encode_varint_field(1, dtype) + encode_bytes_field(2, encode_shape(array.shape))
                        + encode_varint_field(4, len(data)) + encode_varint_field(5, len(stored))
                        + encode_fixed32_field(6, mask(crc32c(stored)))))
        data += stored
    header = encode_varint_field(1, 1) + encode_varint_field(2, 1) + encode_bytes_field(3, encode_varint_field(1, 1))
    write_bundle(tmp_path / "be", header, entries, {0: data})
    with read_checkpoint(tmp_path / "be") as reader:
        assert_same(reader["floats"], values)
        assert_same(reader["ints"], ints)


def write_bundle(prefix: Path, header: bytes, entries: list[tuple[bytes, bytes]], shards: dict[int, bytes],
                 num_shards: int = 1) -> None:
    """Hand-build a V2 bundle: index entries as given, data shards as given."""
    with open(f"{prefix}.index", "wb") as out:
        writer = TableWriter(out)
        writer.add(b"", header)
        for key, value in sorted(entries):
            writer.add(key, value)
        writer.finish()
    for shard, data in shards.items():
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(data)


# ---------------------------------------------------------------------------------------------
# V1 TensorProto decoding: every encoding protobuf allows
# ---------------------------------------------------------------------------------------------
def decode(proto: bytes, dtype: str, count: int) -> np.ndarray:
    return decode_tensor_values(memoryview(proto), 0, len(proto), DTYPES_BY_NAME[dtype], count)


def test_v1_values_accept_unpacked_and_split_packed_encodings() -> None:
    floats = np.array([1.0, -2.5, 3.0], np.float32)
    unpacked = b"".join(encode_key(5, 5) + struct.pack("<f", v) for v in floats)
    assert_same(decode(unpacked, "float32", 3), floats)
    split = encode_bytes_field(5, floats[:1].tobytes()) + encode_key(5, 5) + floats[1:2].tobytes() \
        + encode_bytes_field(5, floats[2:].tobytes())
    assert_same(decode(split, "float32", 3), floats)
    ints = np.array([-1, 7, -(2 ** 31)], np.int32)
    unpacked_ints = b"".join(encode_varint_field(7, int(v)) for v in ints)   # negatives: 10-byte varints
    assert_same(decode(unpacked_ints, "int32", 3), ints)
    doubles = np.array([0.5, -1e300])
    assert_same(decode(b"".join(encode_key(6, 1) + struct.pack("<d", v) for v in doubles), "float64", 2), doubles)
    assert_same(decode(encode_bytes_field(4, doubles.tobytes()), "float64", 2), doubles)   # tensor_content


@pytest.mark.parametrize("dtype,values", [
    ("float16", np.array([1.0, -0.5, 65504.0], np.float16)),
    ("int8", np.array([-128, 127, 0], np.int8)),
    ("uint16", np.array([0, 65535], np.uint16)),
    ("uint32", np.array([0, 2 ** 32 - 1], np.uint32)),
    ("uint64", np.array([0, 2 ** 64 - 1], np.uint64)),
    ("int64", np.array([-(2 ** 63), 2 ** 63 - 1], np.int64)),
    ("bool", np.array([True, False, True])),
    ("complex64", np.array([1 + 2j, -3j], np.complex64)),
    ("complex128", np.array([1 + 2j, -3j])),
])
def test_v1_value_codec_round_trips(dtype: str, values: np.ndarray) -> None:
    proto = encode_tensor_values(DTYPES_BY_NAME[dtype], values)
    assert_same(decode(proto, dtype, len(values)), values)


def test_v1_bfloat16_uses_half_val_bit_patterns() -> None:
    bits = torch.tensor([1.0, -2.0, 0.15625]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    proto = encode_bytes_field(13, encode_varint_array(bits))
    assert_same(decode(proto, "bfloat16", 3), bits)


def test_v1_value_count_must_match_the_shape() -> None:
    with pytest.raises(Exception, match="needs"):
        decode(encode_bytes_field(5, np.zeros(2, np.float32).tobytes()), "float32", 3)


def test_v1_hand_built_multi_slice_file(tmp_path: Path) -> None:
    """A V1 file whose meta lists two explicit slices (start/length extents)."""
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    dtype = DTYPES_BY_NAME["float32"]
    slices = [((0, 1), (0, -1)), ((1, 3), (0, -1))]

    def slice_proto(extents: tuple) -> bytes:
        return b"".join(encode_bytes_field(1, (encode_varint_field(1, s) if s else b"")
                                           + (encode_varint_field(2, n) if n != -1 else b""))
                        for s, n in extents)

    meta = encode_bytes_field(1, encode_bytes_field(1, b"w") + encode_bytes_field(2, encode_shape(full.shape))
                              + encode_varint_field(3, dtype.enum)
                              + b"".join(encode_bytes_field(4, slice_proto(e)) for e in slices))
    records = []
    for extents in slices:
        part = full[extents[0][0]:extents[0][0] + extents[0][1]]
        saved = encode_bytes_field(1, b"w") + encode_bytes_field(2, slice_proto(extents)) \
            + encode_bytes_field(3, encode_tensor_values(dtype, part))
        records.append((tensor_slice_key(b"w", extents), encode_bytes_field(2, saved)))
    with open(tmp_path / "hand.ckpt", "wb") as out:
        writer = TableWriter(out)
        writer.add(b"", encode_bytes_field(1, meta))
        for key, value in sorted(records):
            writer.add(key, value)
        writer.finish()
    assert_same(read_checkpoint(tmp_path / "hand.ckpt")["w"], full)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def test_ordered_code_slice_keys_match_tensorflow_bytes() -> None:
    assert tensor_slice_key(b"a", ((0, -1),)) == b"\x00a\x00\x01\x01\x01\x80\x7f"
    assert tensor_slice_key(b"x\x00\xff", ()) == b"\x00x\x00\xff\xff\x00\x00\x01\x00"
    assert tensor_slice_key(b"v", ((3, 100),)) == b"\x00v\x00\x01\x01\x01\x83\xc0\x64"
    # Keys TF 2.21 wrote for a (2**21 + 6, 1) variable split in three: 1-, 3- and 4-byte numbers.
    assert tensor_slice_key(b"big", ((699053, 699053), (0, 1))).hex() == "0062696700010102eaaaadeaaaad8081"
    assert tensor_slice_key(b"big", ((1398106, 699052), (0, 1))).hex() == "0062696700010102f015555aeaaaac8081"
    assert tensor_slice_key(b"v", ((-100, 0),)).hex() == "0076000101013f9c80"
    assert encode_full_slice(2) == b"\x0a\x00\x0a\x00"


def test_varint_arrays_match_the_scalar_codec() -> None:
    values = np.array([0, 1, 127, 128, 300, 2 ** 35, 2 ** 63 - 1, -1, -(2 ** 63)], dtype=np.int64)
    packed = encode_varint_array(values)
    assert packed == b"".join(encode_varint(int(v)) for v in values)
    decoded = decode_varint_array(packed, len(values))
    assert decoded.view(np.int64).tolist() == values.tolist()
    assert read_varint(packed, 0)[0] == 0


def test_snappy_round_trip_and_known_stream() -> None:
    rng = np.random.default_rng(0)
    for data in (b"", b"a", bytes(rng.integers(0, 4, 5000, dtype=np.uint8)), rng.bytes(3000), b"ab" * 2000):
        assert snappy.decompress(snappy.compress(data)) == data
    # literal "abc", then copy offset 3 length 9 (overlapping): "abcabcabcabc"
    stream = encode_varint(12) + bytes([2 << 2]) + b"abc" + bytes([((9 - 1) << 2) | 2]) + (3).to_bytes(2, "little")
    assert snappy.decompress(stream) == b"abc" * 4
    assert len(snappy.compress(b"x" * 10_000)) < 600


# ---------------------------------------------------------------------------------------------
# safetensors / torch / numpy
# ---------------------------------------------------------------------------------------------
def _info(shape: tuple[int, ...], dtype: str):
    from slimtune.checkpoint.base import TensorInfo

    return TensorInfo(shape, dtype, 0)


def test_safetensors_both_directions(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4).to(torch.bfloat16), "i": torch.arange(5),
               "m": torch.tensor([True, False]), "h": torch.randn(2).half(), "s": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "lib.safetensors")
    with read_checkpoint(tmp_path / "lib.safetensors") as reader:
        assert reader.format == "safetensors" and reader.dtype("b") == "bfloat16" and reader.shape("s") == ()
        for name, tensor in tensors.items():
            assert torch.equal(reader.to_torch(name), tensor)
        assert_same(reader["b"], tensors["b"].float().numpy())
        infos = reader.infos()
        write_safetensors(tmp_path / "ours.safetensors", list(infos), infos, reader._read_checked)
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as handle:
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torch_state_dicts(tmp_path: Path, wrapper: str | None) -> None:
    state = {"conv.weight": torch.randn(2, 3, 1, 1), "bn.running_mean": torch.zeros(2),
             "bn.num_batches_tracked": torch.tensor(5), "emb": torch.randn(2).to(torch.bfloat16)}
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    torch.save(payload, tmp_path / "w.pth")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for file in ("w.pth", "legacy.bin"):
        with read_checkpoint(tmp_path / file) as reader:
            assert reader.format == "torch" and sorted(reader) == sorted(state)
            assert reader.dtype("emb") == "bfloat16" and reader.shape("conv.weight") == (2, 3, 1, 1)
            for name, tensor in state.items():
                assert torch.equal(reader.to_torch(name), tensor)
                assert np.array_equal(reader[name], tensor.float().numpy() if name == "emb" else tensor.numpy())


def test_torch_file_with_code_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1), "f": Path("/x")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pt")


def test_npy_dict_as_the_seed_writes_it_and_npz(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((3, 3, 3, 8)).astype(np.float32)
    np.save(tmp_path / "vgg16.npy", {"conv1_1": [w, np.zeros(8, np.float32)], "fc8": {"weights": w[0, 0]},
                                     "step": np.int64(7)})
    with read_checkpoint(tmp_path / "vgg16.npy") as reader:
        assert reader.format == "numpy"
        assert sorted(reader) == ["conv1_1/0", "conv1_1/1", "fc8/weights", "step"]
        assert_same(reader["conv1_1/0"], w)
        assert reader.shape("step") == () and reader.dtype("step") == "int64"
    np.savez(tmp_path / "w.npz", **{"a/b": w, "c": np.arange(3)})
    with read_checkpoint(tmp_path / "w.npz") as reader:
        assert sorted(reader) == ["a/b", "c"] and reader.shape("a/b") == w.shape
        assert_same(reader["a/b"], w)


def test_python2_style_npy_pickle_is_read(tmp_path: Path) -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)    # big-endian payload, protocol-2 pickle
    body = pickle.dumps(np.array({"layer": array}, dtype=object), protocol=2)
    header = np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object))
    with open(tmp_path / "old.npy", "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(body)
    value = read_checkpoint(tmp_path / "old.npy")["layer"]
    assert value.dtype == np.dtype("<f4") and np.array_equal(value, array)


# ---------------------------------------------------------------------------------------------
# inspect / to-npy / convert
# ---------------------------------------------------------------------------------------------
def test_inspect_table_and_single_tensor() -> None:
    text = inspect_checkpoint(FIXTURES / "dtypes_v1.ckpt")
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "bytes"]
    row = next(line for line in lines if line.startswith("dtypes/float32_matrix "))
    assert row.split() == ["dtypes/float32_matrix", "[3,", "5]", "float32", "60"]
    assert lines[-1].startswith("18 tensors,") and "format tf_v1" in lines[-1]
    one = inspect_checkpoint(FIXTURES / "dtypes_v1.ckpt", tensor="dtypes/int16")
    assert "shape [4], dtype int16" in one and "min -32768  max 32767" in one
    with pytest.raises(CheckpointError, match="similar names: dtypes/int16"):
        inspect_checkpoint(FIXTURES / "dtypes_v1.ckpt", tensor="int16")


def test_checkpoint_to_npy_and_npz(tmp_path: Path) -> None:
    source = FIXTURES / "dtypes_v2" / "model.ckpt"
    exported = np.load(checkpoint_to_npy(source, tmp_path / "w.npy"), allow_pickle=True).item()
    packed = np.load(checkpoint_to_npy(source, tmp_path / "w.npz"))
    with read_checkpoint(source) as reader:
        assert sorted(exported) == sorted(reader) == sorted(packed.files)
        for name in reader:
            assert_same(exported[name], reader[name])
            if reader.dtype(name) != "string":
                assert_same(packed[name], reader[name])
    assert list(packed["dtypes/string"])[1:3] == [b"a", b"odd"]
    assert read_checkpoint(tmp_path / "w.npy").dtype("dtypes/bfloat16") == "float32"   # exported widened


def test_convert_to_safetensors_with_rename(tmp_path: Path) -> None:
    from safetensors import safe_open

    def rename(name: str) -> str | None:
        if name == "dtypes/int8":
            return None
        return name.replace("dtypes/", "model.")

    report = convert_checkpoint(FIXTURES / "dtypes_v2" / "model.ckpt", tmp_path / "out.safetensors", rename)
    assert report.dropped == ["dtypes/int8"]
    assert set(report.unsupported) == {"dtypes/string", "dtypes/string_scalar", "dtypes/string_empty",
                                       "dtypes/complex128"}
    with read_checkpoint(FIXTURES / "dtypes_v2" / "model.ckpt") as source, \
            safe_open(tmp_path / "out.safetensors", framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(report.written.values())
        for old, new in report.written.items():
            assert torch.equal(handle.get_tensor(new), source.to_torch(old))
    with pytest.raises(CheckpointError, match="maps both"):
        convert_checkpoint(FIXTURES / "dtypes_v2" / "model.ckpt", tmp_path / "x.safetensors", lambda n: "same")
