"""Every dotted package name the docs cite (``vqvae_medical.x.y`` or ``stages.frozen.read_record``) resolves."""

from __future__ import annotations

import pytest
from bundle_runner import REPO_ROOT
from doc_names import cited_names, resolves

DOCS = sorted(
    [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"), *(REPO_ROOT / "bundles").glob("*/docs/README.md")]
)
def test_the_pattern_finds_names_and_the_check_can_fail():
    text = "see `stages.frozen.read_record` and vqvae_medical.networks.vqvae.VQVAE, not stages.frozen.load_vqvae"
    found = {name: resolves(name) for name in cited_names(text)}
    assert found == {
        "stages.frozen.read_record": True,
        "vqvae_medical.networks.vqvae.VQVAE": True,
        "stages.frozen.load_vqvae": False,
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_cited_package_name_resolves(doc):
    text = doc.read_text()
    missing = sorted(n for n in cited_names(text) if not resolves(n))
    assert not missing, f"{doc.relative_to(REPO_ROOT)} cites names the package does not have: {missing}"
