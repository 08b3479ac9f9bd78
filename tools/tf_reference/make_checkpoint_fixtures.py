"""Write the TF checkpoint fixtures with real TensorFlow, and check TF reads slimtune's writer.

Run (developer machine, after /work/tfenv/READY exists; CI never runs this)::

    /work/tfenv/bin/python tools/tf_reference/make_checkpoint_fixtures.py [tests/fixtures/tf_checkpoints]

TensorFlow writes (graph mode, tf.compat.v1.train.Saver):
  dtypes_v1.ckpt           V1 (SaverDef.V1): every dtype TF's V1 saver accepts, scalars, empty
                           tensors, strings of odd lengths (0, 1, 127, 128 bytes, NUL and 0xFF)
  dtypes_v2/model.ckpt     V2: the same tensors plus those only V2 can hold
  partitioned_v1.ckpt      V1 with two partitioned variables (rows split 3-2-2, columns split 3-2)
  partitioned_v2/model.ckpt   the same as V2
  sharded_v2/              Saver(sharded=True), variables on two CPU devices -> two data shards
                           and a merged index, plus the `checkpoint` state file Saver writes
slimtune writes, TF reads (slimtune imports torch, which the TF venv lacks, so this file re-runs
itself under slimtune's venv for these steps):
  snappy_v1.ckpt           dtypes_v1.ckpt re-tabled with snappy-compressed blocks (small blocks so
                           several exist; LevelDB's keep-only-if-12.5%-smaller rule applies) and
                           fresh CRCs/handles; restored by TF's Saver below
  (not kept) V1 and V2 checkpoints from write_tf_checkpoint of the whole dtype set
Expected values are what TF's own Saver.restore read back from each file, stored in
expected.npz (numbers; bfloat16 widened to float32) and manifest.json (strings as hex, each
fixture's variable listing from tf.train.list_variables, and which checks passed).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLIMTUNE_PYTHON = REPO / ".venv" / "bin" / "python"
TF_NAME_TO_OURS = {"half": "float16"}
SLIMTUNE_STAGE = "--slimtune-stage"

if __name__ == "__main__" and SLIMTUNE_STAGE not in sys.argv:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    v1 = tf.compat.v1
    v1.disable_eager_execution()
    BF16 = tf.bfloat16.as_numpy_dtype


def dtype_values(seed: int = 0) -> dict[str, np.ndarray]:
    """The tensors every dtype fixture holds (deterministic, tiny)."""
    rng = np.random.default_rng(seed)
    strings = [b"", b"a", b"odd", b"x" * 127, b"y" * 128, b"\x00nul\xff", "h\u00e9llo".encode()]
    values = {
        "dtypes/float32_scalar": np.array(1.5, np.float32),
        "dtypes/float32_matrix": rng.standard_normal((3, 5)).astype(np.float32),
        "dtypes/float32_empty": np.zeros((0, 3), np.float32),
        "dtypes/float64": rng.standard_normal(4),
        "dtypes/float16": rng.standard_normal((2, 3)).astype(np.float16),
        "dtypes/bfloat16": rng.standard_normal((2, 3)).astype(BF16),
        "dtypes/int8": np.array([-128, -1, 0, 127], np.int8),
        "dtypes/int16": np.array([-32768, -2, 300, 32767], np.int16),
        "dtypes/int32": np.array([[-(2 ** 31), -1], [0, 2 ** 31 - 1]], np.int32),
        "dtypes/int64": np.array([-(2 ** 63), -1, 0, 2 ** 63 - 1], np.int64),
        "dtypes/int64_scalar": np.array(12345, np.int64),
        "dtypes/uint8": np.array([0, 1, 200, 255], np.uint8),
        "dtypes/uint16": np.array([0, 1, 40000, 65535], np.uint16),
        "dtypes/uint32": np.array([0, 1, 2 ** 32 - 1], np.uint32),
        "dtypes/uint64": np.array([0, 1, 2 ** 64 - 1], np.uint64),
        "dtypes/bool": np.array([[True, False, True], [False, False, True]]),
        "dtypes/string": np.array(strings, dtype=object),
        "dtypes/string_scalar": np.array(b"just one", dtype=object),
        "dtypes/string_empty": np.zeros((0,), dtype=object),
        "dtypes/complex64": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "dtypes/complex128": rng.standard_normal(2) + 1j * rng.standard_normal(2),
    }
    return values


def tf_dtype_of(value: np.ndarray) -> tf.DType:
    return tf.string if value.dtype == object else tf.as_dtype(value.dtype)


def zeros_like(value: np.ndarray) -> np.ndarray:
    if value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        out[...] = b""
        return out
    return np.zeros(value.shape, value.dtype)


# -- TF writing / reading -----------------------------------------------------------------------
def tf_save(values: dict[str, np.ndarray], path: Path, version: int) -> None:
    """Save plain variables with TF's Saver in the given format."""
    with tf.Graph().as_default():
        variables = {name: v1.Variable(tf.constant(value, dtype=tf_dtype_of(value)), name=name)
                     for name, value in values.items()}
        write_version = v1.train.SaverDef.V1 if version == 1 else v1.train.SaverDef.V2
        saver = v1.train.Saver(var_list=variables, write_version=write_version)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            saver.save(session, str(path), write_meta_graph=False, write_state=False)


