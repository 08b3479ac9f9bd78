"""CSV and JSON-lines manifests: label forms, class names, errors naming file and line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from slimtune.data.decode import decode_image
from slimtune.data.manifest import ManifestSource
from slimtune.errors import DataError


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Four small real photos under tmp_path/img."""
    folder = tmp_path / "img"
    folder.mkdir()
    for name, photo in (("cat.jpg", skimage.data.chelsea()), ("cup.jpg", skimage.data.coffee()),
                        ("person.jpg", skimage.data.astronaut()), ("rocket.jpg", skimage.data.rocket())):
        image = Image.fromarray(photo)
        image.thumbnail((32, 32))
        image.save(folder / name, quality=85)
    return tmp_path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_header_and_names(photos):
    manifest = _write(photos / "data.csv", "path,label\nimg/cat.jpg,cat\nimg/cup.jpg,cup\nimg/person.jpg,person\n")
    source = ManifestSource(manifest)
    assert not source.multi_label and source.class_names == ["cat", "cup", "person"]
    assert source.targets() == [0, 1, 2] and len(source) == 3
    path, label = source.read(2)
    assert path == photos / "img" / "person.jpg" and label == 2
    assert decode_image(path).shape[2] == 3
    assert source.describe(1).endswith("(data.csv:3)")


def test_headerless_indices_with_labels_file(photos):
    _write(photos / "labels.txt", "0:cat\n1:cup\n2:person\n3:rocket\n")
    manifest = _write(photos / "list.csv", "img/cat.jpg,0\n\n# a comment\nimg/rocket.jpg,3\nimg/cup.jpg,cup\n")
    source = ManifestSource(manifest)
    assert source.class_names == ["cat", "cup", "person", "rocket"]
    assert source.targets() == [0, 3, 1]


def test_index_beyond_num_classes_names_file_and_line(photos):
    _write(photos / "labels.txt", "0:cat\n1:cup\n")
    manifest = _write(photos / "list.csv", "path,label\nimg/cat.jpg,0\nimg/cup.jpg,2\n")
    with pytest.raises(DataError, match=r"list.csv:3: label index 2 is outside \[0, 2\)"):
        ManifestSource(manifest)
    manifest = _write(photos / "list.csv", "path,label\nimg/cat.jpg,dog\n")
    with pytest.raises(DataError, match=r"list.csv:2: unknown class 'dog'"):
        ManifestSource(manifest)
    manifest = _write(photos / "other.csv", "img/cat.jpg,4\n")
    with pytest.raises(DataError, match=r"other.csv:1: label index 4"):
        ManifestSource(manifest)


def test_indices_without_labels_file_count_up_to_the_largest(photos):
    source = ManifestSource(_write(photos / "list.csv", "img/cat.jpg,0\nimg/cup.jpg,4\n"))
    assert source.class_names == ["0", "1", "2", "3", "4"] and source.targets() == [0, 4]
    source = ManifestSource(photos / "list.csv", num_classes=7)
    assert source.num_classes == 7


def test_mixed_names_and_indices_need_a_labels_file(photos):
    manifest = _write(photos / "list.csv", "img/cat.jpg,cat\nimg/cup.jpg,1\n")
    with pytest.raises(DataError, match=r"list.csv:2: labels mix class names and indices"):
        ManifestSource(manifest)


