"""Corrupt, truncated and hostile checkpoint files must fail fast with CheckpointError: no hang,
no unbounded allocation, no stray exception type, never a silently wrong tensor."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from slimtune.checkpoint import read_checkpoint
from slimtune.checkpoint import snappy
from slimtune.checkpoint.tf_proto import DTYPES_BY_NAME, encode_shape, tensor_slice_key
from slimtune.checkpoint.tf_table import MAGIC_BYTES, BlockHandle, _BlockBuilder, encode_block_handle
from slimtune.errors import CheckpointError
from slimtune.utils.crc import crc32c, mask
from slimtune.utils.protowire import encode_bytes_field, encode_fixed32_field, encode_varint, encode_varint_field

FIXTURES = Path(__file__).parent / "fixtures" / "tf_checkpoints"
FLOAT = DTYPES_BY_NAME["float32"].enum
STRING = DTYPES_BY_NAME["string"].enum
V2_HEADER = encode_varint_field(1, 1) + encode_bytes_field(3, encode_varint_field(1, 1))


# ---------------------------------------------------------------------------------------------
# Hand-assembled tables and bundles
# ---------------------------------------------------------------------------------------------
def contents(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    builder = _BlockBuilder(restart_interval)
    for key, value in entries:
        builder.add(key, value)
    return builder.finish()


def stored(block: bytes, kind: int = 0) -> bytes:
    trailer = bytes((kind,))
    return block + trailer + struct.pack("<I", mask(crc32c(block + trailer)))


def table_bytes(blocks: list[bytes], index: list[BlockHandle] | None = None, kinds: list[int] | None = None) -> bytes:
    """Data blocks (already-built contents), an index (default: one entry per block), footer."""
    out = bytearray()
    handles = []
    for i, block in enumerate(blocks):
        handles.append(BlockHandle(len(out), len(block)))
        out += stored(block, kinds[i] if kinds else 0)
    metaindex = BlockHandle(len(out), len(contents([])))
    out += stored(contents([]))
    index_block = contents([(bytes([0xF0 + i]), encode_block_handle(h)) for i, h in enumerate(index or handles)], 1)
    index_handle = BlockHandle(len(out), len(index_block))
    out += stored(index_block)
    handles_bytes = encode_block_handle(metaindex) + encode_block_handle(index_handle)
    return bytes(out + handles_bytes + b"\0" * (40 - len(handles_bytes)) + MAGIC_BYTES)


def entry(dtype: int, shape: tuple[int, ...], offset: int = 0, size: int = 0, crc: int = 0, shard: int = 0,
          slices: list[bytes] = (), raw_shape: bytes | None = None) -> bytes:
    shape_proto = raw_shape if raw_shape is not None else encode_shape(shape)
    proto = encode_varint_field(1, dtype) + encode_bytes_field(2, shape_proto)
    if shard:
        proto += encode_varint_field(3, shard)
    proto += encode_varint_field(4, offset) + encode_varint_field(5, size) + encode_fixed32_field(6, crc)
    for piece in slices:
        proto += encode_bytes_field(7, piece)
    return proto


def bundle(tmp_path: Path, entries: list[tuple[bytes, bytes]], data: bytes = b"", header: bytes = V2_HEADER,
           num_shards: int = 1) -> Path:
    prefix = tmp_path / "model.ckpt"
    Path(f"{prefix}.index").write_bytes(table_bytes([contents([(b"", header)] + sorted(entries))]))
    Path(f"{prefix}.data-00000-of-{num_shards:05d}").write_bytes(data)
    return prefix


def float_entry(values: np.ndarray, offset: int = 0) -> bytes:
    raw = values.astype("<f4").tobytes()
    return entry(FLOAT, values.shape, offset, len(raw), mask(crc32c(raw)))


def read_all(path: Path | str) -> dict[str, np.ndarray]:
    with read_checkpoint(path) as reader:
        return {name: reader[name] for name in reader}


def fails(path: Path | str, match: str | None = None) -> str:
    """Open and read everything; it must raise CheckpointError (quickly). Return the message."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as caught:
        read_all(path)
    assert time.perf_counter() - start < 2.0
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# The table container
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 10, 47])
def test_too_short_files(tmp_path: Path, size: int) -> None:
    path = tmp_path / "short.ckpt"
    path.write_bytes(MAGIC_BYTES[-size:] if size else b"")
    fails(path)


