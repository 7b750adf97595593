"""MkDocs hooks: the site's pages come from the repository, so nothing is written twice.

- ``README.md``: its introduction is the home page, each ``## `` section a page of the guide;
- ``BENCHMARKS.md``: one page (the README links to it);
- ``notebooks/*.ipynb``: one page each, rendered by mkdocs-jupyter (stored without outputs);
- the command line: each subcommand's ``--help``, from ``curvkit.cli.parser()``;
- the API reference: one page per public subpackage or module of ``curvkit``, rendered by mkdocstrings.

New README sections, notebooks and subpackages get their pages without editing ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from pathlib import Path

import mkdocs.plugins
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text before the first ``## `` heading, and (title, body) per ``## `` section (code fences skipped)."""
    intro: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            sections.append((line[3:].strip(), []))
            continue
        (sections[-1][1] if sections else intro).append(line)
    return "\n".join(intro), [(title, "\n".join(body)) for title, body in sections]


def _promote(body: str) -> str:
    """Headings one level up (``### `` becomes ``## ``), outside code fences."""
    out, fenced = [], False
    for line in body.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append(line[1:] if not fenced and line.startswith("###") else line)
    return "\n".join(out)


def _links(text: str) -> str:
    """Links from the README's folder to pages of the site."""
    return text.replace("](BENCHMARKS.md)", "](../benchmarks.md)")


def _readme() -> tuple[str, list[tuple[str, str, str]]]:
    intro, sections = _sections((ROOT / "README.md").read_text())
    pages = [(title, f"guide/{_slug(title)}.md", f"# {title}\n\n{_links(_promote(body)).strip()}\n")
             for title, body in sections]
    links = "\n".join(f"- [{title}]({path})" for title, path, _ in pages)
    return f"{intro.strip()}\n\n## Contents\n\n{links}\n", pages


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def _api_modules() -> list[str]:
    """``curvkit`` and its public subpackages and modules, in name order."""
    package = ROOT / "curvkit"
    names = [p.parent.name for p in package.glob("*/__init__.py")] + \
            [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
    return ["curvkit"] + [f"curvkit.{n}" for n in sorted(names) if not n.startswith("_")]


def _api_page(name: str) -> str:
    """The module's docstring, then each name of its ``__all__`` rendered from where it is defined.

    A package whose function shares its name with a submodule (``curvkit.hessian.trace``) would otherwise
    show the submodule (griffe resolves the name statically) and hide the function.
    """
    import importlib
    import inspect

    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if not exported:
        return f"::: {name}\n"
    parts = [f"::: {name}", "    options:", "      members: false", ""]
    for member in exported:
        obj = getattr(module, member)
        if inspect.ismodule(obj):
            path = obj.__name__
        elif inspect.isclass(obj) or inspect.isroutine(obj):
            path = f"{obj.__module__}.{obj.__qualname__}"
        else:
            path = f"{name}.{member}"
        parts += [f"::: {path}", "    options:", "      heading_level: 2", "      show_root_full_path: false", ""]
    return "\n".join(parts)


def _cli_page(pages: list[tuple[str, str, str]]) -> str:
    from curvkit import cli

    root = cli.parser()
    sub = next(a for a in root._actions if a.dest == "command")
    guide = [f"; [{title}]({path}) shows what they write" for title, path, _ in pages
             if title.lower().startswith("command line")]
    parts = ["# Command line", "", "`curvkit COMMAND ...`, or `python -m curvkit COMMAND ...`. The options of every "
             f"command, as `curvkit COMMAND --help` prints them{guide[0] if guide else ''}.", ""]
    for name in cli.COMMANDS:
        help_text = sub.choices[name].format_help()
        parts += [f"## `curvkit {name}`", "", "```text", help_text.rstrip(), "```", ""]
    return "\n".join(parts)


def on_config(config):
    """The navigation: home, the README's sections, notebooks, command line, API reference, benchmarks."""
    _, pages = _readme()
    config.nav = [
        {"Home": "index.md"},
        {"Guide": [{title: path} for title, path, _ in pages]},
        {"Notebooks": [{nb.stem.replace("_", " ").capitalize(): f"notebooks/{nb.name}"} for nb in _notebooks()]},
        {"Command line": "cli.md"},
        {"API reference": [{name: f"api/{name}.md"} for name in _api_modules()]},
        {"Benchmarks": "benchmarks.md"},
    ]
    return config


@mkdocs.plugins.event_priority(100)  # before mkdocs-jupyter, which converts the notebook files added here
def on_files(files, config):
    """Add the generated pages and the notebooks."""
    home, pages = _readme()
    generated = {"index.md": home, "cli.md": _cli_page(pages),
                 "benchmarks.md": (ROOT / "BENCHMARKS.md").read_text()}
    generated.update({path: text for _, path, text in pages})
    generated.update({f"api/{name}.md": _api_page(name) for name in _api_modules()})
    for path, text in generated.items():
        files.append(File.generated(config, path, content=text))
    for nb in _notebooks():
        files.append(File(f"notebooks/{nb.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
