"""The package layout: public names import from where they are documented, and imports
run the way docs/package-map.md says (the page is the rule table; this test reads it)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qae

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qae"
MAP = ROOT / "docs" / "package-map.md"
API = ROOT / "docs" / "reference" / "api.md"

# --------------------------------------------------------------------------------------
# The rule table, read from docs/package-map.md


@dataclass
class Section:
    """One section of the package map: a folder (``core/``) or a module (``cli.py``)."""

    name: str
    imports: set[str] = field(default_factory=set)
    anything: bool = False
    never: set[str] = field(default_factory=set)


_HEADING = re.compile(r"^## `([\w./]+)`", re.MULTILINE)
_CODE = re.compile(r"`([^`]+)`")


def read_map(text: str) -> dict[str, Section]:
    """The sections of the package map with their Imports and Never lines."""
    heads = list(_HEADING.finditer(text))
    sections: dict[str, Section] = {}
    for i, m in enumerate(heads):
        body = text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        sec = Section(m.group(1))
        lines = {k: v for k, v in re.findall(r"^\*\*(Imports|Never):\*\*(.*)$", body, re.M)}
        if "Imports" not in lines:
            raise AssertionError(f"{MAP.name}: section {sec.name!r} has no **Imports:** line")
        sec.anything = lines["Imports"].strip() == "anything."
        sec.imports = set(_CODE.findall(lines["Imports"]))
        sec.never = set(_CODE.findall(lines.get("Never", "")))
        if sec.name in sections:
            raise AssertionError(f"{MAP.name}: section {sec.name!r} appears twice")
        sections[sec.name] = sec
    return sections


SECTIONS = read_map(MAP.read_text(encoding="utf-8"))


def _path_module(path: str) -> str:
    """``eval/command.py`` -> ``qae.eval.command``, ``core/`` -> ``qae.core``,
    ``__init__.py`` -> ``qae``."""
    if path == "__init__.py":
        return "qae"
    return "qae." + path.removesuffix("/").removesuffix(".py").replace("/", ".")


def section_of(module: str) -> str | None:
    """The most specific section a module of qae belongs to (None: no section)."""
    best = None
    for name in SECTIONS:
        prefix = _path_module(name)
        if module == prefix or (name.endswith("/") and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(_path_module(best)):
                best = name
    return best


def _matches(target: str, rule: str) -> bool:
    """Whether an imported module falls under a map entry (a section or a library name)."""
    if "/" in rule or rule.endswith(".py"):
        prefix = _path_module(rule)
        return target == prefix or (rule.endswith("/") and target.startswith(prefix + "."))
    return target == rule or target.startswith(rule + ".")


# --------------------------------------------------------------------------------------
# Imports of the source tree


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imports_of(module: str, text: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in the source of ``module``, lazy ones
    included; a name imported from a package (``from qae import tasks``) counts as that
    module when it is one."""
    is_package = (SRC.parent / module.replace(".", "/") / "__init__.py").is_file()
    package = module if is_package else module.rpartition(".")[0]
    out: dict[tuple[int, str], None] = {}  # ordered, one entry per (line, module)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.update(((node.lineno, a.name), None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..core import y
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                sub = f"{source}.{a.name}"
                is_sub = source.startswith("qae") and _is_module(sub)
                out[(node.lineno, sub if is_sub else source)] = None
    return sorted(out)


SOURCES = sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def check_file(module: str, where: str, text: str) -> list[str]:
    """The imports of one file (``module``, shown as ``where``) that the map does not allow,
    one line each: the file and line, the import, and the rule it breaks."""
    own = section_of(module)
    if own is None:
        return [f"{where}: no section of {MAP.name} covers {module}"]
    sec = SECTIONS[own]
    allowed = ", ".join(sorted(sec.imports)) or "nothing else of qae"
    found = []
    for line, target in imports_of(module, text):
        bad = next((n for n in sorted(sec.never) if _matches(target, n)), None)
        if bad is not None:
            found.append(f"{where}:{line} imports {target}: {own} never imports {bad}")
        elif target == "qae" or target.startswith("qae."):
            into = section_of(target)
            if not (sec.anything or into == own or into in sec.imports):
                found.append(
                    f"{where}:{line} imports {target} (in {into}): {own} may import {allowed}"
                )
    return found


def violations() -> list[str]:
    """Every import in src/qae that the package map does not allow."""
    found = []
    for path in SOURCES:
        where = str(path.relative_to(ROOT))
        found += check_file(_module_name(path), where, path.read_text(encoding="utf-8"))
    return found


def test_imports_run_the_way_the_package_map_says():
    found = violations()
    assert not found, f"imports against {MAP.relative_to(ROOT)}:\n" + "\n".join(found)