def test_wrong_magic_is_not_a_table(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "dtypes_v1.ckpt").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "x.ckpt").write_bytes(data)
    fails(tmp_path / "x.ckpt", "unrecognised checkpoint format")
    Path(tmp_path / "y.ckpt.index").write_bytes(data)
    fails(tmp_path / "y.ckpt", "wrong magic")


def test_footer_handles_past_the_file(tmp_path: Path) -> None:
    data = bytearray(table_bytes([contents([(b"", V2_HEADER)])]))
    footer = encode_block_handle(BlockHandle(0, 8)) + encode_block_handle(BlockHandle(1 << 40, 1 << 40))
    data[-48:-8] = footer + b"\0" * (40 - len(footer))
    Path(tmp_path / "m.index").write_bytes(data)
    fails(tmp_path / "m", "points past the footer")


def test_bad_block_checksum_and_type(tmp_path: Path) -> None:
    block = contents([(b"", V2_HEADER), (b"w", float_entry(np.ones(2)))])
    good = table_bytes([block])
    corrupt = bytearray(good)
    corrupt[3] ^= 0x01
    Path(tmp_path / "a.index").write_bytes(corrupt)
    fails(tmp_path / "a", "checksum mismatch")
    Path(tmp_path / "b.index").write_bytes(table_bytes([block], kinds=[7]))
    fails(tmp_path / "b", "compression type 7")


@pytest.mark.parametrize("layout", ["same_block_twice", "overlapping", "backwards", "into_index"])
def test_index_cycles_and_overlaps(tmp_path: Path, layout: str) -> None:
    first = contents([(b"", V2_HEADER)])
    second = contents([(b"w", float_entry(np.ones(2)))])
    size = len(first) + 5
    index = {
        "same_block_twice": [BlockHandle(0, len(first)), BlockHandle(0, len(first))],
        "overlapping": [BlockHandle(0, len(first)), BlockHandle(size - 2, len(second))],
        "backwards": [BlockHandle(size, len(second)), BlockHandle(0, len(first))],
        "into_index": [BlockHandle(0, len(first)), BlockHandle(size, 10_000)],
    }[layout]
    Path(tmp_path / "m.index").write_bytes(table_bytes([first, second], index=index))
    Path(tmp_path / "m.data-00000-of-00001").write_bytes(np.ones(2, "<f4").tobytes())
    fails(tmp_path / "m")


@pytest.mark.parametrize("block", [
    b"\xff\xff\xff\xff",                                            # restart count larger than the block
    b"\xff" * 11 + b"\x00\x00\x00\x00",                              # varint longer than 10 bytes
    encode_varint(5) + b"\x01\x01x\x00" + b"\x00\x00\x00\x00",       # shares 5 bytes with an empty key
    b"\x00\x09\x00abc" + b"\x00\x00\x00\x00",                        # key runs past the block
    b"\x00\x01\xff\xff\xff\x0fk" + b"\x00\x00\x00\x00",              # value length 4 GiB
])
def test_malformed_block_entries(tmp_path: Path, block: bytes) -> None:
    Path(tmp_path / "m.index").write_bytes(table_bytes([block]))
    fails(tmp_path / "m")


def test_keys_must_increase_across_blocks(tmp_path: Path) -> None:
    blocks = [contents([(b"", V2_HEADER), (b"b", float_entry(np.ones(1)))]),
              contents([(b"a", float_entry(np.ones(1)))])]
    Path(tmp_path / "m.index").write_bytes(table_bytes(blocks))
    Path(tmp_path / "m.data-00000-of-00001").write_bytes(np.ones(1, "<f4").tobytes())
    fails(tmp_path / "m", "strictly increasing")


