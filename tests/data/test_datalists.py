"""Datalist builders on the real data and on folder layouts built in tmp_path from real images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vqvae_medical.data import (
    DataError,
    build_datalist,
    check_datalist,
    class_folder_datalist,
    class_names,
    decathlon_datalist,
    detect_layout,
    folder_datalist,
    image_transforms_2d,
    isic_labels,
    list_images,
    mni152_slices,
    mni152_volume_path,
    mni152_volumes,
    split_by_subject,
    split_folder_datalist,
    subject_id,
    volume_transforms_3d,
)


def _link(src: str | Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def _paths(section: list[dict]) -> list[str]:
    return [item["image"] for item in section]


@pytest.fixture(scope="module")
def brain_files(brain_dir: Path) -> list[str]:
    return list_images(brain_dir / "Test" / "NonDemented")


@pytest.fixture(scope="module")
def ixi_files(ixi_dir: Path) -> list[str]:
    return list_images(ixi_dir / "t1")


def test_subject_pattern_examples():
    assert subject_id("/x/IXI012-HH-1211_T1.nii.gz") == "IXI012"
    assert subject_id("case_001_slice_12.nii.png") == "case_001"
    assert subject_id("218391_78.jpeg") == "218391"
    assert subject_id("sub-07_T1w.nii.gz") == "sub-07"
    assert subject_id("OAS1_0042_MR1_mpr.nii") == "OAS1_0042"
    for name in ("ISIC_0000104.jpg", "26 (19).jpg", "26.jpg", "moderateDem3.jpg"):
        assert subject_id(name) is None
    assert subject_id("p12_a.png", r"^p(\d+)_") == "12"
    assert subject_id("IXI012-HH-1211_T1.nii.gz", None) is None


def test_split_folders_oasis_png_layout(tmp_path, brain_files):
    root = tmp_path / "OASIS"
    counts = {"train": 6, "validate": 2, "test": 3}
    start = 0
    for split, n in counts.items():
        for k in range(n):
            png = root / f"keras_png_slices_{split}" / f"case_{start + k:03d}_slice_{k}.nii.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.open(brain_files[start + k]).save(png)
            seg = root / f"keras_png_slices_seg_{split}" / f"seg_{start + k:03d}_slice_{k}.nii.png"
            _link(brain_files[start + k], seg)
        start += n
    (root / "keras_png_slices_train" / "README.txt").write_text("not an image")
    _link(brain_files[20], root / "keras_png_slices_train" / "CASE_099_SLICE_0.NII.PNG")  # case-insensitive ending

    datalist = split_folder_datalist(root)
    assert list(datalist) == ["training", "validation", "test"]
    assert [len(v) for v in datalist.values()] == [7, 2, 3]
    assert all(os.path.isabs(p) and "_seg_" not in p for p in sum(map(_paths, datalist.values()), []))
    assert datalist["training"][0] == {"image": str(root / "keras_png_slices_train" / "CASE_099_SLICE_0.NII.PNG")}
    assert datalist["validation"][0]["subject"] == "case_006"
    assert build_datalist(root) == datalist
    assert detect_layout(root)[0] == "split"

    carved = split_folder_datalist(root, exclude=None, pattern="keras_png_slices_{split}", val_fraction=0.5)
    assert [len(v) for v in carved.values()] == [7, 2, 3]  # a validation folder exists, nothing is carved

    _link(brain_files[21], root / "keras_png_slices_seg_train" / "x.png")
    with pytest.raises(DataError, match=r"several folders match the training split"):
        split_folder_datalist(root, exclude=None)


def test_split_folders_hipmri_nifti_slices(tmp_path, ixi_files):
    root = tmp_path / "HipMRI"
    volume = np.asarray(nib.load(ixi_files[0]).dataobj)
    for split, weeks in (("train", 3), ("validate", 1), ("test", 1)):
        for week in range(weeks):
            path = root / f"keras_slices_{split}" / f"case_004_week_{week}_slice_{split[:2]}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume[:, :, 40 + week, None], np.eye(4)), path)
    datalist = build_datalist(root)
    assert [len(v) for v in datalist.values()] == [3, 1, 1]
    assert {i["subject"] for v in datalist.values() for i in v} == {"case_004"}
    image = image_transforms_2d()(datalist["training"][0])["image"]
    assert image.shape == (1, 120, 120)


def test_plain_split_folders(tmp_path, brain_files):
    for split, files in (("train", brain_files[:4]), ("val", brain_files[4:6])):
        for f in files:
            _link(f, tmp_path / split / Path(f).name)
    datalist = build_datalist(tmp_path)
    assert [len(v) for v in datalist.values()] == [4, 2] and list(datalist) == ["training", "validation"]
    with pytest.raises(DataError, match=r"no split folders matching '\*_\{split\}'"):
        split_folder_datalist(tmp_path)


def test_class_folders_adni_layout(tmp_path, brain_files):
    root = tmp_path / "ADNI" / "AD_NC"
    subjects = {"AD": ["1001", "1002", "1003"], "NC": ["2001", "2002", "2003", "2004"]}
    n = 0
    for cls, ids in subjects.items():
        for sid in ids:
            for s in range(3):
                split = "test" if sid.endswith("3") else "train"
                _link(brain_files[n], root / split / cls / f"{sid}_{70 + s}.jpeg")
                n += 1
    datalist = class_folder_datalist(root)
    assert class_names(root) == ["AD", "NC"]
    assert [len(v) for v in datalist.values()] == [15, 6] and list(datalist) == ["training", "test"]
    first = datalist["training"][0]
    assert first == {"image": str(root / "train" / "AD" / "1001_70.jpeg"), "label": 0, "subject": "1001"}
    assert {i["label"] for i in datalist["test"]} == {0, 1}
    assert all((i["label"] == 1) == ("/NC/" in i["image"]) for v in datalist.values() for i in v)

    # auto detection descends ADNI -> AD_NC and finds the class layout
    assert detect_layout(tmp_path / "ADNI") == ("class", root)
    assert build_datalist(tmp_path / "ADNI") == datalist

    carved = class_folder_datalist(root, val_fraction=0.25, seed=3)
    assert sorted(_paths(carved["training"]) + _paths(carved["validation"])) == sorted(_paths(datalist["training"]))
    train_subjects = {i["subject"] for i in carved["training"]}
    assert train_subjects.isdisjoint({i["subject"] for i in carved["validation"]})
    assert len(carved["validation"]) == 3  # one whole subject (3 slices) of 15


def test_real_brain_class_layout(brain_dir):
    datalist = build_datalist(brain_dir)
    classes = class_names(brain_dir)
    assert classes == ["MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"]
    assert {k: len(v) for k, v in datalist.items()} == {"training": 52, "test": 1279}
    assert {i["label"] for i in datalist["training"]} == {classes.index("ModerateDemented")}
    counts = np.bincount([i["label"] for i in datalist["test"]])
    assert counts.tolist() == [179, 12, 640, 448]
    assert not any("subject" in i for v in datalist.values() for i in v)  # names carry no subject id


def test_folder_split_is_seeded_and_complete(isic_dir):
    images = isic_dir / "images"
    first = folder_datalist(images, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert {k: len(v) for k, v in first.items()} == {"training": 315, "validation": 45, "test": 90}
    all_paths = sum(map(_paths, first.values()), [])
    assert sorted(all_paths) == list_images(images) and len(set(all_paths)) == 450
    assert folder_datalist(images, val_fraction=0.1, test_fraction=0.2, seed=0) == first
    other = folder_datalist(images, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert set(_paths(other["test"])) != set(_paths(first["test"]))
    only_training = folder_datalist(images, val_fraction=0.0, test_fraction=0.0)
    assert list(only_training) == ["training"] and len(only_training["training"]) == 450
    with pytest.raises(ValueError, match="val_fraction"):
        folder_datalist(images, val_fraction=1.0)
    with pytest.raises(ValueError, match="below 1"):
        folder_datalist(images, val_fraction=0.5, test_fraction=0.5)


def test_folder_split_keeps_subjects_together(tmp_path, ixi_files, brain_files):
    root = tmp_path / "mixed"
    for f in ixi_files[:12]:
        sid = Path(f).name.split("_")[0]
        for contrast in ("T1", "T2", "PD"):
            _link(f, root / "nifti" / f"{sid}_{contrast}.nii.gz")
    for f in brain_files[:6]:
        _link(f, root / "jpeg" / Path(f).name)
    for seed in range(5):
        datalist = folder_datalist(root, val_fraction=0.2, test_fraction=0.2, seed=seed)
        owners: dict[str, str] = {}
        for section, items in datalist.items():
            for item in items:
                if "subject" in item:
                    assert owners.setdefault(item["subject"], section) == section
        assert len(owners) == 12
        assert sum(len(v) for v in datalist.values()) == 42
        assert sum(1 for v in datalist.values() for i in v if "subject" not in i) == 6
    with pytest.raises(DataError, match="too few for"):
        folder_datalist(root / "jpeg", val_fraction=0.45, test_fraction=0.45)


def test_split_by_subject_targets():
    items = [{"image": f"/d/{i:02d}.png"} for i in range(10)]
    out = split_by_subject(items, val_fraction=0.05, test_fraction=0.3, seed=0)
    assert {k: len(v) for k, v in out.items()} == {"training": 6, "validation": 1, "test": 3}
    assert out == split_by_subject(list(reversed(items)), val_fraction=0.05, test_fraction=0.3, seed=0)


def test_decathlon_json(tmp_path, ixi_files):
    root = tmp_path / "Task"
    for i, f in enumerate(ixi_files[:5]):
        _link(f, root / ("imagesTr" if i < 4 else "imagesTs") / Path(f).name)
    content = {
        "name": "IXI subset",
        "training": [{"image": f"imagesTr/{Path(f).name}", "label": i % 2} for i, f in enumerate(ixi_files[:3])],
        "validation": [{"image": f"imagesTr/{Path(ixi_files[3]).name}", "label": 1}],
        "test": [f"imagesTs/{Path(ixi_files[4]).name}"],
    }
    (root / "dataset.json").write_text(json.dumps(content))
    datalist = decathlon_datalist(root / "dataset.json")
    assert {k: len(v) for k, v in datalist.items()} == {"training": 3, "validation": 1, "test": 1}
    assert datalist["training"][1] == {"image": str(root / "imagesTr" / Path(ixi_files[1]).name), "label": 1}
    assert datalist["test"] == [{"image": str(root / "imagesTs" / Path(ixi_files[4]).name)}]
    assert build_datalist(root) == datalist == build_datalist(root / "dataset.json")
    assert all(os.path.exists(i["image"]) for v in datalist.values() for i in v)

    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not a valid JSON file"):
        build_datalist(root)
    (root / "dataset.json").write_text(json.dumps({"name": "empty", "training": []}))
    with pytest.raises(DataError, match="no non-empty training, validation, test section"):
        build_datalist(root / "dataset.json")


def test_isic_labels_and_layout(isic_dir):
    labels = isic_labels(isic_dir / "metadata")
    assert len(labels) == 450 and labels["ISIC_0000000"] == 0
    assert sorted(np.bincount(list(labels.values())).tolist()) == [128, 322]
    datalist = build_datalist(isic_dir, seed=0, test_fraction=0.1)
    assert detect_layout(isic_dir)[0] == "isic"
    items = [i for v in datalist.values() for i in v]
    assert len(items) == 450
    assert all(i["label"] == labels[Path(i["image"]).stem] for i in items)


def test_build_datalist_errors_name_the_folder(tmp_path, brain_files):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"dataset folder {missing} does not exist"):
        build_datalist(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no images found in {empty}"):
        build_datalist(empty)
    (empty / "notes.txt").write_text("no images here")
    (empty / "sub").mkdir()
    with pytest.raises(DataError, match=f"no images found in {empty}"):
        build_datalist(empty)
    with pytest.raises(DataError, match=f"no images found in {empty}"):
        build_datalist(empty, layout="folder")
    with pytest.raises(DataError, match="is a file but not a JSON datalist"):
        build_datalist(empty / "notes.txt")
    with pytest.raises(ValueError, match="layout must be one of"):
        build_datalist(empty, layout="bids")
    with pytest.raises(DataError, match="no split folders"):
        build_datalist(empty, layout="class")
    _link(brain_files[0], tmp_path / "flat" / "a.jpg")
    # an argument of another layout's builder is ignored, so one bundle config serves every layout
    ignored = build_datalist(tmp_path / "flat", layout="folder", pattern="*_{split}", val_fraction=0, test_fraction=0)
    assert [len(v) for v in ignored.values()] == [1]
    with pytest.raises(TypeError, match="no layout takes: skip_bad"):
        build_datalist(tmp_path / "flat", skip_bad=True)
    assert build_datalist(tmp_path / "flat", pattern="*_{split}", val_fraction=0, test_fraction=0) == {
        "training": [{"image": str(tmp_path / "flat" / "a.jpg")}]
    }


def test_ixi_folder_layout(ixi_dir, ixi_files):
    datalist = build_datalist(ixi_dir, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 32, "validation": 4, "test": 4}
    assert all(i["subject"] == Path(i["image"]).name.split("-")[0] for v in datalist.values() for i in v)


def test_mni152_slices_of_three_planes(tmp_path):
    """The bundles' default data: slices of every plane, split 6/1/1 per 8 within each plane."""
    datalist = mni152_slices(tmp_path / "mni", n_slices=8, size=(64, 64), planes=("axial", "coronal", "sagittal"))
    assert {k: len(v) for k, v in datalist.items()} == {"training": 18, "validation": 3, "test": 3}
    names = [Path(i["image"]).name for i in datalist["test"]]
    assert [n.split("_")[1] for n in names] == ["axial", "coronal", "sagittal"]
    coronal = np.asarray(Image.open(datalist["training"][9]["image"]), dtype=np.float32)
    assert coronal.shape == (64, 64) and coronal[:8].mean() < coronal[24:40].mean()  # head at the top, brain inside
    with pytest.raises(ValueError, match="planes"):
        mni152_slices(tmp_path / "mni", planes=("oblique",))


