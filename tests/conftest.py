"""Shared fixtures: locate the real data in ``../shared/data`` (or ``$VQVAE_MEDICAL_DATA``)."""

from __future__ import annotations

import os
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