def test_multi_label_csv_cells_and_columns(photos):
    manifest = _write(photos / "multi.csv",
                      "path,labels\nimg/cat.jpg,cat;person\nimg/cup.jpg,cup\nimg/rocket.jpg,\n")
    source = ManifestSource(manifest)
    assert source.multi_label and source.class_names == ["cat", "cup", "person"]
    np.testing.assert_array_equal(np.stack(source.targets()), [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    headerless = ManifestSource(_write(photos / "cols.csv", "img/cat.jpg,cat,person\nimg/cup.jpg,cup|cat\n"))
    assert headerless.multi_label
    np.testing.assert_array_equal(np.stack(headerless.targets()), [[1, 0, 1], [1, 1, 0]])


def test_single_label_manifest_rejects_lines_without_one_label(photos):
    manifest = _write(photos / "one.csv", "path,label\nimg/cat.jpg,cat\nimg/cup.jpg,\n")
    with pytest.raises(DataError, match=r"one.csv:3: no label, but this manifest is single-label"):
        ManifestSource(manifest, multi_label=False)
    several = _write(photos / "two.csv", "path,label\nimg/cat.jpg,cat\nimg/cup.jpg,cup;cat\n")
    with pytest.raises(DataError, match=r"two.csv:3: expected one label, found 2"):
        ManifestSource(several, multi_label=False)


def test_one_empty_label_cell_does_not_make_the_dataset_multi_label(photos):
    """A forgotten cell is an error naming file and line, not a silent switch to multi-label."""
    manifest = _write(photos / "one.csv", "path,label\nimg/cat.jpg,cat\nimg/cup.jpg,cup\nimg/rocket.jpg,\n")
    with pytest.raises(DataError, match=r"one.csv:4: no label, but this manifest is single-label"):
        ManifestSource(manifest)
    # The same in JSON lines (a null label) and in a headerless CSV.
    jsonl = _write(photos / "one.jsonl", '{"path": "img/cat.jpg", "label": "cat"}\n'
                                         '{"path": "img/cup.jpg", "label": null}\n')
    with pytest.raises(DataError, match=r"one.jsonl:2: no label"):
        ManifestSource(jsonl)
    with pytest.raises(DataError, match=r"bare.csv:2: no label"):
        ManifestSource(_write(photos / "bare.csv", "img/cat.jpg,cat\nimg/cup.jpg\n"))
    # Asked for on purpose, the empty cell is an image with no positive class.
    chosen = ManifestSource(manifest, multi_label=True)
    assert chosen.multi_label
    np.testing.assert_array_equal(np.stack(chosen.targets()), [[1, 0], [0, 1], [0, 0]])


def test_build_source_passes_the_task_type_to_a_manifest(photos):
    from slimtune.data import build_source

    manifest = _write(photos / "data.csv", "path,label\nimg/cat.jpg,cat\nimg/cup.jpg,cup\n")
    assert not build_source(dataset_dir=str(manifest)).multi_label
    multi = build_source(dataset_dir=str(manifest), multi_label=True)
    assert multi.multi_label
    np.testing.assert_array_equal(np.stack(multi.targets()), [[1, 0], [0, 1]])


def test_jsonl_labels_lists_and_ignore(photos):
    lines = [{"path": "img/cat.jpg", "label": "cat"},
             {"image": "img/person.jpg", "labels": ["person", "cat"], "ignore": ["cup"]},
             {"file": "img/cup.jpg", "labels": []}]
    manifest = _write(photos / "data.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    source = ManifestSource(manifest)
    assert source.multi_label and source.class_names == ["cat", "cup", "person"]
    np.testing.assert_array_equal(np.stack(source.targets()), [[1, 0, 0], [1, -1, 1], [0, 0, 0]])


def test_jsonl_single_label_indices_and_bad_lines(photos):
    _write(photos / "labels.txt", "0:cat\n1:cup\n")
    manifest = _write(photos / "data.jsonl", '{"path": "img/cup.jpg", "label": 1}\n{"path": "img/cat.jpg", "label": "cat"}\n')
    assert ManifestSource(manifest).targets() == [1, 0]
    _write(manifest, '{"path": "img/cup.jpg", "label": 1}\n{"path": "img/cat.jpg", label: 0}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        ManifestSource(manifest)
    _write(manifest, '{"label": 1}\n')
    with pytest.raises(DataError, match=r"data.jsonl:1: no image path"):
        ManifestSource(manifest)
    _write(manifest, '{"path": "img/cup.jpg", "label": 1.5}\n')
    with pytest.raises(DataError, match=r"data.jsonl:1: labels must be class names or integer"):
        ManifestSource(manifest)


def test_missing_images_are_counted_and_skipped(photos, caplog):
    manifest = _write(photos / "data.csv",
                      "path,label\nimg/cat.jpg,cat\nimg/gone.jpg,cup\nimg/cup.jpg,cup\nimg/also_gone.png,cat\n")
    with caplog.at_level(logging.WARNING, logger="slimtune.data.manifest"):
        source = ManifestSource(manifest)
    assert len(source) == 2 and source.targets() == [0, 1]
    assert [(line, path.name) for line, path in source.missing] == [(3, "gone.jpg"), (5, "also_gone.png")]
    assert "2 of 4 lines point at missing images (first: line 3" in caplog.text
    with pytest.raises(DataError, match=r"2 of 4 lines point at missing images"):
        ManifestSource(manifest, skip_missing=False)
    _write(manifest, "path,label\nimg/gone.jpg,cat\n")
    with pytest.raises(DataError, match="none of the 1 listed images exists"):
        ManifestSource(manifest)


def test_tsv_bom_absolute_paths_and_root(photos, tmp_path):
    manifest = photos / "data.tsv"
    manifest.write_bytes("\ufeffpath\tclass\n".encode("utf-8") +
                         f"{photos / 'img' / 'cat.jpg'}\tcat\nrocket.jpg\tspace\n".encode("utf-8"))
    source = ManifestSource(manifest, root=photos / "img")
    assert source.class_names == ["cat", "space"]
    assert source.read(0)[0] == photos / "img" / "cat.jpg"
    assert source.read(1)[0] == photos / "img" / "rocket.jpg"


def test_given_class_names_fix_the_order(photos):
    manifest = _write(photos / "data.csv", "img/cat.jpg,cat\nimg/cup.jpg,cup\n")
    source = ManifestSource(manifest, class_names=["cup", "cat", "dog"])
    assert source.targets() == [1, 0] and source.num_classes == 3


def test_header_without_label_column(photos):
    manifest = _write(photos / "data.csv", "path,comment\nimg/cat.jpg,nice\n")
    with pytest.raises(DataError, match=r"data.csv:1: the header names no label column"):
        ManifestSource(manifest)


def test_a_folder_with_one_manifest_opens_it(photos):
    _write(photos / "data.csv", "img/cat.jpg,cat\nimg/cup.jpg,cup\n")
    assert ManifestSource(photos).manifest == photos / "data.csv"
    _write(photos / "more.jsonl", '{"path": "img/cat.jpg", "label": "cat"}\n')
    with pytest.raises(DataError, match="expected exactly one manifest.*data.csv, more.jsonl"):
        ManifestSource(photos)
