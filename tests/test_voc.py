"""Pascal VOC 2007 layout, labels and error messages, on a tree built from real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from slimtune.data.base import ImageSource
from slimtune.data.decode import decode_image
from slimtune.data.voc import VOC_CLASSES, VOCSource, find_voc_root, read_annotation
from slimtune.errors import ConfigError, DataError
from voc_fixture import expected_target, fixture_images, make_voc_fixture


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> Path:
    return make_voc_fixture(tmp_path_factory.mktemp("voc"), copies=2, max_side=96)


def _copy(devkit: Path, tmp_path: Path) -> Path:
    target = tmp_path / "VOCdevkit"
    shutil.copytree(devkit, target)
    return target


def test_classes_are_the_twenty_in_standard_order():
    assert len(VOC_CLASSES) == 20
    assert VOC_CLASSES[:3] == ("aeroplane", "bicycle", "bird")
    assert VOC_CLASSES[10] == "diningtable" and VOC_CLASSES[14] == "person"
    assert VOC_CLASSES[-1] == "tvmonitor" and list(VOC_CLASSES) == sorted(VOC_CLASSES)


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_splits_and_targets_follow_the_voc_protocol(devkit, split):
    source = VOCSource(devkit, split)
    assert isinstance(source, ImageSource) and source.multi_label and source.num_classes == 20
    images = [image for image in fixture_images(2)
              if image.split == split or (split == "trainval" and image.split in ("train", "val"))]
    assert source.ids == [image.image_id for image in images]
    for index, image in enumerate(images):
        path, target = source.read(index)
        assert path == devkit / "VOC2007" / "JPEGImages" / f"{image.image_id}.jpg"
        np.testing.assert_array_equal(target, expected_target(image, list(VOC_CLASSES)))
        assert target.dtype == np.float32


def test_difficult_only_is_ignored_but_a_clear_object_wins(devkit):
    source = VOCSource(devkit, "trainval")
    column = {name: i for i, name in enumerate(VOC_CLASSES)}
    seen = set()
    for image in fixture_images(2):
        if image.image_id not in source.ids:
            continue
        target = source.read(source.ids.index(image.image_id))[1]
        seen.add(image.parts)
        if image.parts == ("coffee",):  # only a difficult table
            assert target[column["diningtable"]] == -1 and (target != 0).sum() == 1
        if image.parts == ("chelsea", "coffee"):
            assert target[column["cat"]] == 1 and target[column["diningtable"]] == -1
            assert (target != 0).sum() == 2
        if image.parts == ("motorcycle", "camera"):
            assert target[column["motorbike"]] == 1 and target[column["person"]] == 1
            assert target[column["chair"]] == -1
        if image.parts == ("astronaut", "camera"):
            # person is clear on the left and difficult on the right: still a positive.
            assert target[column["person"]] == 1 and (target != 0).sum() == 1
        if image.parts == ("rocket",):
            assert not target.any()
    assert {("coffee",), ("chelsea", "coffee"), ("motorcycle", "camera"), ("astronaut", "camera"),
            ("rocket",)} <= seen


def test_root_may_be_the_parent_the_devkit_or_voc2007(devkit):
    expected = find_voc_root(devkit)
    for root in (devkit.parent, devkit, devkit / "VOC2007"):
        assert find_voc_root(root) == expected
        assert VOCSource(root, "val").ids == VOCSource(devkit, "val").ids
    with pytest.raises(DataError, match="not a Pascal VOC 2007 tree"):
        find_voc_root(devkit / "VOC2007" / "JPEGImages")


def test_images_decode_with_the_annotated_size(devkit):
    source = VOCSource(devkit, "test")
    for index in range(len(source)):
        path, _ = source.read(index)
        annotation = source.annotation(index)
        pixels = decode_image(path)
        assert pixels.shape == (annotation.height, annotation.width, 3)
        for obj in annotation.objects:
            xmin, ymin, xmax, ymax = obj.bbox
            assert 1 <= xmin < xmax <= annotation.width and 1 <= ymin < ymax <= annotation.height


def test_class_lists_give_the_same_labels_without_annotations(devkit, tmp_path):
    copy = _copy(devkit, tmp_path)
    shutil.rmtree(copy / "VOC2007" / "Annotations")
    for split in ("train", "test"):
        np.testing.assert_array_equal(VOCSource(copy, split).target_matrix(),
                                      VOCSource(devkit, split).target_matrix())


def test_malformed_xml_names_the_file(devkit, tmp_path):
    copy = _copy(devkit, tmp_path)
    bad = copy / "VOC2007" / "Annotations" / f"{VOCSource(copy, 'train').ids[1]}.xml"
    bad.write_text(bad.read_text()[:-40])
    with pytest.raises(DataError, match=f"{bad.name}: malformed annotation XML"):
        VOCSource(copy, "train")
    with pytest.raises(DataError, match=str(bad)):
        read_annotation(bad)


def test_unknown_class_and_bad_flags_name_the_file(devkit, tmp_path):
    copy = _copy(devkit, tmp_path)
    xml = copy / "VOC2007" / "Annotations" / f"{VOCSource(copy, 'train').ids[0]}.xml"
    original = xml.read_text()
    xml.write_text(original.replace("<name>person</name>", "<name>astronaut</name>"))
    with pytest.raises(DataError, match=f"{xml.name}: unknown VOC class 'astronaut'"):
        VOCSource(copy, "train")
    xml.write_text(original.replace("<difficult>0</difficult>", "<difficult>yes</difficult>"))
    with pytest.raises(DataError, match="<difficult> must be 0 or 1"):
        VOCSource(copy, "train")


def test_missing_split_list_or_images(devkit, tmp_path):
    copy = _copy(devkit, tmp_path)
    main = copy / "VOC2007" / "ImageSets" / "Main"
    for path in main.glob("*test.txt"):
        path.unlink()
    with pytest.raises(DataError, match="test.txt not found.*VOCtest"):
        VOCSource(copy, "test")
    with pytest.raises(ConfigError, match="no split 'validation'"):
        VOCSource(copy, "validation")
    first = VOCSource(copy, "train").ids[0]
    (copy / "VOC2007" / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(DataError, match=f"1 of the .* missing .*first: {first}.jpg"):
        VOCSource(copy, "train")


def test_reads_return_independent_targets(devkit):
    source = VOCSource(devkit, "train")
    target = source.read(0)[1]
    target[:] = 5
    assert source.read(0)[1].max() <= 1
    assert len(source.targets()) == len(source) and source.target_matrix().shape == (len(source), 20)