@pytest.mark.parametrize("stream", [
    encode_varint(1 << 31) + b"\x00a",                 # claims 2 GiB from 7 bytes: refused before allocating
    encode_varint(10) + b"\x24ab",                     # literal runs past the input
    encode_varint(10) + b"\x00a" + b"\x0e\x05\x00",    # copy reaches before the start
    encode_varint(2) + b"\x08abc",                     # more output than declared
    encode_varint(8) + b"\x08abc",                     # less output than declared
    b"\xff\xff\xff\xff\xff\xff",                       # broken length preamble
])
def test_hostile_snappy_streams(tmp_path: Path, stream: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(snappy.SnappyError):
        snappy.decompress(stream)
    assert time.perf_counter() - start < 0.1
    Path(tmp_path / "s.ckpt").write_bytes(table_bytes([stream], kinds=[1]))
    fails(tmp_path / "s.ckpt", "corrupt")


# ---------------------------------------------------------------------------------------------
# V2 bundles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,match", [
    (encode_varint_field(1, 1_000_000_000), "data shards"),
    (encode_varint_field(1, 1) + encode_varint_field(2, 5), "endianness"),
    (encode_varint_field(1, 1) + encode_bytes_field(3, encode_varint_field(1, 9) + encode_varint_field(2, 7)), "newer"),
    (encode_varint_field(1, -3), "data shards"),
])
def test_bad_bundle_headers(tmp_path: Path, header: bytes, match: str) -> None:
    fails(bundle(tmp_path, [(b"w", float_entry(np.ones(1)))], np.ones(1, "<f4").tobytes(), header), match)


def test_index_without_header(tmp_path: Path) -> None:
    Path(tmp_path / "m.index").write_bytes(table_bytes([contents([(b"a", float_entry(np.ones(1)))])]))
    fails(tmp_path / "m", "no bundle header")


@pytest.mark.parametrize("proto,match", [
    (entry(FLOAT, (2,), offset=4, size=8), "outside"),                         # runs past the data file
    (entry(FLOAT, (2,), offset=1 << 62, size=8), "outside"),                   # absurd offset
    (entry(FLOAT, (2,), offset=-8 & (2 ** 64 - 1), size=8), "outside"),        # negative offset
    (entry(FLOAT, (3,), size=8), "stored bytes"),                              # size disagrees with shape
    (entry(FLOAT, (1 << 40, 1 << 40), size=8), "absurdly"),                    # 2**80 elements
    (entry(FLOAT, (), raw_shape=encode_bytes_field(2, encode_varint_field(1, -5))), "unknown"),   # negative dim
    (entry(FLOAT, (), raw_shape=encode_varint_field(3, 1)), "unknown rank"),
    (entry(FLOAT, (), raw_shape=encode_bytes_field(2, b"") * 40), "rank"),
    (entry(FLOAT, (2,), size=8, shard=3), "shard 3"),
    (entry(FLOAT, (2,), size=8, crc=12345), "checksum"),
    (entry(99, (2,), size=8), "unknown_dtype_99"),
    (entry(20, (2,), size=8), "resource"),
])
def test_lying_bundle_entries(tmp_path: Path, proto: bytes, match: str) -> None:
    fails(bundle(tmp_path, [(b"w", proto)], np.ones(2, "<f4").tobytes()), match)


def test_missing_data_shard(tmp_path: Path) -> None:
    prefix = bundle(tmp_path, [(b"w", float_entry(np.ones(2)))], np.ones(2, "<f4").tobytes())
    os.remove(f"{prefix}.data-00000-of-00001")
    fails(prefix, "missing its data file model.ckpt.data-00000-of-00001")


def test_huge_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    # 2**46 float32 values (256 TiB) claimed by an 8-byte entry: must fail on arithmetic alone.
    fails(bundle(tmp_path, [(b"w", entry(FLOAT, (1 << 23, 1 << 23), size=8))], b"\0" * 8), "stored bytes")


@pytest.mark.parametrize("payload,count,match", [
    (encode_varint(3) + b"\0\0\0\0" + b"abc" * 2, 1, "add up"),
    (encode_varint(1 << 40) + b"\0\0\0\0", 1, "add up"),
    (b"\x03", 5, "cannot fit"),
    (encode_varint(3) + b"\0\0\0\0abc", 1, "checksum"),
    (b"\xff" * 11, 1, "corrupt string lengths"),
])
def test_lying_string_tensors(tmp_path: Path, payload: bytes, count: int, match: str) -> None:
    proto = entry(STRING, (count,), size=len(payload), crc=mask(crc32c(payload)))
    fails(bundle(tmp_path, [(b"s", proto)], payload), match)


def slice_proto(*extents: tuple[int, int]) -> bytes:
    return b"".join(encode_bytes_field(1, encode_varint_field(1, s) + encode_varint_field(2, n)) for s, n in extents)


