"""``benchmarks/rate_references.py``: JPEG and blur reference points on real images, read as the bundles read them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from benchmarks.rate_references import jpeg_round_trip, load_images, references


def test_references_on_brain_slices_are_ordered(brain_dir, tmp_path):
    for path in sorted(brain_dir.rglob("*.jpg"))[:3]:
        shutil.copy(path, tmp_path / path.name)
    images = load_images(tmp_path)
    assert len(images) == 3 and images[0].shape[0] == 1
    assert all(float(i.min()) == 0.0 and float(i.max()) == pytest.approx(1.0) for i in images)
    result = references(images, qualities=(10, 75), sigmas=(0.5, 1.0))
    low, high = result["jpeg"]
    assert low["bits_per_image"] < high["bits_per_image"] and low["ssim"] < high["ssim"] < 1.0
    sharp, soft = result["blur"]
    assert 1.0 > sharp["ssim"] > soft["ssim"] > 0.0


def test_jpeg_round_trip_keeps_shape_and_channels(isic_dir, tmp_path):
    path = sorted(isic_dir.rglob("*.jpg"))[0]
    shutil.copy(path, tmp_path / path.name)
    photo = load_images(tmp_path, channels=3)[0]
    decoded, bits = jpeg_round_trip(photo, quality=90)
    assert decoded.shape == photo.shape and bits > 0
    assert float(np.abs(decoded - photo).mean()) < 0.02


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)
