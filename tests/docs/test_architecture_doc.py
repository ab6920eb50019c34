"""``docs/architecture.md`` stays true to the package: its layout names every module, and its size claim holds."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "vqvae_medical"
DOC = REPO_ROOT / "docs" / "architecture.md"


def _layout() -> str:
    """The code block of the doc's ``## Layout`` section."""
    section = DOC.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def _folder_blocks(layout: str) -> dict[str, str]:
    """The text of each ``<folder>/`` entry of the layout, up to the next entry at the same or a lower indent."""
    lines = layout.splitlines()
    heads = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines) if (m := re.match(r"^( *)(\w+)/", line))]
    blocks = {}
    for n, (i, indent, name) in enumerate(heads):
        end = next((j for j, ind, _ in heads[n + 1 :] if ind <= indent), len(lines))
        blocks[name] = "\n".join(lines[i:end])
    return blocks


def missing_modules(layout: str) -> list[str]:
    """Modules of the package (``__init__.py`` aside) that the layout does not name within their folder's entry."""
    blocks = _folder_blocks(layout)
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        block = blocks.get(path.parent.name, "")
        if not re.search(rf"(?<![\w.]){re.escape(path.name)}\b", block):
            missing.append(str(path.relative_to(PACKAGE)))
    return missing


def test_the_layout_names_every_module_under_its_folder():
    layout = _layout()
    assert missing_modules(layout) == []
    # a module left out of its folder's entry is found
    assert missing_modules(layout.replace("rng.py", "random.py")) == ["training/rng.py"]


def test_no_module_is_over_600_lines():
    """The doc says so (and gives the largest)."""
    assert "No module is over 600 lines" in " ".join(DOC.read_text().split())
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 600} == {}