def test_the_check_names_the_file_the_line_and_the_import():
    # The checker itself: wrong-way imports, lazy ones too, are reported with their line.
    text = "import torch\n\nfrom qae.train.config import TrainConfig\n\n\ndef f():\n"
    text += "    import transformers\n    from qae import cli\n"
    found = check_file("qae.core.probe", "src/qae/core/probe.py", text)
    assert len(found) == 3, found
    assert found[0].startswith("src/qae/core/probe.py:3 imports qae.train.config (in train/)")
    assert "probe.py:7 imports transformers: core/ never imports transformers" in found[1]
    assert found[2].startswith("src/qae/core/probe.py:8 imports qae.cli (in cli.py)")
    assert check_file("qae.train.probe", "probe.py", "from qae.eval import evaluate\n")
    assert not check_file("qae.train.probe", "probe.py", "from qae.eval import prompts\n")
    assert not check_file("qae.cli", "cli.py", "from qae.train import trainer\n")


def test_every_folder_and_module_of_the_package_has_a_section():
    real = {f"{p.name}/" for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
    real |= {p.name for p in SRC.glob("*.py")}
    top = {n for n in SECTIONS if "/" not in n.removesuffix("/")}
    assert top == real, (
        f"{MAP.name} has sections for {sorted(top - real)} that are not in src/qae, and "
        f"none for {sorted(real - top)}"
    )
    for name in SECTIONS:
        assert (SRC / name).exists(), f"{MAP.name}: section {name!r} names nothing in src/qae"


def test_every_map_entry_names_a_section_or_a_library():
    for sec in SECTIONS.values():
        for entry in sec.never:
            if "/" in entry or entry.endswith(".py"):
                assert (SRC / entry).exists(), f"{MAP.name}: {sec.name} never imports {entry!r}?"
        unknown = sorted(e for e in sec.imports if e not in SECTIONS)
        assert not unknown, f"{MAP.name}: {sec.name} may import {unknown}: no such section"


def test_the_map_keeps_the_layering():
    # What an edit of the map may not relax: the math and the run I/O stand alone, the
    # math never loads transformers, rewards know no task, nothing imports the command
    # line but ``python -m qae``, and the sections (cli.py aside) import in no circle.
    assert not SECTIONS["core/"].imports and "transformers" in SECTIONS["core/"].never
    assert not SECTIONS["io/"].imports
    assert not {"tasks/", "train/", "eval/"} & SECTIONS["rewards/"].imports
    assert all("cli.py" not in s.imports for n, s in SECTIONS.items() if n != "__main__.py")
    graph = {n: sorted(s.imports) for n, s in SECTIONS.items() if not s.anything}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path[:-1]:
            raise AssertionError(f"{MAP.name}: sections import in a circle: {' -> '.join(path)}")
        if node in done:
            return
        for nxt in graph.get(node, []):
            visit(nxt, [*path, nxt])
        done.add(node)

    for node in graph:
        visit(node, [node])


def test_task_verifiers_resolve_whatever_a_program_imports_first():
    # rewards/ imports no task: the tasks register their verifiers, and every import of a
    # qae module runs qae/__init__.py, which imports the tasks.
    code = (
        "from qae.rewards.base import get_reward, reward_functions\n"
        "print(get_reward('arithmetic').__module__, get_reward('reasoning').__module__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["qae.tasks.arithmetic", "qae.tasks.reasoning"]


# --------------------------------------------------------------------------------------
# Public names


@pytest.mark.parametrize("name", sorted(qae.__all__))
def test_every_public_name_imports_from_qae(name: str):
    namespace: dict = {}
    exec(f"from qae import {name}", namespace)
    assert namespace[name] is getattr(qae, name)


def _api_blocks() -> list[tuple[str, list[str]]]:
    """``(module, members)`` of every ``::: module`` block of the API reference page."""
    blocks = []
    text = API.read_text(encoding="utf-8")
    for m in re.finditer(r"^::: ([\w.]+)\n((?:[ ]{4}.*\n?)*)", text, re.MULTILINE):
        members = re.findall(r"^\s+- (\w+)$", m.group(2), re.MULTILINE)
        blocks.append((m.group(1), members))
    return blocks


@pytest.mark.parametrize("module,members", _api_blocks(), ids=lambda x: str(x))
def test_every_name_of_the_api_reference_imports_from_its_documented_place(module, members):
    mod = importlib.import_module(module)
    names = members or list(getattr(mod, "__all__", []))
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{API.name}: {module} has no {', '.join(missing)}"


# A dotted name followed by "=" is a command-line key (``qae.k=0.4`` of the SkyRL
# launcher), not a module path.
_DOTTED = re.compile(r"(?<![\w.+/-])qae(?:\.[A-Za-z_]\w*)+(?![\w=])")


def _resolves(dotted: str) -> bool:
    """Whether ``qae.a.b.name`` is a module of qae, or a name its longest module holds."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if not _is_module(".".join(parts[:i])):
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:  # the module is there; a library it needs (verl, trl) is not
            return True
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


DOC_PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.md")]
)


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_qae_path_named_in_the_docs_exists(page: Path):
    text = page.read_text(encoding="utf-8")
    stale = sorted({d for d in _DOTTED.findall(text) if not _resolves(d)})
    assert not stale, f"{page.relative_to(ROOT)} names what does not exist: {', '.join(stale)}"