def tf_restore(values: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Restore variables shaped like `values` (initialised to zeros) with TF's Saver; return them."""
    with tf.Graph().as_default():
        variables = {name: v1.Variable(tf.constant(zeros_like(value), dtype=tf_dtype_of(value)), name=name)
                     for name, value in values.items()}
        saver = v1.train.Saver(var_list=variables)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            saver.restore(session, path)
            return session.run(variables)


def check_same(label: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    for name, value in expected.items():
        actual = np.asarray(got[name])
        if value.dtype == object:
            actual = actual.astype(object)
        if actual.shape != value.shape or not np.array_equal(actual.view(np.uint16) if value.dtype == BF16 else actual,
                                                             value.view(np.uint16) if value.dtype == BF16 else value):
            raise SystemExit(f"{label}: TF read {name} as {actual!r}, expected {value!r}")


def v1_supported(values: dict[str, np.ndarray], workdir: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Split the tensors into those TF's V1 saver can save and restore, and the rest."""
    kept, refused = {}, []
    for name, value in values.items():
        probe = workdir / f"probe_{len(kept) + len(refused)}.ckpt"
        try:
            tf_save({name: value}, probe, 1)
            check_same("probe", {name: value}, tf_restore({name: value}, str(probe)))
            kept[name] = value
        except Exception as exc:  # TF raises many types; we only record which dtypes it refuses
            refused.append(f"{name} ({value.dtype}): {str(exc).splitlines()[0][:120]}")
    return kept, refused


def partitioned_graph(version: int, path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """Save two partitioned variables (and one plain) and return their full values."""
    rng = np.random.default_rng(seed)
    full = {
        "part/rows": rng.standard_normal((7, 4)).astype(np.float32),
        "part/cols": rng.integers(-1000, 1000, size=(3, 5)).astype(np.int64),
        "part/plain": rng.standard_normal(3).astype(np.float32),
    }
    with tf.Graph().as_default():
        rows = v1.get_variable("part/rows", shape=(7, 4), dtype=tf.float32, initializer=v1.zeros_initializer(),
                               partitioner=v1.fixed_size_partitioner(3))
        cols = v1.get_variable("part/cols", shape=(3, 5), dtype=tf.int64, initializer=v1.zeros_initializer(),
                               partitioner=v1.fixed_size_partitioner(2, axis=1))
        plain = v1.get_variable("part/plain", initializer=tf.constant(full["part/plain"]))
        assigns = []
        for partitioned in (rows, cols):
            for part in partitioned:
                info = part._save_slice_info
                region = tuple(slice(o, o + s) for o, s in zip(info.var_offset, info.var_shape))
                assigns.append(part.assign(full[info.full_name][region]))
        write_version = v1.train.SaverDef.V1 if version == 1 else v1.train.SaverDef.V2
        saver = v1.train.Saver(write_version=write_version)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            session.run(assigns)
            saver.save(session, str(path), write_meta_graph=False, write_state=False)
        assert plain is not None
    return full


def partitioned_restore(path: str) -> dict[str, np.ndarray]:
    """Read partitioned variables back through TF's Saver into same-partitioned variables."""
    with tf.Graph().as_default():
        rows = v1.get_variable("part/rows", shape=(7, 4), dtype=tf.float32, initializer=v1.zeros_initializer(),
                               partitioner=v1.fixed_size_partitioner(3))
        cols = v1.get_variable("part/cols", shape=(3, 5), dtype=tf.int64, initializer=v1.zeros_initializer(),
                               partitioner=v1.fixed_size_partitioner(2, axis=1))
        plain = v1.get_variable("part/plain", shape=(3,), initializer=v1.zeros_initializer())
        saver = v1.train.Saver()
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            saver.restore(session, path)
            return session.run({"part/rows": rows.as_tensor(), "part/cols": cols.as_tensor(), "part/plain": plain})


def sharded_v2(directory: Path, seed: int = 2) -> dict[str, np.ndarray]:
    """Saver(sharded=True) with variables on two CPU devices: two data shards, one merged index."""
    rng = np.random.default_rng(seed)
    values = {
        "shard/cpu0/weights": rng.standard_normal((4, 3)).astype(np.float32),
        "shard/cpu0/step": np.array(7, np.int64),
        "shard/cpu1/weights": rng.standard_normal((2, 2, 3)).astype(np.float32),
        "shard/cpu1/label": np.array([b"cpu", b"one"], dtype=object),
    }
    directory.mkdir(parents=True, exist_ok=True)
    config = v1.ConfigProto(device_count={"CPU": 2})
    with tf.Graph().as_default():
        variables = {}
        for name, value in values.items():
            with tf.device("/cpu:0" if "cpu0" in name else "/cpu:1"):
                variables[name] = v1.Variable(tf.constant(value, dtype=tf_dtype_of(value)), name=name)
        saver = v1.train.Saver(var_list=variables, sharded=True)
        with v1.Session(config=config) as session:
            session.run(v1.global_variables_initializer())
            saver.save(session, str(directory / "model.ckpt"), global_step=7, write_meta_graph=False)
    return values


def resnappy(source: Path, target: Path) -> int:
    """Re-table a V1 file with snappy blocks (fresh CRCs and handles); return the snappy block count."""
    from slimtune.checkpoint.tf_table import SNAPPY_COMPRESSION, TableReader, TableWriter

    table = TableReader(source)
    with open(target, "wb") as out:
        writer = TableWriter(out, block_size=256, compression=SNAPPY_COMPRESSION)
        for entry in table.entries():
            writer.add(entry.key, bytes(table.value(entry)))
        writer.finish()
    table.close()
    check = TableReader(target)
    count = sum(check.compression(i) == SNAPPY_COMPRESSION for i in range(len(check.blocks)))
    check.close()
    return count


def slimtune_stage(work: Path, out: Path) -> None:
    """Runs under slimtune's venv: the snappy re-tabling and slimtune-written checkpoints."""
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from slimtune.checkpoint import read_checkpoint, write_tf_checkpoint

    with open(work / "values.pkl", "rb") as handle:   # our own temporary file from the TF stage
        stored = pickle.load(handle)
    sets = {}
    for label, values in stored.items():
        sets[label] = {name: torch.from_numpy(bits).view(torch.bfloat16) if kind == "bfloat16" else bits
                       for name, (kind, bits) in values.items()}
    result = {"snappy_blocks": resnappy(out / "dtypes_v1.ckpt", out / "snappy_v1.ckpt")}
    for version, label in ((1, "v1"), (2, "v2")):
        path = write_tf_checkpoint(work / f"slimtune_v{version}" / "model.ckpt", sets[label], version=version)
        with read_checkpoint(path) as ours:
            assert sorted(ours) == sorted(sets[label])
        result[f"slimtune_v{version}"] = str(path)
    (work / "slimtune_stage.json").write_text(json.dumps(result))


def run_slimtune_stage(work: Path, out: Path, v1_values: dict, values: dict) -> dict:
    def portable(vals: dict) -> dict:
        return {name: ("bfloat16", v.view(np.uint16)) if v.dtype == BF16 else ("plain", v) for name, v in vals.items()}

    with open(work / "values.pkl", "wb") as handle:
        pickle.dump({"v1": portable(v1_values), "v2": portable(values)}, handle)
    subprocess.run([str(SLIMTUNE_PYTHON), __file__, SLIMTUNE_STAGE, str(work), str(out)], check=True)
    return json.loads((work / "slimtune_stage.json").read_text())


def listing(path: str) -> dict[str, dict]:
    """TF's own variable listing (names, shapes, dtypes)."""
    reader = tf.train.load_checkpoint(path)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    return {name: {"shape": list(shapes[name]), "dtype": TF_NAME_TO_OURS.get(dtypes[name].name, dtypes[name].name)}
            for name in sorted(shapes)}


def record(expected: dict, strings: dict, fixture: str, values: dict[str, np.ndarray]) -> None:
    for name, value in values.items():
        value = np.asarray(value)
        if value.dtype.kind in "OS":
            strings[f"{fixture}/{name}"] = {"shape": list(value.shape),
                                             "hex": [bytes(v).hex() for v in value.reshape(-1)]}
        elif value.dtype == BF16:
            expected[f"{fixture}/{name}"] = value.astype(np.float32)
        else:
            expected[f"{fixture}/{name}"] = value


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "fixtures" / "tf_checkpoints"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    strings: dict[str, dict] = {}
    manifest: dict = {"tensorflow": tf.__version__, "fixtures": {}, "checks": {}}
    work = Path(tempfile.mkdtemp())
    values = dtype_values()

    v1_values, refused = v1_supported(values, work)
    manifest["v1_saver_refused"] = refused
    tf_save(v1_values, out / "dtypes_v1.ckpt", 1)
    tf_save(values, out / "dtypes_v2" / "model.ckpt", 2)
    for fixture, path, vals in (("dtypes_v1", out / "dtypes_v1.ckpt", v1_values),
                                ("dtypes_v2", out / "dtypes_v2" / "model.ckpt", values)):
        read_back = tf_restore(vals, str(path))
        check_same(fixture, vals, read_back)
        record(expected, strings, fixture, read_back)
        manifest["fixtures"][fixture] = {"path": str(path.relative_to(out)), "variables": listing(str(path))}

    for version in (1, 2):
        fixture = f"partitioned_v{version}"
        path = out / ("partitioned_v1.ckpt" if version == 1 else "partitioned_v2/model.ckpt")
        full = partitioned_graph(version, path)
        read_back = partitioned_restore(str(path))
        check_same(fixture, full, read_back)
        record(expected, strings, fixture, read_back)
        manifest["fixtures"][fixture] = {"path": str(path.relative_to(out)), "variables": listing(str(path))}

    sharded = sharded_v2(out / "sharded_v2")
    prefix = out / "sharded_v2" / "model.ckpt-7"
    shards = sorted(p.name for p in (out / "sharded_v2").glob("model.ckpt-7.data-*"))
    if len(shards) != 2:
        raise SystemExit(f"expected two data shards, TF wrote {shards}")
    read_back = tf_restore(sharded, str(prefix))
    check_same("sharded_v2", sharded, read_back)
    record(expected, strings, "sharded_v2", read_back)
    manifest["fixtures"]["sharded_v2"] = {"path": str(prefix.relative_to(out)), "variables": listing(str(prefix)),
                                          "data_shards": shards}

    stage = run_slimtune_stage(work, out, v1_values, values)
    snappy_blocks = stage["snappy_blocks"]
    if snappy_blocks == 0:
        raise SystemExit("no block of the re-tabled V1 file ended up snappy-compressed")
    read_back = tf_restore(v1_values, str(out / "snappy_v1.ckpt"))
    check_same("snappy_v1 (TF reading slimtune's snappy table)", v1_values, read_back)
    record(expected, strings, "snappy_v1", read_back)
    manifest["fixtures"]["snappy_v1"] = {"path": "snappy_v1.ckpt", "variables": listing(str(out / "snappy_v1.ckpt")),
                                         "snappy_blocks": snappy_blocks}
    manifest["checks"]["tf_restores_snappy_v1"] = True

    # slimtune's writer -> TF's reader, for both formats and every dtype TF can restore from them.
    for version, vals in ((1, v1_values), (2, values)):
        path = stage[f"slimtune_v{version}"]
        check_same(f"TF reading slimtune's V{version} writer", vals, tf_restore(vals, path))
        listed = listing(path)
        if sorted(listed) != sorted(vals):
            raise SystemExit(f"TF lists {sorted(listed)} in slimtune's V{version} file")
        manifest["checks"][f"tf_restores_slimtune_v{version}_writer"] = sorted(vals)

    np.savez(out / "expected.npz", **expected)
    manifest["strings"] = strings
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(work)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total} bytes); V1 saver refused: {len(refused)} dtypes")
    for line in refused:
        print("  ", line)


if __name__ == "__main__":
    if SLIMTUNE_STAGE in sys.argv:
        slimtune_stage(Path(sys.argv[-2]), Path(sys.argv[-1]))
    else:
        main()
