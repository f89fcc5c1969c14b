"""Every import path the README and the shipped configs name still resolves (restructures must not break them)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

FROM_IMPORT = re.compile(r"^\s*from ((?:lit_align|datamodules|callbacks)[\w.]*) import \(?([\w, \n]+?)\)?$", re.M)
DOTTED = re.compile(r"\b((?:lit_align|datamodules|callbacks)(?:\.\w+)+)\b")
FILE_NAMES = re.compile(r"\.(json|jsonl|py|yaml|png)$")  # lit_align.json is a file an export writes, not a name


def readme_from_imports() -> list[tuple[str, str]]:
    names = []
    for module, listed in FROM_IMPORT.findall(README):
        names += [(module, name.strip()) for name in listed.replace("\n", ",").split(",") if name.strip()]
    return names


def class_paths(node) -> list[str]:
    """Every ``class_path`` in a parsed YAML config."""
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [path for value in node.values() for path in class_paths(value)]
    if isinstance(node, list):
        return [path for value in node for path in class_paths(value)]
    return []


def resolve(dotted: str):
    """Import the longest importable module prefix of ``dotted`` and walk the attributes after it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_the_readme_names_imports():
    assert len(readme_from_imports()) >= 5, "the README's Python examples were not found"


@pytest.mark.parametrize("module,name", readme_from_imports())
def test_every_readme_from_import_resolves(module, name):
    assert hasattr(importlib.import_module(module), name), f"README: from {module} import {name}"


README_NAMES = sorted(d for d in set(DOTTED.findall(README)) - {"lit_align.cli"} if not FILE_NAMES.search(d))


@pytest.mark.parametrize("dotted", README_NAMES)
def test_every_dotted_name_in_the_readme_resolves(dotted):
    if dotted.endswith((".py", ".yaml")):
        pytest.skip("a file name")
    resolve(dotted)


CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_class_path_in_the_shipped_configs_resolves(config):
    for path in class_paths(yaml.safe_load(config.read_text())):
        resolve(path)


def test_every_package_lists_what_it_exports():
    for package in ("lit_align", "lit_align.losses", "datamodules", "callbacks"):
        module = importlib.import_module(package)
        assert module.__all__, package
        for name in module.__all__:
            assert hasattr(module, name), f"{package}.__all__ names {name}, which it does not define"