def partitioned(tmp_path: Path, full_shape: tuple[int, ...], parts: list[tuple[tuple[int, int], ...]],
                nested: bool = False, shape_of_part=None) -> Path:
    data = b""
    entries = []
    for extents in parts:
        shape = shape_of_part or tuple(n for _, n in extents)
        raw = np.ones(shape, "<f4").tobytes()
        extra = [slice_proto(*extents)] if nested else []
        entries.append((tensor_slice_key(b"w", extents),
                        entry(FLOAT, shape, len(data), len(raw), mask(crc32c(raw)), slices=extra)))
        data += raw
    entries.append((b"w", entry(FLOAT, full_shape, slices=[slice_proto(*e) for e in parts])))
    return bundle(tmp_path, entries, data)


@pytest.mark.parametrize("full,parts,kwargs,match", [
    ((4,), [((0, 2),), ((1, 3),)], {}, "hold 5 elements"),                     # overlap (sizes do not add up)
    ((4, 2), [((0, 2), (0, 2)), ((1, 2), (0, 2))], {}, "overlap"),             # overlap, sizes add up
    ((4,), [((0, 2),)], {}, "covers"),                                          # gap
    ((4,), [((0, 2),), ((2, 2),)], {"nested": True}, "itself partitioned"),     # slice entry pointing onward
    ((4,), [((0, 2),), ((2, 2),)], {"shape_of_part": (3,)}, "disagrees"),
    ((1 << 40,), [((0, 2),), ((2, 2),)], {}, "hold 4 elements"),                # huge full shape, tiny slices
    ((4,), [((2, 5),), ((0, 2),)], {}, "outside"),
])
def test_lying_partitioned_variables(tmp_path: Path, full, parts, kwargs, match) -> None:
    fails(partitioned(tmp_path, full, parts, **kwargs), match)


def test_missing_slice_entry(tmp_path: Path) -> None:
    entries = [(b"w", entry(FLOAT, (4,), slices=[slice_proto((0, 2)), slice_proto((2, 2))]))]
    fails(bundle(tmp_path, entries), "slice entry is missing")


# ---------------------------------------------------------------------------------------------
# V1 files
# ---------------------------------------------------------------------------------------------
def v1_file(tmp_path: Path, meta_tensors: list[bytes], records: list[tuple[bytes, bytes]],
            versions: bytes = b"") -> Path:
    meta = b"".join(encode_bytes_field(1, t) for t in meta_tensors) + versions
    path = tmp_path / "v1.ckpt"
    path.write_bytes(table_bytes([contents([(b"", encode_bytes_field(1, meta))] + sorted(records))]))
    return path


def v1_meta(name: bytes, shape: tuple[int, ...], *slices: bytes, dtype: int = FLOAT) -> bytes:
    return encode_bytes_field(1, name) + encode_bytes_field(2, encode_shape(shape)) + encode_varint_field(3, dtype) \
        + b"".join(encode_bytes_field(4, s) for s in slices)


def v1_record(name: bytes, extents: tuple[tuple[int, int], ...], values: np.ndarray) -> tuple[bytes, bytes]:
    proto = encode_bytes_field(5, values.astype("<f4").tobytes()) if values.size else b""
    saved = encode_bytes_field(1, name) + encode_bytes_field(2, slice_proto(*extents)) + encode_bytes_field(3, proto)
    return tensor_slice_key(name, extents), encode_bytes_field(2, saved)