def test_mni152_slices_embedded_default(tmp_path):
    assert Path(mni152_volume_path()).name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    datalist = mni152_slices(tmp_path / "mni", n_slices=32, size=(96, 96))
    assert {k: len(v) for k, v in datalist.items()} == {"training": 24, "validation": 4, "test": 4}
    files = sorted(tmp_path.joinpath("mni").glob("*.png"))
    assert len(files) == 32
    with Image.open(files[0]) as im:
        assert im.mode == "L" and im.size == (96, 96)
    slices = sorted(int(Path(p).stem[-3:]) for p in sum(map(_paths, datalist.values()), []))
    assert slices == sorted(set(slices)) and 20 < slices[0] and slices[-1] < 150  # brain slices only
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert mni152_slices(tmp_path / "mni", n_slices=32, size=(96, 96)) == datalist
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # reused, not rewritten
    report = check_datalist(datalist["training"], expected_size=(96, 96))
    assert report.n_skipped == 0
    middle = np.asarray(Image.open(datalist["training"][12]["image"]), dtype=np.float32)
    assert middle.mean() > 20 and middle[:5].max() == 0  # a brain in the middle, zero padding at the top
    image = image_transforms_2d(divisible_by=32)(datalist["validation"][0])["image"]
    assert image.shape == (1, 96, 96)


def test_mni152_volumes_embedded_3d(tmp_path):
    datalist = mni152_volumes(tmp_path / "vol", n_volumes=4, pixdim=4.0)
    assert {k: len(v) for k, v in datalist.items()} == {"training": 2, "validation": 1, "test": 1}
    paths = sum(map(_paths, datalist.values()), [])
    volumes = [nib.load(p) for p in paths]
    assert len({v.shape for v in volumes}) == 1 and volumes[0].get_data_dtype() == np.uint8
    np.testing.assert_allclose(volumes[0].header.get_zooms(), 4.0, atol=0.1)
    arrays = [np.asarray(v.dataobj) for v in volumes]
    assert not np.array_equal(arrays[0], arrays[1])
    assert check_datalist(datalist["training"], spatial_dims=3).n_skipped == 0
    out = volume_transforms_3d(spatial_size=32)(datalist["test"][0])["image"]
    assert out.shape == (1, 32, 32, 32)
    with pytest.raises(ValueError, match="at least 3"):
        mni152_volumes(tmp_path / "vol", n_volumes=2)
