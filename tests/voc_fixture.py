"""Build a small Pascal VOC 2007 tree from real photos, with hand-written annotations.

The photos are scikit-image's sample images (bundled with the package, nothing is downloaded).
Boxes were drawn by hand on the originals; some objects are marked difficult so that the 1 / 0 / -1
target convention is exercised, and side-by-side composites give genuinely multi-label images.

    from voc_fixture import make_voc_fixture
    devkit = make_voc_fixture(tmp_path)            # tmp_path/VOCdevkit/VOC2007/...
    source = VOCSource(devkit, split="train")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Each base photo: the skimage.data loader name and its objects as (class, (xmin, ymin, xmax, ymax)
# in original pixels, difficult).
BASE_PHOTOS: dict[str, tuple[str, list[tuple[str, tuple[int, int, int, int], bool]]]] = {
    "astronaut": ("astronaut", [("person", (0, 10, 365, 511), False)]),
    "chelsea": ("chelsea", [("cat", (0, 0, 450, 299), False)]),
    # Only the table's edge shows around the cup: the kind of object VOC marks difficult.
    "coffee": ("coffee", [("diningtable", (0, 0, 599, 399), True)]),
    "rocket": ("rocket", []),  # a launch pad: none of the 20 VOC classes
    "motorcycle": ("motorcycle", [("motorbike", (88, 120, 685, 455), False),
                                  ("chair", (11, 66, 165, 242), True)]),
    "camera": ("camera", [("person", (0, 50, 290, 511), False)]),  # grayscale photo
}

# Side-by-side composites: (left, right, right part's objects forced difficult).
COMPOSITES: list[tuple[str, str, bool]] = [
    ("astronaut", "chelsea", False),     # person + cat
    ("motorcycle", "camera", False),     # motorbike + person, chair difficult
    ("chelsea", "coffee", False),        # cat, diningtable difficult only
    ("astronaut", "camera", True),       # person clear on the left, difficult on the right -> 1
]

SPLITS = ("train", "val", "test")


@dataclass
class FixtureImage:
    """One image of the fixture: its VOC id, split, parts and objects in final pixels."""

    image_id: str
    split: str
    parts: tuple[str, ...]
    flipped: bool
    objects: list[tuple[str, tuple[int, int, int, int], bool]]


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3]


def _scaled(array: np.ndarray, scale: float) -> np.ndarray:
    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))


def _scale_box(box, scale: float, dx: float = 0.0):
    return tuple(v * scale + (dx if i % 2 == 0 else 0.0) for i, v in enumerate(box))


def _compose(parts: tuple[str, ...], right_difficult: bool, max_side: int):
    """Pixels and objects (float boxes) of one base photo or composite, longest side max_side."""
    photos = [_load_photo(BASE_PHOTOS[name][0]) for name in parts]
    if len(parts) == 1:
        pixels = photos[0]
        objects = [(c, tuple(map(float, b)), d) for c, b, d in BASE_PHOTOS[parts[0]][1]]
    else:
        height = min(photo.shape[0] for photo in photos)
        scaled, objects, offset = [], [], 0.0
        for position, (name, photo) in enumerate(zip(parts, photos)):
            scale = height / photo.shape[0]
            scaled.append(_rgb(_scaled(photo, scale)))
            for cls, box, difficult in BASE_PHOTOS[name][1]:
                forced = difficult or (right_difficult and position == 1)
                objects.append((cls, _scale_box(box, scale, offset), forced))
            offset += scaled[-1].shape[1]
        pixels = np.concatenate(scaled, axis=1)
    scale = max_side / max(pixels.shape[:2])
    pixels = _scaled(pixels, scale)
    objects = [(cls, _scale_box(box, scale), difficult) for cls, box, difficult in objects]
    return pixels, objects


def _part_objects(parts: tuple[str, ...]) -> list:
    """(class, box in original pixels of its part, difficult) for every object of the parts."""
    right_difficult = next((d for l, r, d in COMPOSITES if (l, r) == parts), False)
    return [(cls, box, difficult or (right_difficult and position == 1))
            for position, name in enumerate(parts) for cls, box, difficult in BASE_PHOTOS[name][1]]


def fixture_images(copies: int = 2) -> list[FixtureImage]:
    """The images `make_voc_fixture` writes, in id order; object boxes are in the original
    photos' pixels here (the builder replaces them with the written, scaled ones)."""
    bases = [(name,) for name in BASE_PHOTOS] + [(left, right) for left, right, _ in COMPOSITES]
    images = []
    for copy in range(copies):
        for position, parts in enumerate(bases):
            # Rotate split membership between copies, so each photo lands in several splits.
            split = ("train", "train", "val", "test")[(position + copy) % 4]
            image_id = f"{len(images) + 1:06d}"
            images.append(FixtureImage(image_id, split, parts, flipped=copy % 2 == 1,
                                       objects=_part_objects(parts)))
    return images


