"""Shared fixtures: locate the real data in ``../shared/data`` (or ``$VQVAE_MEDICAL_DATA``), pick real files
from it and copy (or link) them into temporary folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQVAE_MEDICAL_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(sub: str) -> Path:
    path = DATA_ROOT / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set VQVAE_MEDICAL_DATA to the shared data root)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def brain_dir() -> Path:
    """OASIS-derived 2D brain slices (208x176 grey JPEG)."""
    return _require("brain_mri_2d")


@pytest.fixture(scope="session")
def isic_dir() -> Path:
    """ISIC dermoscopic RGB photos (256x256) with metadata JSON."""
    return _require("isic_256")


@pytest.fixture(scope="session")
def ixi_dir() -> Path:
    """IXI T1 volumes at 2 mm (120x120x90 NIfTI)."""
    return _require("ixi_t1_2mm")


@pytest.fixture(scope="session")
def brain_files(brain_dir: Path) -> Callable[[int], list[Path]]:
    """``brain_files(n)``: the first ``n`` real brain slices of ``Test/NonDemented`` (sorted by name)."""

    def first(n: int) -> list[Path]:
        files = sorted((brain_dir / "Test" / "NonDemented").glob("*.jpg"))[:n]
        if len(files) < n:
            pytest.skip(f"{brain_dir} holds fewer than {n} NonDemented test slices")
        return files

    return first


@pytest.fixture(scope="session")
def ixi_files(ixi_dir: Path) -> Callable[[int], list[Path]]:
    """``ixi_files(n)``: the first ``n`` real IXI T1 volumes (sorted by name)."""

    def first(n: int) -> list[Path]:
        files = sorted((ixi_dir / "t1").glob("IXI*_T1.nii.gz"))[:n]
        if len(files) < n:
            pytest.skip(f"{ixi_dir} holds fewer than {n} IXI volumes")
        return files

    return first


@pytest.fixture(scope="session")
def isic_folder(isic_dir: Path) -> Callable[[int, Path], Path]:
    """``isic_folder(n, folder)``: the first ``n`` real ISIC photos with their metadata JSON copied into
    ``folder/images`` and ``folder/metadata`` (the ISIC layout); returns ``folder``."""

    def copy(n: int, folder: Path) -> Path:
        photos = sorted((isic_dir / "images").glob("*.jpg"))[:n]
        if len(photos) < n:
            pytest.skip(f"{isic_dir} holds fewer than {n} photos")
        for photo in photos:
            for sub, src in (("images", photo), ("metadata", isic_dir / "metadata" / f"{photo.stem}.json")):
                (folder / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, folder / sub / src.name)
        return folder

    return copy


def put_files(files: Sequence[Path], folder: Path, link: bool = False) -> Path:
    """Copy (or symlink) ``files`` into ``folder`` (created), with spaces in names replaced by ``_``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = folder / f.name.replace(" ", "_")
        if link:
            dst.symlink_to(f)
        else:
            shutil.copy(f, dst)
    return folder


@pytest.fixture(scope="session")
def real_folder() -> Callable[..., Path]:
    """``real_folder(files, folder, link=False)``: :func:`put_files` as a fixture, for real images copied (or
    linked) into a temporary folder."""
    return put_files
