"""Issue 16: the documentation site builds without a warning, lists every page, and renders
the code's Sphinx roles and maths."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def hooks():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("site_hooks", ROOT / "docs" / "site_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_is_in_the_navigation():
    yml = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [p for p in pages if f": {p}" not in yml]
    assert not missing, f"docs pages not in mkdocs.yml's nav: {missing}"


def test_sphinx_roles_and_math_become_markdown():
    convert = hooks().convert
    text = (
        "See :func:`~basin_volume.estimate` and :class:`torch.nn.Module`, with "
        ":math:`\\theta_0`.\n\n.. math::\n\n    a = b\n        + c\n\nAfter."
    )
    assert convert(text) == (
        "See `estimate` and `torch.nn.Module`, with $\\theta_0$.\n\n$$\na = b\n+ c\n$$\n\nAfter."
    )
    assert convert(".. math:: x^2") == "$$\nx^2\n$$\n"
    link = "[experiments/x.md](../experiments/x.md) and [the README](../README.md)"
    assert hooks().on_page_markdown(link) == (
        "`experiments/x.md` in the repository and the README (`README.md` in the repository)"
    )


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    assert "arithmatex" in api and ":math:" not in api and ":func:" not in api
    assert "BasinVolumeCallback" in api and "select_parameters" in api