def test_v1_good_hand_built_file_reads(tmp_path: Path) -> None:
    path = v1_file(tmp_path, [v1_meta(b"w", (2,), slice_proto((0, 2)))], [v1_record(b"w", ((0, 2),), np.ones(2))])
    assert read_all(path)["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("case,match", [
    ("shape_bigger_than_data", "needs"),
    ("missing_record", "missing"),
    ("huge_shape_two_slices", "too little data|hold"),
    ("duplicate_meta", "listed twice"),
    ("newer_version", "newer"),
    ("record_without_data", "no tensor data"),
])
def test_lying_v1_files(tmp_path: Path, case: str, match: str) -> None:
    ones = np.ones(2)
    if case == "shape_bigger_than_data":
        path = v1_file(tmp_path, [v1_meta(b"w", (3,), slice_proto((0, 3)))], [v1_record(b"w", ((0, 3),), ones)])
    elif case == "missing_record":
        path = v1_file(tmp_path, [v1_meta(b"w", (2,), slice_proto((0, 2)))], [])
    elif case == "huge_shape_two_slices":
        meta = v1_meta(b"w", (1 << 40,), slice_proto((0, 1 << 39)), slice_proto((1 << 39, 1 << 39)))
        path = v1_file(tmp_path, [meta], [v1_record(b"w", ((0, 1 << 39),), ones),
                                          v1_record(b"w", ((1 << 39, 1 << 39),), ones)])
    elif case == "duplicate_meta":
        meta = v1_meta(b"w", (2,), slice_proto((0, 2)))
        path = v1_file(tmp_path, [meta, meta], [v1_record(b"w", ((0, 2),), ones)])
    elif case == "newer_version":
        path = v1_file(tmp_path, [v1_meta(b"w", (2,), slice_proto((0, 2)))], [v1_record(b"w", ((0, 2),), ones)],
                       versions=encode_bytes_field(2, encode_varint_field(1, 5) + encode_varint_field(2, 3)))
    else:
        path = v1_file(tmp_path, [v1_meta(b"w", (2,), slice_proto((0, 2)))], [(b"\x00w", encode_bytes_field(5, b"x"))])
    fails(path, match)


def test_v2_index_passed_as_a_v1_file_and_back(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "dtypes_v2" / "model.ckpt.index", tmp_path / "renamed.ckpt")
    fails(tmp_path / "renamed.ckpt", "not a V1 checkpoint")
    shutil.copy(FIXTURES / "dtypes_v1.ckpt", tmp_path / "v1.ckpt.index")
    fails(tmp_path / "v1.ckpt", "is a V1 checkpoint table, not a V2 index")


# ---------------------------------------------------------------------------------------------
# safetensors / numpy / torch
# ---------------------------------------------------------------------------------------------
def safetensors_bytes(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    import json

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


@pytest.mark.parametrize("content,match", [
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40),
     "more than the file"),
    (safetensors_bytes(b"{not json" + b" " * 8), "not valid JSON"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, b"\0" * 8), "do not fit"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "do not fit"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [0, 10 ** 30], "data_offsets": [0, 0]}}), "malformed"),
    (safetensors_bytes({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "X9"),
    (safetensors_bytes({"w": {"dtype": "F32"}}, b"\0" * 8), "malformed"),
    (safetensors_bytes([1, 2]), "not a JSON object"),
])
def test_hostile_safetensors(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "w.safetensors").write_bytes(content)
    fails(tmp_path / "w.safetensors", match)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/slimtune_pwned_by_npy",))


def npy_with_pickle(path: Path, body: bytes) -> None:
    header = np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object))
    with open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(body)


def test_npy_pickle_cannot_run_code(tmp_path: Path) -> None:
    marker = Path("/tmp/slimtune_pwned_by_npy")
    marker.unlink(missing_ok=True)
    npy_with_pickle(tmp_path / "evil.npy", pickle.dumps({"w": _Exploit()}, protocol=2))
    fails(tmp_path / "evil.npy", "refusing to unpickle posix.system|refusing to unpickle os.system")
    npy_with_pickle(tmp_path / "evil2.npy", pickle.dumps({"w": np.ones(2), "f": print}, protocol=4))
    fails(tmp_path / "evil2.npy", "refusing to unpickle builtins.print")
    assert not marker.exists()


def test_npy_hostile_and_wrong_content(tmp_path: Path) -> None:
    # A BINBYTES opcode claiming 4 GiB: the bounded reader hands out what exists, then it fails.
    npy_with_pickle(tmp_path / "lying.npy", b"\x80\x03B" + struct.pack("<I", 0xFFFFFFF0) + b"abc")
    fails(tmp_path / "lying.npy", "corrupt pickled dict")
    np.save(tmp_path / "plain.npy", np.ones(3))
    fails(tmp_path / "plain.npy", "must hold a dict")
    np.save(tmp_path / "list.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    fails(tmp_path / "list.npy", "must hold a dict")
    np.save(tmp_path / "objects.npy", {"w": np.array([None, 1], dtype=object)}, allow_pickle=True)
    fails(tmp_path / "objects.npy", "not all strings")
    np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
    fails(tmp_path / "objects.npz", "pickled object array")
    good = (tmp_path / "good.npz")
    np.savez(good, w=np.ones(100))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:300])
    fails(tmp_path / "cut.npz")


