"""Transform chains on the real images: shapes, ranges, channel handling and the 2D orientation convention."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, PersistentDataset
from monai.utils import set_determinism
from PIL import Image

from vqvae_medical.data import (
    AdaptChannelsd,
    check_datalist,
    image_transforms_2d,
    make_dataset,
    volume_transforms_3d,
)


def _minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    return (array - array.min()) / (array.max() - array.min())


def test_grey_jpeg_rows_first_and_png_round_trip(tmp_path, brain_jpg):
    out = image_transforms_2d()({"image": str(brain_jpg)})["image"]
    assert out.shape == (1, 208, 176) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    expected = _minmax(np.asarray(Image.open(brain_jpg)))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)

    # a reconstruction written back as PNG looks like the input, not transposed
    png = tmp_path / "written.png"
    Image.fromarray(np.rint(out[0].numpy() * 255).astype(np.uint8)).save(png)
    with Image.open(png) as written, Image.open(brain_jpg) as original:
        assert written.size == original.size == (176, 208)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.rint(expected * 255).astype(np.uint8))
    again = image_transforms_2d()({"image": str(png)})["image"]
    np.testing.assert_allclose(again.numpy(), out.numpy(), atol=1 / 255)


def test_tiff_through_itk_reader_has_same_orientation(tmp_path, brain_jpg):
    tif = tmp_path / "slice.tif"
    Image.open(brain_jpg).save(tif)
    out = image_transforms_2d()({"image": str(tif)})["image"]
    assert out.shape == (1, 208, 176)
    np.testing.assert_allclose(out[0].numpy(), _minmax(np.asarray(Image.open(brain_jpg))), atol=1e-6)
    assert check_datalist([{"image": str(tif)}], expected_size=(208, 176)).sizes == {(208, 176): 1}


def test_rgb_to_grey_and_grey_to_rgb(isic_jpg, brain_jpg):
    rgb = np.asarray(Image.open(isic_jpg)).astype(np.float32)
    grey = image_transforms_2d(channels=1)({"image": str(isic_jpg)})["image"]
    assert grey.shape == (1, 256, 256)
    np.testing.assert_allclose(grey[0].numpy(), _minmax(rgb.mean(-1)), atol=1e-5)
    colour = image_transforms_2d(channels=3)({"image": str(isic_jpg)})["image"]
    assert colour.shape == (3, 256, 256)
    np.testing.assert_allclose(colour.permute(1, 2, 0).numpy(), _minmax(rgb), atol=1e-6)
    repeated = image_transforms_2d(channels=3)({"image": str(brain_jpg)})["image"]
    assert repeated.shape == (3, 208, 176)
    assert torch.equal(repeated[0], repeated[1]) and torch.equal(repeated[1], repeated[2])


def test_opaque_rgba_png_drops_alpha(tmp_path, isic_jpg):
    png = tmp_path / "rgba.png"
    Image.open(isic_jpg).convert("RGBA").save(png)
    out = image_transforms_2d(channels=3)({"image": str(png)})["image"]
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), _minmax(np.asarray(Image.open(isic_jpg))), atol=1e-6)
    with pytest.raises(ValueError, match="2 channels cannot be mapped to 5"):
        AdaptChannelsd("image", channels=5)({"image": torch.zeros(2, 4, 4)})


def test_pad_resize_and_divisible(brain_jpg):
    expected = _minmax(np.asarray(Image.open(brain_jpg)))
    padded = image_transforms_2d(spatial_size=(224, 224))({"image": str(brain_jpg)})["image"]
    assert padded.shape == (1, 224, 224)
    np.testing.assert_allclose(padded[0, 8:216, 24:200].numpy(), expected, atol=1e-6)
    assert float(padded[0, :8].abs().sum()) == 0.0
    cropped = image_transforms_2d(spatial_size=128)({"image": str(brain_jpg)})["image"]
    np.testing.assert_allclose(cropped[0].numpy(), expected[40:168, 24:152], atol=1e-6)
    resized = image_transforms_2d(spatial_size=(64, 80), resize_mode="resize")({"image": str(brain_jpg)})["image"]
    assert resized.shape == (1, 64, 80) and 0.0 <= float(resized.min()) and float(resized.max()) <= 1.0
    divisible = image_transforms_2d(divisible_by=32)({"image": str(brain_jpg)})["image"]
    assert divisible.shape == (1, 224, 192)
    with pytest.raises(ValueError, match="resize_mode"):
        image_transforms_2d(resize_mode="stretch")


def test_augmentation_is_random_but_seeded(brain_jpg):
    plain = image_transforms_2d(spatial_size=(208, 176))({"image": str(brain_jpg)})["image"]
    outputs = []
    for seed in (0, 0, 1):
        transform = image_transforms_2d(augment=True, prob=1.0)
        transform.set_random_state(seed=seed)
        outputs.append(transform({"image": str(brain_jpg)})["image"])
    assert all(o.shape == plain.shape and float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outputs)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    assert not torch.allclose(outputs[0], plain)


def test_2d_nifti_slices_load_in_stored_order(tmp_path, ixi_nii):
    img = nib.load(ixi_nii)
    plane = np.asarray(img.dataobj)[:, 20:110, 45]  # 120 x 90, not square
    for name, array in (("flat.nii.gz", plane), ("column.nii.gz", plane[..., None])):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        out = image_transforms_2d()({"image": str(path)})["image"]
        assert out.shape == (1, 120, 90)
        np.testing.assert_allclose(out[0].numpy(), _minmax(plane), atol=1e-6)
        assert out.affine.shape == (4, 4)


def test_3d_volume_rejected_by_2d_chain(ixi_nii):
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the ValueError
        image_transforms_2d()({"image": str(ixi_nii)})
    assert isinstance(err.value.__cause__, ValueError)
    assert str(err.value.__cause__).startswith(f"{ixi_nii}: spatial size (120, 120, 90) is not 2D.")


def test_volume_minmax_ras_and_resize(ixi_nii):
    out = volume_transforms_3d(spatial_size=(48, 48, 40))({"image": str(ixi_nii)})["image"]
    assert out.shape == (1, 48, 48, 40) and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(1.0)
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    assert nib.aff2axcodes(nib.load(ixi_nii).affine) != ("R", "A", "S")  # the file is not RAS: reorientation ran
    padded = volume_transforms_3d(spatial_size=(128, 128, 96), resize_mode="pad")({"image": str(ixi_nii)})["image"]
    assert padded.shape == (1, 128, 128, 96)


def test_volume_percentile_spacing_crop_and_patch(ixi_nii):
    transform = volume_transforms_3d(
        pixdim=4.0, spatial_size=None, crop_foreground=True, foreground_fraction=0.1, scaling="percentile"
    )
    out = transform({"image": str(ixi_nii)})["image"]
    assert all(s <= 60 for s in out.shape[1:]) and out.shape[0] == 1
    np.testing.assert_allclose(np.abs(np.diag(out.affine.numpy())[:3]), 4.0, atol=1e-4)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float((out == 1.0).float().mean()) > 0.001  # the top 0.5 % is clipped
    patch = volume_transforms_3d(spatial_size=64, patch_size=32, augment=True)({"image": str(ixi_nii)})["image"]
    assert patch.shape == (1, 32, 32, 32)


def test_make_dataset_memory_disk_none(tmp_path, brain_dir):
    files = sorted((brain_dir / "Test" / "ModerateDemented").glob("*.jpg"))[:4]
    data = [{"image": str(f), "label": 1} for f in files]
    transform = image_transforms_2d(spatial_size=(64, 64), resize_mode="resize")
    for cache in ("memory", "disk", "none"):
        dataset = make_dataset(data, transform, cache=cache, cache_dir=tmp_path / "cache")
        batch = next(iter(DataLoader(dataset, batch_size=4)))
        assert batch["image"].shape == (4, 1, 64, 64)
        assert batch["label"].tolist() == [1, 1, 1, 1]
    assert isinstance(make_dataset(data, transform, cache="disk", cache_dir=tmp_path / "cache"), PersistentDataset)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4
    with pytest.raises(ValueError, match="needs cache_dir"):
        make_dataset(data, transform, cache="disk")
    with pytest.raises(ValueError, match="cache must be"):
        make_dataset(data, transform, cache="ram")


def test_determinism_helper_does_not_break_chain(brain_jpg):
    set_determinism(seed=0)
    try:
        first = image_transforms_2d(augment=True)({"image": str(brain_jpg)})["image"]
        set_determinism(seed=0)
        second = image_transforms_2d(augment=True)({"image": str(brain_jpg)})["image"]
    finally:
        set_determinism(seed=None)
    assert torch.equal(first, second)
