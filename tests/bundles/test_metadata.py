"""Each bundle's metadata requires the vqvae-medical release that its configs are written for: this one."""

from __future__ import annotations

import json

import pytest
import tomllib
from bundle_runner import BUNDLES, REPO_ROOT

import vqvae_medical

METADATA = sorted(BUNDLES.glob("*/configs/metadata.json"))


def test_the_package_version_is_the_pyproject_version():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == vqvae_medical.__version__


@pytest.mark.parametrize("path", METADATA, ids=lambda p: p.parts[-3])
def test_metadata_requires_this_package_version(path):
    required = json.loads(path.read_text())["required_packages_version"]
    assert required.get("vqvae-medical") == vqvae_medical.__version__, (
        f"{path.relative_to(REPO_ROOT)} requires vqvae-medical {required.get('vqvae-medical')}, "
        f"the package is {vqvae_medical.__version__}"
    )
