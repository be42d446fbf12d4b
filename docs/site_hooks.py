"""Hooks of the docs site. A griffe extension: the code's docstrings are numpydoc with Sphinx roles
(``:func:`x```, ``:math:`x```, ``.. math::``); this turns them into Markdown that
mkdocstrings renders (code spans, and ``$...$`` / ``$$...$$`` for MathJax)."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def convert(text: str) -> str:
    """Sphinx roles and math directives as Markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        found = _BLOCK.match(lines[i])
        if not found:
            out.append(lines[i])
            i += 1
            continue
        indent, inline = found.groups()
        body = [inline] if inline else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += [indent + "$$", *(indent + b for b in body if b), indent + "$$", ""]
    text = "\n".join(out)
    text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(_role, text)


class RstRoles(griffe.Extension):
    """Rewrite every docstring with :func:`convert` as it is loaded."""

    def on_instance(self, *, obj, **kwargs) -> None:  # noqa: D102 - griffe's hook
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)


# --------------------------------------------------------------------------- mkdocs hook

_OUTSIDE = re.compile(r"\[([^\]]+)\]\(\.\./([^)\s]+)\)")


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Links from a page to files outside ``docs/`` (``../experiments/...``) work on GitHub
    but not on the site: show their repository path instead."""

    def plain(match: re.Match) -> str:
        text, path = match.groups()
        where = f"`{path}` in the repository"
        return where if text.strip("`") == path else f"{text} ({where})"

    return _OUTSIDE.sub(plain, markdown)
