"""check_datalist on the real images and on broken copies of them built in tmp_path."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vqvae_medical.data import (
    DataError,
    build_datalist,
    check_datalist,
    inspect_image,
    list_images,
)


def _truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _ixi_slice(ixi_nii: Path, dst: Path, keep_axis: bool = False) -> Path:
    img = nib.load(ixi_nii)
    data = np.asarray(img.dataobj)[:, :, 45]
    if keep_axis:
        data = data[..., None]
    nib.save(nib.Nifti1Image(data, img.affine), dst)
    return dst


def test_all_brain_jpegs_pass_quickly(brain_dir):
    datalist = build_datalist(brain_dir)
    items = [i for section in datalist.values() for i in section]
    assert len(items) == 1331
    start = time.perf_counter()
    report = check_datalist(items, spatial_dims=2, channels=1, require_same_size=True)
    elapsed = time.perf_counter() - start
    assert report.n_checked == 1331 and report.n_skipped == 0
    assert report.items == items
    assert report.sizes == {(208, 176): 1331}
    assert elapsed < 10.0, f"checking 1331 JPEGs took {elapsed:.1f} s"


def test_rgb_maps_to_grey_and_rgb(isic_dir):
    items = [{"image": p} for p in list_images(isic_dir / "images")[:20]]
    for channels in (1, 3):
        report = check_datalist(items, channels=channels, expected_size=(256, 256))
        assert len(report.items) == 20


def test_ixi_volumes_pass_3d_and_fail_2d(ixi_dir, ixi_nii):
    items = [{"image": p} for p in list_images(ixi_dir / "t1")]
    assert check_datalist(items, spatial_dims=3, expected_size=(120, 120, 90)).sizes == {(120, 120, 90): 40}
    with pytest.raises(DataError, match=r"3D volume of size \(120, 120, 90\) but the config is 2D"):
        check_datalist([{"image": str(ixi_nii)}], spatial_dims=2)


def test_truncated_jpeg_names_file_problem_and_fix(tmp_path, brain_jpg):
    bad = _truncate(brain_jpg, tmp_path / "cut.jpg")
    with pytest.raises(DataError) as err:
        check_datalist([{"image": str(bad)}])
    message = str(err.value)
    assert message.startswith(f"{bad}: truncated or corrupt JPEG (")
    assert message.endswith(
        "Remove or replace the file, or set skip_bad_files=true (bundle config; skip_bad=True in Python) to skip it."
    )


def test_truncated_png_and_garbage_png(tmp_path, isic_jpg):
    png = tmp_path / "full.png"
    Image.open(isic_jpg).save(png)
    cut = _truncate(png, tmp_path / "cut.png")
    garbage = tmp_path / "notes.png"
    garbage.write_text("this is not an image\n")
    with pytest.raises(DataError, match="truncated or corrupt PNG"):
        check_datalist([{"image": str(cut)}], channels=3)
    with pytest.raises(DataError, match=r"notes\.png: truncated or corrupt PNG \(cannot identify image file"):
        check_datalist([{"image": str(garbage)}], channels=3)
    assert check_datalist([{"image": str(png)}], channels=3).n_skipped == 0


def test_truncated_nifti(tmp_path, ixi_nii):
    bad = _truncate(ixi_nii, tmp_path / "IXI999-HH-0000_T1.nii.gz", keep=0.6)
    with pytest.raises(DataError, match=r"IXI999-HH-0000_T1\.nii\.gz: truncated or corrupt NIfTI"):
        check_datalist([{"image": str(bad)}], spatial_dims=3)
    raw = tmp_path / "raw.nii"
    nib.save(nib.load(ixi_nii), raw)
    short = _truncate(raw, tmp_path / "short.nii", keep=0.9)
    with pytest.raises(DataError, match="truncated or corrupt NIfTI"):
        check_datalist([{"image": str(short)}], spatial_dims=3)


def test_nan_and_inf_nifti(tmp_path, ixi_nii):
    img = nib.load(ixi_nii)
    data = img.get_fdata(dtype=np.float32)
    data[60, 60, 45] = np.nan
    data[10, 10, 10] = np.inf
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: contains 1 NaN and 1 Inf values\. Replace the non-finite"):
        check_datalist([{"image": str(bad)}], spatial_dims=3)


def test_2d_nifti_slices_and_2d_in_3d_config(tmp_path, ixi_nii):
    flat = _ixi_slice(ixi_nii, tmp_path / "flat.nii.gz")
    column = _ixi_slice(ixi_nii, tmp_path / "column.nii.gz", keep_axis=True)
    report = check_datalist([{"image": str(flat)}, {"image": str(column)}], spatial_dims=2, require_same_size=True)
    assert report.sizes == {(120, 120): 2}
    for path in (flat, column):
        with pytest.raises(DataError, match=r"is a 2D image of size .* but the config is 3D"):
            check_datalist([{"image": str(path)}], spatial_dims=3)


def test_two_channel_nifti_and_transparent_alpha_fail(tmp_path, ixi_nii, brain_jpg, isic_jpg):
    img = nib.load(ixi_nii)
    plane = np.asarray(img.dataobj)[:, :, 45]
    two = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([plane, plane], -1)[:, :, None, :], img.affine), two)
    with pytest.raises(DataError, match=r"has 2 channels, which cannot be mapped to the 1 channels"):
        check_datalist([{"image": str(two)}], spatial_dims=2, channels=1)

    grey = Image.open(brain_jpg)
    alpha = Image.fromarray(np.where(np.asarray(grey) > 0, 255, 0).astype(np.uint8))
    la = tmp_path / "la.png"
    Image.merge("LA", (grey, alpha)).save(la)
    with pytest.raises(DataError, match=r"la\.png: has a transparent alpha channel \(PIL mode 'LA'\)"):
        check_datalist([{"image": str(la)}])

    opaque = tmp_path / "rgba.png"
    Image.open(isic_jpg).convert("RGBA").save(opaque)
    for channels in (1, 3):
        assert len(check_datalist([{"image": str(opaque)}], channels=channels).items) == 1

    cmyk = tmp_path / "cmyk.jpg"
    Image.open(isic_jpg).convert("CMYK").save(cmyk)
    with pytest.raises(DataError, match=r"cmyk\.jpg: has PIL mode 'CMYK'. Convert it to RGB"):
        check_datalist([{"image": str(cmyk)}], channels=3)


def test_mixed_and_unexpected_sizes(tmp_path, brain_dir, isic_jpg):
    items = [{"image": p} for p in list_images(brain_dir / "Test" / "ModerateDemented")]
    odd = tmp_path / "grey_isic.png"
    Image.open(isic_jpg).convert("L").save(odd)
    mixed = [*items, {"image": str(odd)}]
    assert len(check_datalist(mixed).items) == 13  # sizes may differ unless asked for
    with pytest.raises(DataError) as err:
        check_datalist(mixed, require_same_size=True)
    assert str(err.value).startswith(f"{odd}: has size (256, 256), unlike the most common size (208, 176) (12 of 13")
    with pytest.raises(DataError, match=r"13 of 13 images in .* are unusable"):
        check_datalist(mixed, expected_size=(128, 128))


def test_missing_unsupported_and_empty(tmp_path, brain_jpg):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(DataError, match=r"gone\.jpg: file not found\. Check the path"):
        check_datalist([{"image": str(missing)}])
    text = tmp_path / "labels.csv"
    text.write_text("a,b\n")
    with pytest.raises(DataError, match=r"labels\.csv: unsupported file type '\.csv'"):
        check_datalist([str(text)])
    with pytest.raises(DataError, match=r"no images found in /some/folder"):
        check_datalist([], source="/some/folder")
    with pytest.raises(DataError, match="has no 'image' entry"):
        check_datalist([{"label": 0}])
    with pytest.raises(DataError, match=r"gone\.jpg: file not found"):
        inspect_image(missing)
    assert inspect_image(brain_jpg).spatial_shape == (208, 176)


def test_many_bad_files_give_one_error_listing_all(tmp_path, brain_jpg):
    bad = [_truncate(brain_jpg, tmp_path / f"cut{i}.jpg") for i in range(3)]
    items = [{"image": str(brain_jpg)}, *({"image": str(p)} for p in bad), {"image": str(tmp_path / "gone.png")}]
    with pytest.raises(DataError) as err:
        check_datalist(items, source=tmp_path)
    message = str(err.value)
    assert message.startswith(f"4 of 5 images in {tmp_path} are unusable:")
    assert all(str(p) in message for p in bad) and "gone.png: file not found" in message
    assert message.endswith(
        "Fix or remove these files, or set skip_bad_files=true (bundle config; skip_bad=True in Python) to skip them."
    )


def test_skip_bad_filters_warns_once_per_file_and_reports(tmp_path, brain_dir, ixi_nii):
    good = [{"image": p, "label": 0} for p in list_images(brain_dir / "Test" / "ModerateDemented")]
    cut = _truncate(Path(good[0]["image"]), tmp_path / "cut.jpg")
    items = [good[0], {"image": str(cut)}, *good[1:], {"image": str(ixi_nii)}, {"image": str(tmp_path / "x.jpg")}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = check_datalist(items, skip_bad=True)
    assert report.items == good
    assert report.n_skipped == 3 and report.n_checked == 15
    assert len([w for w in caught if str(w.message).startswith("skipping ")]) == 3
    assert any(str(cut) in s and "truncated" in s for s in report.skipped)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="all 1 images in the datalist are unusable"):
        check_datalist([{"image": str(cut)}], skip_bad=True)