def _annotation_xml(image: FixtureImage, width: int, height: int, depth: int) -> str:
    objects = []
    for cls, (xmin, ymin, xmax, ymax), difficult in image.objects:
        objects.append(
            "\t<object>\n"
            f"\t\t<name>{cls}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>{int(difficult)}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
            f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n\t\t</bndbox>\n"
            "\t</object>\n")
    return ("<annotation>\n\t<folder>VOC2007</folder>\n"
            f"\t<filename>{image.image_id}.jpg</filename>\n"
            "\t<source>\n\t\t<database>slimtune test fixture (scikit-image sample photos)</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>{depth}</depth>\n\t</size>\n"
            "\t<segmented>0</segmented>\n" + "".join(objects) + "</annotation>\n")


def expected_target(image: FixtureImage, class_names: list[str]) -> np.ndarray:
    """The VOC classification target of a fixture image: 1 clear, -1 difficult only, 0 absent."""
    target = np.zeros(len(class_names), dtype=np.float32)
    for cls, _, difficult in image.objects:
        index = class_names.index(cls)
        if not difficult:
            target[index] = 1.0
        elif target[index] == 0.0:
            target[index] = -1.0
    return target


def make_voc_fixture(root: Path, copies: int = 2, max_side: int = 128, quality: int = 90) -> Path:
    """Write VOCdevkit/VOC2007 under `root` (JPEGImages, Annotations, ImageSets/Main); return
    the VOCdevkit path. `copies` repeats the 10 base images (odd copies mirrored), so the tree
    holds 10 * copies images split over train/val/test (trainval = train + val)."""
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    from slimtune.data.voc import VOC_CLASSES

    class_names = list(VOC_CLASSES)
    cache: dict[tuple[str, ...], tuple[np.ndarray, list]] = {}
    images = fixture_images(copies)
    for image in images:
        right_difficult = next((d for l, r, d in COMPOSITES if (l, r) == image.parts), False)
        if image.parts not in cache:
            cache[image.parts] = _compose(image.parts, right_difficult, max_side)
        pixels, objects = cache[image.parts]
        height, width = pixels.shape[:2]
        if image.flipped:
            pixels = pixels[:, ::-1]
            objects = [(c, (width - b[2], b[1], width - b[0], b[3]), d) for c, b, d in objects]
        # VOC boxes are 1-based inclusive pixel coordinates.
        image.objects = [(c, (max(1, round(b[0]) + 1), max(1, round(b[1]) + 1),
                              min(width, round(b[2]) + 1), min(height, round(b[3]) + 1)), d)
                         for c, b, d in objects]
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            voc / "JPEGImages" / f"{image.image_id}.jpg", quality=quality)
        depth = 1 if pixels.ndim == 2 else 3
        (voc / "Annotations" / f"{image.image_id}.xml").write_text(
            _annotation_xml(image, width, height, depth), encoding="utf-8")

    members = {split: [image for image in images if image.split == split] for split in SPLITS}
    members["trainval"] = [image for image in images if image.split in ("train", "val")]
    main = voc / "ImageSets" / "Main"
    for split, chosen in members.items():
        (main / f"{split}.txt").write_text("".join(f"{image.image_id}\n" for image in chosen))
        for index, cls in enumerate(class_names):
            # VOC's per-class lists: 1 present, -1 absent, 0 difficult only.
            code = {1.0: " 1", 0.0: "-1", -1.0: " 0"}
            lines = [f"{image.image_id} {code[float(expected_target(image, class_names)[index])]}\n"
                     for image in chosen]
            (main / f"{cls}_{split}.txt").write_text("".join(lines))
    return voc.parent
