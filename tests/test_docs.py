"""docs/architecture.md (and the README and docs/models.md) name only what exists: every
module of the package is listed, every file and code name a doc gives is in the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kvtier"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Docs whose code names are all kvtier's (docs/vllm.md names vLLM's too).
KVTIER_DOCS = (ARCHITECTURE, ROOT / "docs" / "contracts.md", ROOT / "README.md",
               ROOT / "docs" / "models.md")
SPAN = re.compile(r"`([^`]+)`")
# A span that is one code name: `BlockCache`, `ref_path`, `Scheduler.phases`,
# `take_plan()`, `RemoteStoreBase.write_back(on_lost=...)`.
NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\(.*\))?")


def _spans(doc: Path) -> list[str]:
    """The inline code spans of ``doc`` (its fenced blocks left out), whitespace joined."""
    text = re.sub(r"^```.*?^```$", "", doc.read_text(), flags=re.S | re.M)
    return [" ".join(span.split()) for span in SPAN.findall(text)]


def _modules() -> list[str]:
    """The package's modules, as paths under ``src/kvtier`` (package ``__init__`` files,
    which only gather names, left out)."""
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py")


def _source() -> str:
    return "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))


def test_architecture_lists_every_module() -> None:
    """Each module is named in docs/architecture.md: a top-level one as `name.py`, one of a
    subpackage on a line that names its folder (`sim/replay.py`, or `transfer/...` then
    `dma_batch.py`)."""
    lines = ARCHITECTURE.read_text().splitlines()
    missing = []
    for module in _modules():
        folder, _, name = module.rpartition("/")
        named = [line for line in lines
                 if f"`{name}`" in line or (folder and f"{name}`" in line)]
        if folder:
            named = [line for line in named if f"`{module}`" in line or f"{folder}/" in line]
        if not named:
            missing.append(module)
    assert missing == []


@pytest.mark.parametrize("doc", KVTIER_DOCS, ids=lambda p: p.name)
def test_every_file_a_doc_names_exists(doc: Path) -> None:
    """A `*.py` path a doc names exists: under the package, the repository, tests/ or
    benchmarks/, or (a bare file name) somewhere in them."""
    files = {p.name for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    # A peer's test file (vLLM's test_prefix_caching.py), as the mirror of it names it.
    mirrors = "\n".join(p.read_text() for p in (ROOT / "tests" / "peer_mirror").rglob("*.py"))
    missing = []
    for span in _spans(doc):
        for path in re.findall(r"[\w/]+\.py\b", span):
            if "/" in path:
                if not any((base / path).exists() for base in (PACKAGE, ROOT, ROOT / "tests")):
                    missing.append(path)
            elif path not in files and path not in mirrors:
                missing.append(path)
    assert missing == []


@pytest.mark.parametrize("doc", KVTIER_DOCS, ids=lambda p: p.name)
def test_every_code_name_a_doc_gives_exists(doc: Path) -> None:
    """A span that is one code name (a class, function, method or attribute, dotted or
    called) names something in the package's source: a renamed or removed name leaves no
    stale mention. Of a dotted name, its class parts and its last part are checked
    (`mgr.drop_salt(s)`: the README example's variable is not a name of the package)."""
    source = _source()
    missing = set()
    for span in _spans(doc):
        m = NAME.fullmatch(span)
        if (m is None or re.search(r"\.(py|md|json|cpp)$", span)
                or ("_" not in span and not re.search(r"[a-z][A-Z]", span))):
            continue  # a file, a word (`lookup`, `Tier`) or no name: not checked here
        parts = m.group(1).split(".")
        for part in [p for p in parts[:-1] if p[0].isupper()] + parts[-1:]:
            if not re.search(rf"\b{part}\b", source):
                missing.add(part)
    assert sorted(missing) == []
