"""A seeded fuzzing campaign over every reader (issue 11, item 11).

Each case is a valid file of one format, mutated (bit flips, random bytes, truncation, insertion,
boundary integers written over length fields). Every reader must end in one of three outcomes:

- exact values: what an independent reference reads from the same bytes (the `safetensors`
  library, numpy, torch.load without mmap, Pillow, protobuf's own Example parser), or the original
  values where a checksum covers every byte (TF V1/V2 crc32c, zip CRC-32, TFRecord crc32c);
- slimtune's own error (a `SlimtuneError`, one line);
- a documented skip count (bad records / bad images counted by the training loader).

Anything else is a failure: a traceback (any other exception), a hang (a per-case timer), silent
wrong values, or memory beyond a hard cap: the cases run in a subprocess whose address space is
capped with RLIMIT_AS at its size after warm-up plus a fixed budget, so an unbounded allocation
is a MemoryError there, counted as a traceback.

Run as a script (`python tests/test_fuzz_readers.py [seed]`) it prints the figures per reader.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path


SEED = 20261203
MEMORY_BUDGET = 768 << 20          # address space a worker may add on top of its warmed-up size
CASE_TIMEOUT_S = 20                # a case still running after this is a hang
CASES = {                          # cases per reader: a few thousand in all
    "safetensors": 400, "npz": 300, "npy": 300, "pth": 160, "tf_v1": 300, "tf_v2": 300,
    "tfrecord_train": 160, "jpeg": 200, "png": 200, "manifest": 200, "labels": 200, "dataset_spec": 150,
}


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------
_BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three seeded mutations of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        position = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:                                    # flip one bit
            out[position] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:                                  # random bytes
            for i in range(position, min(len(out), position + rng.randint(1, 16))):
                out[i] = rng.randrange(256)
        elif kind == 2:                                          # truncate
            del out[position:]
        elif kind == 3:                                          # insert
            out[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif kind == 4 and len(out) >= 8:                        # a boundary integer over a field
            value = rng.choice(_BOUNDARY)
            width = rng.choice((1, 2, 4, 8))
            order = rng.choice(("little", "big"))
            position = min(position, len(out) - width)
            out[position:position + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)
        elif kind == 5 and out:                                  # duplicate a chunk
            end = min(len(out), position + rng.randint(1, 64))
            out[end:end] = out[position:end]
        elif kind == 6 and out:                                  # delete a chunk
            del out[position:position + rng.randint(1, 16)]
    return bytes(out)


def mutate_text(text: str, rng: random.Random) -> bytes:
    """Text-level mutations for line formats (plus, sometimes, byte-level ones)."""
    pieces = ["\"", ",", "\n", ":", "-", "--1", "\u00b2", "999999999999", "\t", "\xff", "{", "}", "[",
              "x" * 140_000, "inf", "nan", "-5", "../", "/etc/", "\x00", ";", "|", "1e400", "#"]
    out = text
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(out) + 1)
        if rng.random() < 0.6:
            out = out[:position] + rng.choice(pieces) + out[position:]
        else:
            out = out[:position] + out[position + rng.randint(1, 8):]
    data = out.encode("utf-8", "surrogateescape")
    return mutate(data, rng) if rng.random() < 0.2 else data


# ---------------------------------------------------------------------------------------------
# The worker: runs in a subprocess under RLIMIT_AS
# ---------------------------------------------------------------------------------------------
class _Hang(BaseException):
    pass


def _example_class():
    """tf.train.Example built from its .proto definition with protobuf: an independent parser."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="fuzz_example.proto", package="fuzz", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto

    def add_fields(msg, fields):
        for number, (name, kind, label, type_name, packed) in enumerate(fields, start=1):
            field = msg.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
            if packed:
                field.options.packed = True

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    add_fields(proto.message_type.add(name="BytesList"), [("value", F.TYPE_BYTES, rep, "", False)])
    add_fields(proto.message_type.add(name="FloatList"), [("value", F.TYPE_FLOAT, rep, "", True)])
    add_fields(proto.message_type.add(name="Int64List"), [("value", F.TYPE_INT64, rep, "", True)])
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
            (("bytes_list", ".fuzz.BytesList"), ("float_list", ".fuzz.FloatList"), ("int64_list", ".fuzz.Int64List")),
            start=1):
        field = feature.field.add(name=name, number=number, type=F.TYPE_MESSAGE, label=opt, type_name=type_name)
        field.oneof_index = 0
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".fuzz.Feature")
    features.field.add(name="feature", number=1, type=F.TYPE_MESSAGE, label=rep,
                       type_name=".fuzz.Features.FeatureEntry")
    example = proto.message_type.add(name="Example")
    example.field.add(name="features", number=1, type=F.TYPE_MESSAGE, label=opt, type_name=".fuzz.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fuzz.Example"))


