"""A Griffe extension: the reStructuredText bits of curvkit's docstrings, as Markdown for the site.

The docstrings are Google style with a few reST habits that Python's help() shows well but Markdown
does not: ``>>>`` examples (become ``pycon`` code blocks), ``.. code-block:: LANG`` blocks (fenced
blocks), ``text::`` before a literal block (one colon), and roles such as ``:class:`~a.B```,
``:func:`f``` or ``:math:`x``` (inline code, ``~`` keeping the last name). Only the rendered text
changes; the docstrings themselves, and their doctests, stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj|exc|math):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(text: str) -> str:
    """``text`` with doctest and code-block blocks fenced, literal-block colons single, and roles as code.

    Returns:
        The Markdown text.
    """
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        pad = " " * _indent(line)
        if stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(pad):])
                i += 1
            out += [f"{pad}```pycon", *(pad + b for b in block), f"{pad}```"]
            continue
        if stripped.startswith(".. code-block::"):
            language = stripped.split("::", 1)[1].strip()
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            inner = min((_indent(b) for b in block if b.strip()), default=0)
            out += [f"{pad}```{language}", *(pad + b[inner:] if b.strip() else "" for b in block), f"{pad}```", ""]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            line = line[:-1]
        out.append(_ROLE.sub(_role, line))
        i += 1
    return "\n".join(out)


class RstMarkup(Extension):
    """Rewrites every docstring with :func:`to_markdown` as Griffe loads it."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
