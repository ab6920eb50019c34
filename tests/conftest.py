"""Shared fixtures: locate the real data in ``../shared/data`` (or ``$VQVAE_MEDICAL_DATA``), pick real files
from it and copy (or link) them into temporary folders.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in ``pyproject.toml``): every test writes
below its own ``tmp_path``, never into a bundle folder (:func:`_bundle_folders_stay_clean`), and the tests of a
module that share a trained module fixture carry ``pytest.mark.xdist_group`` so that it is built once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("VQVAE_MEDICAL_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker, torch's intra-op threads in this process: the cores shared among the workers."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        from bundle_runner import default_threads

        torch.set_num_threads(default_threads())


def _bundle_entries() -> dict[str, tuple[int, int]]:
    """Every entry of the bundle folders but what they ship (configs, docs: people edit those), with the size and
    modification time of each file: also the files inside output folders a user's runs left there (``models/``)."""
    from bundle_runner import BUNDLE_SOURCES, BUNDLES

    entries = {}
    for bundle in (b for b in BUNDLES.iterdir() if b.is_dir()):
        for top in (p for p in bundle.iterdir() if p.name not in BUNDLE_SOURCES):
            for path in [top, *top.rglob("*")] if top.is_dir() else [top]:
                stat = path.lstat()
                entries[str(path.relative_to(BUNDLES))] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (0, 0)
    return entries


@pytest.fixture(scope="session", autouse=True)
def _bundle_folders_stay_clean():
    """No test may write into ``bundles/<name>`` (the configs' default ``output_dir``), not even into the output
    folders a user's runs left there: tests run in parallel and must not depend on what is there. Fails at the end of
    the session naming what appeared, changed or went."""
    before = _bundle_entries()
    yield
    after = _bundle_entries()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (
        f"tests changed the bundle folders: {changed}; give every bundle run an output_dir below tmp_path"
    )


@pytest.fixture
def single_thread():
    """One intra-op torch thread for the test (tiny CPU ops: OpenMP synchronisation would dominate on a shared
    machine); use it with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def brain_jpg(brain_dir: Path) -> Path:
    """One real brain slice (208 x 176 grey JPEG, a space in its name)."""
    return brain_dir / "Test" / "NonDemented" / "26 (100).jpg"


@pytest.fixture(scope="session")
def isic_jpg(isic_dir: Path) -> Path:
    """One real ISIC photo (256 x 256 RGB JPEG)."""
    return isic_dir / "images" / "ISIC_0000000.jpg"


@pytest.fixture(scope="session")
def ixi_nii(ixi_dir: Path) -> Path:
    """One real IXI T1 volume (NIfTI)."""
    return sorted((ixi_dir / "t1").glob("IXI*_T1.nii.gz"))[0]


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


@pytest.fixture(scope="module")
def brain_slices(tmp_path_factory, brain_files, real_folder):
    """12 real brain slices (208 x 176 grey JPEG) in one flat folder."""
    return real_folder(brain_files(12), tmp_path_factory.mktemp("slices"))