def _equal(got: dict, expected: dict) -> bool:
    import numpy as np

    if sorted(got) != sorted(expected):
        return False
    for name, value in expected.items():
        a, b = np.asarray(got[name]), np.asarray(value)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not np.array_equal(a.view(np.uint8) if a.dtype.kind in "fc" and a.size else a,
                              b.view(np.uint8) if b.dtype.kind in "fc" and b.size else b):
            return False
    return True


def _read_all(path: Path) -> dict:
    from slimtune.checkpoint import read_checkpoint

    with read_checkpoint(path) as reader:
        return {name: reader[name] for name in reader}


class Campaign:
    """Builds each reader's seed file, mutates it and classifies every outcome."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.stats: dict[str, dict] = {}
        self.current: Path | None = None

    # -- seed files ---------------------------------------------------------------------------
    def seeds(self) -> dict:
        import numpy as np
        import torch
        from PIL import Image
        from safetensors.numpy import save_file

        from slimtune.checkpoint import write_tf_checkpoint

        rng = np.random.default_rng(self.seed)
        tensors = {"conv/weights": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
                   "conv/biases": rng.standard_normal(4).astype(np.float32),
                   "fc/weights": rng.standard_normal((4, 5)).astype(np.float64),
                   "step": np.array(7, dtype=np.int64)}
        base = self.root / "seed"
        base.mkdir()
        save_file(tensors, base / "w.safetensors")
        np.savez(base / "w.npz", **{k.replace("/", "_"): v for k, v in tensors.items()})
        np.save(base / "w.npy", {"net": tensors}, allow_pickle=True)
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, base / "w.pth")
        write_tf_checkpoint(base / "w.ckpt", tensors, version=1)
        write_tf_checkpoint(base / "v2" / "model.ckpt", tensors, version=2)
        photo = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        photo[8:16] = 200
        for fmt in ("JPEG", "PNG"):
            Image.fromarray(photo).save(base / f"p.{fmt.lower()}", format=fmt)
        return {"tensors": tensors, "base": base}

    # -- outcome bookkeeping -------------------------------------------------------------------
    def record(self, reader: str, outcome: str, detail: str = "", size: int = 0) -> None:
        stats = self.stats.setdefault(reader, {"cases": 0, "exact": 0, "clean_errors": 0, "skips": 0,
                                               "tracebacks": 0, "hangs": 0, "wrong": 0, "examples": [],
                                               "max_file_bytes": 0})
        stats["cases"] += 1
        stats[outcome] += 1
        stats["max_file_bytes"] = max(stats["max_file_bytes"], size)
        if outcome in ("tracebacks", "hangs", "wrong") and len(stats["examples"]) < 5:
            stats["examples"].append(detail[:300])
            keep = os.environ.get("SLIMTUNE_FUZZ_KEEP")   # a folder to keep failing cases in
            if keep and self.current is not None and self.current.is_file():
                Path(keep).mkdir(parents=True, exist_ok=True)
                (Path(keep) / self.current.name).write_bytes(self.current.read_bytes())

    def run_case(self, reader: str, check, data: bytes, path: Path) -> None:
        import signal

        from slimtune.errors import SlimtuneError

        path.write_bytes(data)
        self.current = path

        def alarm(*_):
            raise _Hang()

        rss_before = _peak_rss()
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
        try:
            outcome = check(path)
            signal.setitimer(signal.ITIMER_REAL, 0)
            if outcome is True:
                self.record(reader, "exact", size=len(data))
            elif outcome == "skip":
                self.record(reader, "skips", size=len(data))
            else:
                self.record(reader, "wrong", f"{path.name}: {outcome}", len(data))
        except _Hang:
            self.record(reader, "hangs", path.name, len(data))
        except SlimtuneError as error:
            signal.setitimer(signal.ITIMER_REAL, 0)
            message = str(error)
            self.record(reader, "clean_errors" if "\n" not in message else "tracebacks",
                        f"multi-line error: {message[:200]!r}", len(data))
        except BaseException as error:   # noqa: BLE001 - any other exception is what we count
            signal.setitimer(signal.ITIMER_REAL, 0)
            if isinstance(error, KeyboardInterrupt):
                raise
            import traceback

            where = traceback.extract_tb(error.__traceback__)[-1]
            self.record(reader, "tracebacks", f"{path.name}: {type(error).__name__}: {str(error)[:200]} "
                        f"(at {Path(where.filename).name}:{where.lineno})", len(data))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            # ru_maxrss only grows: a case that raises the peak shows by how much (0 for most).
            growth = _peak_rss() - rss_before
            stats = self.stats[reader]
            if growth > stats.get("peak_rss_step_bytes", 0):
                stats["peak_rss_step_bytes"], stats["peak_rss_step_case"] = growth, f"{path.name} ({len(data)} bytes)"

    # -- per-reader oracles --------------------------------------------------------------------
    def campaign(self) -> dict:
        import numpy as np

        seeds = self.seeds()
        tensors, base = seeds["tensors"], seeds["base"]
        rng = random.Random(self.seed)
        work = self.root / "cases"
        work.mkdir()

        def checksummed(original: dict):
            # Every byte is covered by a checksum: accepted means the original values exactly.
            return lambda path: True if _equal(_read_all(path), original) else "values differ from the original"

        def safetensors_check(path: Path):
            from safetensors.numpy import load_file

            got = _read_all(path)
            try:
                reference = load_file(path)
            except Exception as error:   # noqa: BLE001
                return f"accepted a file the safetensors library refuses ({error})"
            return True if _equal(got, reference) else "values differ from the safetensors library's"

        def npz_check(path: Path):
            got = _read_all(path)
            with np.load(path, allow_pickle=False) as archive:
                reference = {name: archive[name] for name in archive.files}
            return True if _equal(got, reference) else "values differ from numpy's"

        def npy_check(path: Path):
            got = _read_all(path)
            reference = {}
            try:
                obj = np.load(path, allow_pickle=True)   # the reference reader, on accepted files only
            except Exception:   # noqa: BLE001 - numpy refuses what we read: then it must be the original
                original = {f"net/{name}": value for name, value in tensors.items()}
                return True if _equal(got, original) else "numpy refuses a file we read differently from the original"
            obj = obj.item() if isinstance(obj, np.ndarray) else obj

            def flatten(prefix, value):
                if isinstance(value, dict):
                    for key, item in value.items():
                        flatten(f"{prefix}/{key}" if prefix else str(key), item)
                else:
                    reference[prefix] = np.asarray(value)
            flatten("", obj)
            return True if _equal(got, reference) else "values differ from numpy's unpickling"

        def pth_check(path: Path):
            import torch

            got = _read_all(path)
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)   # no mmap: torch's own checks
            except Exception as error:   # noqa: BLE001
                return f"accepted a file torch.load refuses ({str(error)[:100]})"
            reference = {k: v.numpy() for k, v in loaded.items()}
            return True if _equal(got, reference) else "values differ from torch.load's"

        plans = [
            ("safetensors", base / "w.safetensors", safetensors_check, ".safetensors"),
            ("npz", base / "w.npz", npz_check, ".npz"),
            ("npy", base / "w.npy", npy_check, ".npy"),
            ("pth", base / "w.pth", pth_check, ".pth"),
            ("tf_v1", base / "w.ckpt", checksummed(tensors), ".ckpt"),
        ]
        for reader, seed_file, check, suffix in plans:
            data = seed_file.read_bytes()
            self.run_case(reader, check, data, work / f"{reader}-original{suffix}")   # the unmutated file
            for case in range(CASES[reader] - 1):
                self.run_case(reader, check, mutate(data, rng), work / f"{reader}-{case}{suffix}")

        # TF V2: mutate the index or the data file of a prefix.
        index = (base / "v2" / "model.ckpt.index").read_bytes()
        shard = (base / "v2" / "model.ckpt.data-00000-of-00001").read_bytes()
        for case in range(CASES["tf_v2"]):
            folder = work / f"v2-{case}"
            folder.mkdir()
            which = rng.random() < 0.5
            (folder / "model.ckpt.data-00000-of-00001").write_bytes(shard if which else mutate(shard, rng))
            self.run_case("tf_v2", lambda p: checksummed(tensors)(folder / "model.ckpt"),
                          mutate(index, rng) if which else index, folder / "model.ckpt.index")

        self.images(base, work, rng)
        self.tfrecords(base, work, rng)
        self.text_formats(work, rng)
        return self.stats

    def images(self, base: Path, work: Path, rng: random.Random) -> None:
        import numpy as np
        from PIL import Image

        from slimtune.data.decode import decode_tensor

        def check(path: Path):
            got = decode_tensor(path).permute(1, 2, 0).numpy()
            try:
                with Image.open(path) as image:
                    reference = np.asarray(image.convert("RGB"))
            except Exception as error:   # noqa: BLE001
                return f"decoded an image Pillow refuses ({str(error)[:100]})"
            return True if np.array_equal(got, reference) else "pixels differ from Pillow's"

        for kind in ("jpeg", "png"):
            data = (base / f"p.{kind}").read_bytes()
            for case in range(CASES[kind]):
                self.run_case(kind, check, data if case == 0 else mutate(data, rng), work / f"{kind}-{case}.{kind}")

    def tfrecords(self, base: Path, work: Path, rng: random.Random) -> None:
        import numpy as np
        import torch
        from PIL import Image

        from slimtune.data.loader import build_loader
        from slimtune.data.slim_datasets import TFRecordSource
        from slimtune.data.tfrecord import encode_example
        from slimtune.utils.crc import masked_crc32c

        Example = _example_class()
        photos = []
        for index in range(4):
            buffer = io.BytesIO()
            Image.new("RGB", (6 + index, 5), (40 * index, 90, 200)).save(buffer, format="PNG")
            photos.append(buffer.getvalue())
        examples = [encode_example({"image/encoded": photo, "image/format": b"png", "image/class/label": index % 3,
                                    "image/height": 5, "image/width": 6 + index})
                    for index, photo in enumerate(photos)]

        def frame(payload: bytes) -> bytes:
            length = struct.pack("<Q", len(payload))
            return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))

        def transform(image, height, width):
            return torch.nn.functional.interpolate(image[None].float(), size=(height, width))[0]

        def check_with(payloads):
            def check(path: Path):
                source = TFRecordSource([path], ["a", "b", "c"], len(payloads), name="fuzz")
                loader = build_loader(source, transform, (4, 4), batch_size=1, training=False)
                good, bad = {}, 0
                for batch in loader:
                    bad += len(batch.bad)
                    for position in range(len(batch.targets)):
                        good[int(batch.indices[position])] = (batch.images[position], int(batch.targets[position]))
                keys = {zlib.crc32(f"{path}:record {i}".encode()): i for i in range(len(payloads))}
                for key, (image, target) in good.items():
                    record = keys.get(key)
                    if record is None:
                        return "a sample from no record"
                    example = Example()
                    example.ParseFromString(payloads[record])     # protobuf's own parser
                    feature = example.features.feature
                    label = feature["image/class/label"].int64_list.value[0]
                    with Image.open(io.BytesIO(feature["image/encoded"].bytes_list.value[0])) as reference:
                        pixels = torch.from_numpy(np.asarray(reference.convert("RGB")).copy()).permute(2, 0, 1)
                    if label != target or not torch.equal(transform(pixels, 4, 4), image):
                        return f"record {record}: target or pixels differ from protobuf + Pillow's"
                if len(good) + bad != len(payloads):
                    return f"{len(good)} good + {bad} skipped of {len(payloads)} records"
                return True if bad == 0 else "skip"
            return check

        for case in range(CASES["tfrecord_train"]):
            if case % 2:   # the framing mutated: crc32c catches it or the stream still reads whole
                payloads = list(examples)
                data = mutate(b"".join(frame(p) for p in payloads), rng)
            else:          # an Example mutated inside a valid frame: only the parser stands guard
                payloads = [mutate(p, rng) if rng.random() < 0.5 else p for p in examples]
                data = b"".join(frame(p) for p in payloads)
            self.run_case("tfrecord_train", check_with(payloads), data, work / f"shard-{case}.tfrecord")

    def text_formats(self, work: Path, rng: random.Random) -> None:
        from PIL import Image

        from slimtune.data.labels import labels_to_names, read_labels_file
        from slimtune.data.manifest import ManifestSource
        from slimtune.data.slim_datasets import read_dataset_spec

        images = work / "images"
        images.mkdir()
        for index in range(3):
            Image.new("RGB", (4, 4), (index, 0, 0)).save(images / f"{index}.png")
        manifest = "path,label\n0.png,0\n1.png,1\n2.png,2\n"
        expected_targets = [0, 1, 2]

        def manifest_check(path: Path):
            import numpy as np

            source = ManifestSource(path)
            targets = source.targets()
            count = len(source.class_names)
            # Accepted: one target per listed image, each within the class list.
            if len(targets) != len(source.paths):
                return "targets and images differ in number"
            if source.multi_label:
                if any(np.asarray(t).shape != (count,) or not np.isin(t, (-1.0, 0.0, 1.0)).all() for t in targets):
                    return "multi-label target of the wrong length or values"
            elif any(not 0 <= t < count for t in targets):
                return "targets outside the class list"
            if path.read_bytes() == manifest.encode() and (source.multi_label or targets != expected_targets):
                return "the unmutated manifest read differently"
            return True

        labels_text = "0:cat\n1:dog\n2:bird\n"

        def labels_check(path: Path):
            names = labels_to_names(read_labels_file(path))
            if path.read_bytes() == labels_text.encode() and names != ["cat", "dog", "bird"]:
                return "the unmutated labels read differently"
            return True if len(names) <= len(path.read_bytes().splitlines()) else "more classes than lines"

        spec_text = json.dumps({"format": "slimtune-dataset-spec", "version": 1, "name": "mine",
                                "file_pattern": "%s-*", "splits": {"train": 3}, "num_classes": 3})

        def spec_check(path: Path):
            spec = read_dataset_spec(path.parent)
            if spec is None:
                return "no spec read from an existing file"
            if spec.num_classes < 1 or any(size < 0 for size in spec.splits.values()):
                return "impossible sizes accepted"
            return True

        for case in range(CASES["manifest"]):
            data = manifest.encode() if case == 0 else mutate_text(manifest, rng)
            self.run_case("manifest", manifest_check, data, images / f"m{case}.csv")
        for case in range(CASES["labels"]):
            data = labels_text.encode() if case == 0 else mutate_text(labels_text, rng)
            self.run_case("labels", labels_check, data, work / f"labels{case}.txt")
        for case in range(CASES["dataset_spec"]):
            folder = work / f"spec{case}"
            folder.mkdir()
            data = spec_text.encode() if case == 0 else mutate_text(spec_text, rng)
            self.run_case("dataset_spec", spec_check, data, folder / "slimtune_dataset.json")


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: after exec it still holds the
    peak of the parent that forked us (pytest, with torch loaded)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(root: Path, seed: int) -> dict:
    """Warm every reader up, cap the address space, run the campaign; return the figures."""
    import logging
    import resource
    import warnings

    import numpy as np  # noqa: F401 - imported before the cap
    import torch

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    warm = Campaign(root / "warm", seed)
    (root / "warm").mkdir()
    saved = dict(CASES)
    for reader in CASES:
        CASES[reader] = 2
    warm.campaign()           # imports, lazy initialisations, first decodes: outside the measurement
    CASES.update(saved)
    cap = _vm_size() + MEMORY_BUDGET
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    baseline_rss = _peak_rss()
    campaign = Campaign(root / "run", seed)
    (root / "run").mkdir()
    stats = campaign.campaign()
    peak_rss = _peak_rss()
    return {"stats": stats, "address_space_cap": cap, "memory_budget": MEMORY_BUDGET,
            "rss_growth_bytes": max(0, peak_rss - baseline_rss),
            "largest_file_bytes": max(s["max_file_bytes"] for s in stats.values())}


def run_campaign(seed: int = SEED) -> dict:
    """Run the worker in a subprocess (its own address-space cap) and return its figures."""
    with tempfile.TemporaryDirectory(prefix="slimtune-fuzz-") as root:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
            CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, __file__, "--worker", root, str(seed)], env=env,
                                capture_output=True, text=True, timeout=900)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            raise AssertionError(f"fuzz worker failed (rc {result.returncode}): {result.stderr[-3000:]}")
        return json.loads(lines[-1])


def test_fuzz_every_reader_three_outcomes_only() -> None:
    figures = run_campaign()
    stats = figures["stats"]
    print(json.dumps({reader: {k: v for k, v in s.items() if k != "examples"} for reader, s in stats.items()}))
    assert set(stats) == set(CASES)
    problems = {reader: s["examples"] for reader, s in stats.items() if s["tracebacks"] or s["hangs"] or s["wrong"]}
    assert not problems, problems
    for reader, s in stats.items():
        assert s["cases"] == CASES[reader]
        assert s["exact"] >= 1, reader                   # the unmutated file reads exactly
        assert s["exact"] + s["clean_errors"] + s["skips"] == s["cases"]
    assert sum(s["clean_errors"] for s in stats.values()) > 500    # the mutations do bite
    assert stats["tfrecord_train"]["skips"] > 0                     # bad records are counted, not fatal
    assert figures["rss_growth_bytes"] < figures["memory_budget"]
    # No single case raised the peak by more than 64 MB (files are at most ~140 KB; a reader that
    # sized memory by a lying header would show here even under the address-space cap).
    assert max(s.get("peak_rss_step_bytes", 0) for s in stats.values()) < 64 << 20


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), int(sys.argv[3]))))
    else:
        seed = int(sys.argv[1]) if len(sys.argv) > 1 else SEED
        figures = run_campaign(seed)
        for reader, s in figures["stats"].items():
            print(reader, {k: v for k, v in s.items()})
        print({k: v for k, v in figures.items() if k != "stats"})
