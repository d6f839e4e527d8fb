"""The README and docs/ name modules, tests and imports that exist: every `from minitron_jax... import X`
line imports, every module or test path they cite is a file, every `file.py::test` is a test in it."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ROOMS = ("core", "model", "io", "data", "eval", "prune", "train", "run")


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def _imports() -> list[tuple[str, str]]:
    found = re.findall(r"^\s*from (minitron_jax[\w.]*) import ([\w, ]+)$", _text(), re.M)
    return sorted({(mod, name.strip()) for mod, names in found for name in names.split(",")})


@pytest.mark.parametrize("module,name", _imports())
def test_documented_imports_resolve(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"


def _cited_paths() -> list[str]:
    """Paths in backticks or parentheses: tests/..., tools/..., minitron_jax/..., and room/module.py."""
    cited = set(re.findall(r"(?<![\w/.])((?:tests|tools|minitron_jax|docs|configs|launch)/[\w/.-]+\.(?:py|md|yaml|sh)"
                           r"(?:::\w+)?)", _text()))
    cited |= {f"minitron_jax/{m}" for m in re.findall(rf"`((?:{'|'.join(ROOMS)})/\w+\.py)`", _text())}
    return sorted(cited)


def test_docs_cite_paths():
    assert len(_cited_paths()) > 30  # the regexes still find what the docs cite


@pytest.mark.parametrize("cited", _cited_paths())
def test_cited_paths_exist(cited):
    path, _, test = cited.partition("::")
    assert (ROOT / path).is_file(), f"{path} is cited in the docs but does not exist"
    if test:
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), f"{path} has no {test}"