def test_garbage_torch_files(tmp_path: Path) -> None:
    import torch   # imported before timing: the first import alone can take seconds

    (tmp_path / "w.pt").write_bytes(b"\x80\x02garbage that is not a pickle stream at all")
    fails(tmp_path / "w.pt", "refused")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    fails(tmp_path / "list.pt", "not a state_dict")


# ---------------------------------------------------------------------------------------------
# Fuzz: random damage to real fixtures never escapes as anything but CheckpointError
# ---------------------------------------------------------------------------------------------
FUZZ_TARGETS = {
    "v1": ("dtypes_v1.ckpt", ["dtypes_v1.ckpt"]),
    "v1_snappy": ("snappy_v1.ckpt", ["snappy_v1.ckpt"]),
    "v2_index": ("dtypes_v2/model.ckpt", ["dtypes_v2/model.ckpt.index", "dtypes_v2/model.ckpt.data-00000-of-00001"]),
    "v2_partitioned": ("partitioned_v2/model.ckpt", ["partitioned_v2/model.ckpt.index",
                                                     "partitioned_v2/model.ckpt.data-00000-of-00001"]),
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:                                   # flip a few bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:                                 # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 2:                                 # overwrite a run with random bytes
        start = rng.randrange(len(data))
        for i in range(start, min(len(data), start + rng.randint(1, 16))):
            data[i] = rng.randrange(256)
    elif kind == 3:                                 # set a byte to an extreme
        data[rng.randrange(len(data))] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    else:                                           # insert junk
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


@pytest.mark.parametrize("target", sorted(FUZZ_TARGETS))
def test_fuzzed_fixtures_fail_cleanly_or_read_correctly(tmp_path: Path, target: str) -> None:
    path, files = FUZZ_TARGETS[target]
    truth = read_all(FIXTURES / path)
    rng = random.Random(f"fuzz-{target}")
    outcomes = {"error": 0, "correct": 0}
    for iteration in range(100):
        work = tmp_path / f"it{iteration}"
        for file in files:
            (work / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(FIXTURES / file, work / file)
        victim = work / rng.choice(files)
        victim.write_bytes(mutate(victim.read_bytes(), rng))
        try:
            got = read_all(work / path)
        except CheckpointError:
            outcomes["error"] += 1
        else:
            assert sorted(got) == sorted(truth), f"iteration {iteration}: wrong names"
            for name, value in truth.items():
                assert got[name].shape == value.shape and got[name].dtype == value.dtype, (iteration, name)
                assert list(got[name].reshape(-1)) == list(value.reshape(-1)) or np.array_equal(
                    got[name], value, equal_nan=value.dtype.kind in "fc"), (iteration, name)
            outcomes["correct"] += 1
        shutil.rmtree(work)
    assert outcomes["error"] > 50, outcomes   # the damage is real, and is detected


def test_npz_member_claiming_a_huge_shape(tmp_path: Path) -> None:
    import zipfile

    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)}
    buffer = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("w.npy", buffer.getvalue() + b"\0" * 16)
    fails(tmp_path / "huge.npz", "declares more data")


def test_npy_pickle_reconstruct_with_a_huge_shape(tmp_path: Path) -> None:
    body = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01"
            b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85q\x02c_codecs\nencode\nq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00"
            b"\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\x09.")
    npy_with_pickle(tmp_path / "huge.npy", body)
    fails(tmp_path / "huge.npy", "no data")


def test_prefix_compression_cannot_blow_up_keys(tmp_path: Path) -> None:
    # Each entry reuses the whole previous key and adds one byte: keys grow without bound.
    block = encode_varint(0) + encode_varint(0) + encode_varint(len(V2_HEADER)) + V2_HEADER
    block += encode_varint(0) + encode_varint(1) + encode_varint(0) + b"a"
    for length in range(1, 70_000):
        block += encode_varint(length) + encode_varint(1) + encode_varint(0) + b"b"
    Path(tmp_path / "m.index").write_bytes(table_bytes([block + b"\x00\x00\x00\x00"]))
    fails(tmp_path / "m", "key of 65537 bytes|keys expand to far more bytes")
