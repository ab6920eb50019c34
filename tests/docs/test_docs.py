"""The docs as issue #32 (item 3) wants them: each bundle README a Model Zoo README of at most 200 lines, the
top-level README's install and test commands first and its first bundle command on the first screen, no ``/tmp/``
paths, and every relative link and image in the docs pointing at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bundle_runner import REPO_ROOT
from doc_names import cited_names, resolves

BUNDLES = ("vqvae", "vqvae2", "pixelcnn_prior", "latent_diffusion")
README_LIMIT = 200
FIRST_SCREEN = 50
# the Zoo README's sections, in this order (others may come between them)
ZOO_SECTIONS = (
    "model overview",
    "quick start",
    "data",
    "training",
    "expected results",
    "limitations",
    "references",
    "changelog",
)
INSTALL_AND_TEST = ['python -m pip install torch==2.13.0 -e ".[test]"', "python -m pytest -q"]


def doc_files() -> list[Path]:
    """README.md, every page under docs/ and every bundle's docs/README.md."""
    return sorted(
        [
            REPO_ROOT / "README.md",
            *(REPO_ROOT / "docs").rglob("*.md"),
            *(REPO_ROOT / "bundles").glob("*/docs/README.md"),
        ]
    )


def _ids(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of a Markdown text, each as its lines."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading outside code blocks."""
    found = []
    for line in prose_lines(text):
        match = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = title.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, title in headings(text):
        base = slug(title)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(doc: Path) -> list[str]:
    """Relative links and images of ``doc`` (outside code) whose file, or whose heading anchor, does not exist."""
    text = doc.read_text()
    problems = []
    for line in prose_lines(text):
        for target in _LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if not resolved.exists():
                problems.append(f"{target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
                problems.append(f"{target}: no heading '#{anchor}' in {resolved.name}")
    return problems


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "figure.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Title\n\n## The cause: a `ratchet` (0.5.0)\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "![ok](figure.png) [ok](other.md#the-cause-a-ratchet-050) [web](https://example.org/x)\n"
        "![moved](old/figure.png) [gone](other.md#no-such-heading)\n"
        "```bash\ncat missing.md  # [not a link](missing.md)\n```\n"
    )
    assert broken_links(doc) == [
        "old/figure.png: no such file",
        "other.md#no-such-heading: no heading '#no-such-heading' in other.md",
    ]


@pytest.mark.parametrize("doc", doc_files(), ids=_ids)
def test_every_relative_link_and_image_resolves(doc):
    problems = broken_links(doc)
    assert not problems, f"{_ids(doc)}: {problems}"


@pytest.mark.parametrize("doc", doc_files(), ids=_ids)
def test_no_tmp_paths(doc):
    """Commands in the docs write under $TMPDIR or repository-relative folders, never a fixed /tmp/ path."""
    hits = [number for number, line in enumerate(doc.read_text().splitlines(), start=1) if "/tmp/" in line]
    assert not hits, f"{_ids(doc)} has /tmp/ paths on lines {hits}; use $TMPDIR"


@pytest.mark.parametrize("doc", sorted((REPO_ROOT / "docs" / "experiments").glob("*.md")), ids=_ids)
def test_experiment_pages_cite_package_names_that_resolve(doc):
    """test_docs_names covers README.md, docs/*.md and the bundle READMEs; this covers docs/experiments/."""
    missing = sorted(name for name in cited_names(doc.read_text()) if not resolves(name))
    assert not missing, f"{_ids(doc)} cites names the package does not have: {missing}"


def zoo_problems(text: str) -> list[str]:
    """What a bundle README lacks to be a Model Zoo README."""
    problems = []
    n_lines = len(text.splitlines())
    if n_lines > README_LIMIT:
        problems.append(f"{n_lines} lines, over {README_LIMIT}")
    titles = [title.lower() for level, title in headings(text) if level == 2]
    position = 0
    for section in ZOO_SECTIONS:
        index = next((i for i in range(position, len(titles)) if titles[i].startswith(section)), None)
        if index is None:
            problems.append(f"no '## {section}' section (in this order: {', '.join(ZOO_SECTIONS)})")
        else:
            position = index + 1
    results = _section(text, "expected results")
    if results is not None:
        if "![" not in results:
            problems.append("'Expected results' shows no figure")
        if not re.search(r"\b20\d\d-\d\d-\d\d\b", results) or "core" not in results:
            problems.append("'Expected results' does not say when and on what machine (date, CPU cores)")
        if "monai.bundle" not in results and "Quick start" not in results:
            problems.append("'Expected results' names no command")
    changelog = _section(text, "changelog")
    if changelog is not None and "(../configs/metadata.json)" not in changelog:
        problems.append("'Changelog' does not link configs/metadata.json")
    lower = text.lower()
    if "executable code" not in lower or "weights_only=true" not in lower:
        problems.append("no security note (configs are executable code; checkpoints load with weights_only=True)")
    return problems


def _section(text: str, title: str) -> str | None:
    """The text of the level-2 section whose title starts with ``title`` (case-insensitive), or None."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S | re.I)
    return match.group(1) if match else None


def test_the_zoo_check_finds_what_a_readme_lacks():
    good = "\n".join(
        [
            "# X",
            "Bundle configs are executable code; checkpoints load with weights_only=True.",
            *(f"## {s.capitalize()}\ntext" for s in ZOO_SECTIONS[:4]),
            "## Expected results\n![f](f.png) measured 2026-12-03 on 2 idle cores with the Quick start commands",
            "## Limitations\n## References\n## Changelog\n[metadata](../configs/metadata.json)",
        ]
    )
    assert zoo_problems(good) == []
    assert zoo_problems(good + "\nline" * README_LIMIT) == [f"{len(good.splitlines()) + README_LIMIT} lines, over 200"]
    no_data = good.replace("## Data\n", "## Inputs\n")
    assert zoo_problems(no_data) == [f"no '## data' section (in this order: {', '.join(ZOO_SECTIONS)})"]
    undated = good.replace("2026-12-03", "recently")
    assert zoo_problems(undated) == ["'Expected results' does not say when and on what machine (date, CPU cores)"]
    assert zoo_problems(good.replace("executable code", "JSON")) == [
        "no security note (configs are executable code; checkpoints load with weights_only=True)"
    ]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_readme_is_a_model_zoo_readme(bundle):
    readme = REPO_ROOT / "bundles" / bundle / "docs" / "README.md"
    assert readme.is_file(), f"{bundle} has no docs/README.md"
    problems = zoo_problems(readme.read_text())
    assert not problems, f"bundles/{bundle}/docs/README.md: {problems}"


def test_readme_starts_with_install_and_test_and_reaches_a_bundle_command_on_the_first_screen():
    """.ci/run runs the README's install and test commands: they are its first code block, exactly; the first
    bundle command follows within the first screen."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = code_blocks(text)
    assert blocks, "README.md has no code block"
    assert [line.strip() for line in blocks[0] if line.strip()] == INSTALL_AND_TEST
    first_command = next(
        (number for number, line in enumerate(text.splitlines(), start=1) if "python -m monai.bundle" in line), None
    )
    assert first_command is not None and first_command <= FIRST_SCREEN, (
        f"the first bundle command is on line {first_command} of README.md, after the first {FIRST_SCREEN}"
    )
