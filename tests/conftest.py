"""Shared fixtures: small real-photo image folders and quiet, single-threaded torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def skimage_photos() -> dict[str, np.ndarray]:
    """A few real RGB photos shipped with scikit-image (offline)."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
            "rocket": data.rocket(), "motorcycle": data.stereo_motorcycle()[0]}


def make_cats_vs_dogs(root: Path, per_class: int = 6, size: int = 64) -> Path:
    """A two-class image folder from real photos: 'cat' (chelsea crops) vs 'coffee' crops."""
    photos = skimage_photos()
    rng = np.random.default_rng(0)
    for name, photo in (("cat", photos["chelsea"]), ("dog", photos["coffee"])):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        for index in range(per_class):
            top = int(rng.integers(0, height - height // 2))
            left = int(rng.integers(0, width - width // 2))
            crop = photo[top:top + height // 2, left:left + width // 2]
            Image.fromarray(crop).resize((size, size)).save(folder / f"{name}_{index}.jpg", quality=90)
    return root


@pytest.fixture
def cats_vs_dogs(tmp_path: Path) -> Path:
    """An image folder with classes cat and dog, 6 real-photo crops each."""
    return make_cats_vs_dogs(tmp_path / "cats_vs_dogs")
