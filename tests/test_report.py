"""Tests for slimtune.evaluate.report: files, references, valid PNGs, numbers in the HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimtune.errors import ConfigError
from slimtune.evaluate import MultiLabelAccumulator, SingleLabelAccumulator, to_jsonable, write_report

VOC_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def _png_refs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+\.png)"', html)


def _assert_valid_pngs(out: Path, names: list[str]) -> None:
    for name in names:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100
            image.verify()


def _assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html


@pytest.fixture(scope="module")
def multi_results():
    rng = np.random.default_rng(0)
    n, c = 600, len(VOC_NAMES)
    targets = (rng.random((n, c)) < 0.1).astype(int)
    targets[rng.random((n, c)) < 0.03] = -1  # VOC 'difficult'
    logits = rng.normal(size=(n, c)) + 2.5 * (targets == 1) - 1.0
    val = MultiLabelAccumulator(c, VOC_NAMES, from_logits=True)
    val.update(logits[:300], targets[:300])
    test = MultiLabelAccumulator(c, VOC_NAMES, from_logits=True)
    test.update(logits[300:], targets[300:])
    return test.compute(val.tune_thresholds(), with_curves=True)


def test_multi_label_report(tmp_path, multi_results):
    report = write_report(tmp_path / "multi", multi_results, "multi", VOC_NAMES, title="VOC2007 <test>")
    assert report == tmp_path / "multi" / "report.html"
    html = report.read_text(encoding="utf-8")
    refs = _png_refs(html)
    assert set(refs) == {"average_precision.png", "pr_curves.png"}
    _assert_valid_pngs(report.parent, refs)
    _assert_self_contained(html)
    assert f"{multi_results['mAP']:.4f}" in html
    assert f"{multi_results['mAP_voc07']:.4f}" in html
    assert f"{multi_results['OF1']:.4f}" in html
    assert "VOC2007 &lt;test&gt;" in html  # titles are escaped
    for name in VOC_NAMES:  # per-class table, with the tuned threshold of each class
        assert f"<td>{name}</td>" in html
        assert f"{multi_results['per_class'][name]['threshold']:.4f}" in html


def test_report_from_json_round_trip_and_without_curves(tmp_path, multi_results):
    loaded = json.loads(json.dumps(to_jsonable(multi_results)))
    loaded.pop("curves")
    report = write_report(tmp_path, loaded, "multi")  # class names taken from the results
    html = report.read_text(encoding="utf-8")
    assert _png_refs(html) == ["average_precision.png"]
    assert "with_curves=True" in html
    assert f"{multi_results['mAP']:.4f}" in html


def test_single_label_report_with_example_thumbnails(tmp_path):
    rng = np.random.default_rng(1)
    names = ["cat", "dog", "fox"]
    images = []
    for i in range(6):
        path = tmp_path / "images" / f"img{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(path)
        images.append(path)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    logits = np.eye(3)[[1, 0, 0, 1, 2, 1, 0, 1]]
    acc = SingleLabelAccumulator(3, names)
    acc.update(logits, labels)
    res = acc.compute()
    examples = {("cat", "dog"): [images[0]], (1, 0): [images[2], tmp_path / "missing.jpg"]}
    report = write_report(tmp_path / "single", res, "single", names, examples=examples)
    html = report.read_text(encoding="utf-8")
    refs = _png_refs(html)
    assert set(refs) == {"confusion_matrix.png", "per_class_accuracy.png"}
    _assert_valid_pngs(report.parent, refs)
    _assert_self_contained(html)
    assert f"{res['Accuracy']:.4f}" in html
    thumbs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(thumbs) == 2  # the missing file is reported, not fatal
    assert "1 example image(s) could not be read" in html
    assert "dog &rarr; predicted cat" in html


def test_many_class_confusion_shows_most_confused_subset(tmp_path):
    rng = np.random.default_rng(2)
    c, n = 60, 1200
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 3.0
    acc = SingleLabelAccumulator(c)
    acc.update(logits, labels)
    report = write_report(tmp_path, acc.compute(), "single")
    html = report.read_text(encoding="utf-8")
    assert "Showing the 30 of 60 classes with the most confusions" in html
    assert "Showing the 50 lowest of 60 classes" in html
    _assert_valid_pngs(tmp_path, _png_refs(html))


def test_report_rejects_wrong_kind_and_names(tmp_path, multi_results):
    with pytest.raises(ConfigError, match="multi"):
        write_report(tmp_path, multi_results, "single")
    with pytest.raises(ConfigError, match="kind"):
        write_report(tmp_path, multi_results, "both")
    with pytest.raises(ConfigError, match="per-class"):
        write_report(tmp_path, multi_results, "multi", ["not", "these"])


def test_report_names_the_run_and_captions_misclassified_thumbnails(tmp_path):
    """The header says which checkpoint/step/train_dir; each thumbnail shows its file and probabilities."""
    rng = np.random.default_rng(2)
    names = ["cat", "dog", "fox"]
    paths = []
    for i in range(3):
        path = tmp_path / "images" / f"photo_{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    logits = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])  # photo_0: a cat taken for a dog
    acc = SingleLabelAccumulator(3, names)
    acc.update(logits, np.array([0, 0, 2]), sample_ids=paths)
    results = acc.compute()
    results.update({"checkpoint": str(tmp_path / "run" / "model.ckpt-120.safetensors"), "step": 120,
                    "split": "validation", "model_name": "mobilenet_v1"})
    html = write_report(tmp_path / "report", results, "single", names).read_text(encoding="utf-8")
    assert "<th>Checkpoint</th><td>" + str(tmp_path / "run" / "model.ckpt-120.safetensors") in html
    assert "<th>Step</th><td>120</td>" in html and f"<th>Train dir</th><td>{tmp_path / 'run'}</td>" in html
    assert "<th>Split</th><td>validation</td>" in html
    probabilities = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert f"photo_0.jpg<br>dog {probabilities[1]:.2f} &middot; cat {probabilities[0]:.2f}" in html


def test_multi_label_table_leaves_out_classes_absent_from_the_split(tmp_path):
    names = ["person", "dog", "sofa"]
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])  # no sofa in this split
    scores = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.7, 0.6, 0.2], [0.1, 0.3, 0.6]])
    acc = MultiLabelAccumulator(3, names)
    acc.update(scores, targets)
    html = write_report(tmp_path, acc.compute(), "multi", names).read_text(encoding="utf-8")
    assert "<td>person</td>" in html and "<td>dog</td>" in html
    assert "<td>sofa</td>" not in html
    assert "No positives in this split (no AP, left out of mAP): sofa." in html
