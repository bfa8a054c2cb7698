"""MkDocs hooks of the qae documentation site.

- Optional pages: the nav entries listed in ``extra.optional_pages`` of ``mkdocs.yml`` are
  dropped when their file does not exist, so the nav can name pages that appear later
  without breaking ``mkdocs build --strict``. Every other nav entry must exist.
- Repository files: a relative link from a page to a file of the repository outside
  ``docs/`` (``../examples/verl/README.md``) works on GitHub but not on the site. Such
  files are added to the site under ``repo/`` (Markdown files as pages, others copied as
  is, found recursively from the pages that link them) and the links are rewritten to
  point there; a link to a folder of the repository keeps its text and loses the link
  (the site has no page for a folder). A link to a file that does not exist is left
  alone, so MkDocs' link validation reports it and a strict build fails.
- reST roles: docstrings written for Sphinx say ``:func:`name```; the role prefix is
  dropped from the rendered HTML, leaving the code span.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.qae_docs")

REPO_PREFIX = "repo"
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_FENCE = re.compile(r"^(\s*)(```|~~~)", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|obj|exc|const):(<code>)~?")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/")


# --------------------------------------------------------------------------------------
# Optional pages


def _prune(nav: Any, docs_dir: Path, optional: set[str]) -> Any:
    """``nav`` without the optional entries whose file is missing (empty sections too)."""
    if isinstance(nav, str):
        if nav in optional and not (docs_dir / nav).is_file():
            log.info("optional page %s does not exist: left out of the nav", nav)
            return None
        return nav
    if isinstance(nav, list):
        kept = [x for x in (_prune(item, docs_dir, optional) for item in nav) if x is not None]
        return kept or None
    if isinstance(nav, dict):
        kept = {k: v for k, v in ((k, _prune(v, docs_dir, optional)) for k, v in nav.items())}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    return nav


def on_config(config: Any) -> Any:
    optional = set(config.extra.get("optional_pages") or [])
    if config.nav is not None and optional:
        config.nav = _prune(config.nav, Path(config.docs_dir), optional) or []
    return config


# --------------------------------------------------------------------------------------
# Repository files linked from pages


def _outside_fences(text: str) -> list[tuple[bool, str]]:
    """Split Markdown into (is_prose, chunk) pieces, fenced code blocks kept apart."""
    pieces: list[tuple[bool, str]] = []
    pos, inside, fence = 0, False, ""
    for m in _FENCE.finditer(text):
        if not inside:
            pieces.append((True, text[pos : m.start()]))
            pos, inside, fence = m.start(), True, m.group(2)
        elif m.group(2) == fence:
            end = text.find("\n", m.end())
            end = len(text) if end < 0 else end
            pieces.append((False, text[pos:end]))
            pos, inside = end, False
    pieces.append((not inside, text[pos:]))
    return pieces


def _link_targets(text: str) -> list[str]:
    out = []
    for prose, chunk in _outside_fences(text):
        if prose:
            out += [m.group(2) for m in _LINK.finditer(chunk)]
    return out


def _resolve(src: Path, target: str) -> tuple[Path, str] | None:
    """Absolute path of a relative link target of file ``src`` and its ``#anchor``."""
    if _SCHEME.match(target):
        return None
    path, _, anchor = target.partition("#")
    if not path:
        return None
    return Path(os.path.normpath(src.parent / path)), anchor


def _repo_root(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files: Files, config: Any) -> Files:
    docs_dir = Path(config.docs_dir).resolve()
    root = _repo_root(config)
    queue = [Path(f.abs_src_path) for f in files.documentation_pages() if f.abs_src_path]
    seen: set[Path] = set()
    while queue:
        page = queue.pop()
        for target in _link_targets(page.read_text(encoding="utf-8")):
            resolved = _resolve(page, target)
            if resolved is None:
                continue
            path = resolved[0]
            inside_docs = path.is_relative_to(docs_dir)
            if inside_docs or not path.is_relative_to(root) or not path.is_file():
                continue
            if path in seen:
                continue
            seen.add(path)
            uri = posixpath.join(REPO_PREFIX, path.relative_to(root).as_posix())
            files.append(
                File.generated(
                    config, uri, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV
                )
            )
            if path.suffix == ".md":
                queue.append(path)
    return files


def _virtual_uri(path: Path, docs_dir: Path, root: Path) -> str | None:
    if path.is_relative_to(docs_dir):
        return path.relative_to(docs_dir).as_posix()
    if path.is_relative_to(root) and path.is_file():
        return posixpath.join(REPO_PREFIX, path.relative_to(root).as_posix())
    return None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if not page.file.abs_src_path:
        return markdown
    src = Path(page.file.abs_src_path)
    docs_dir = Path(config.docs_dir).resolve()
    root = _repo_root(config)
    from_repo = page.file.src_uri.startswith(REPO_PREFIX + "/")
    here = posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match) -> str:
        resolved = _resolve(src, m.group(2))
        if resolved is None:
            return m.group(0)
        path, anchor = resolved
        if path.is_relative_to(docs_dir) and not from_repo:
            return m.group(0)  # an ordinary link between pages: MkDocs checks it
        if path.is_dir() and path.is_relative_to(root):
            # A folder of the repository has no page on the site: keep the text only.
            log.info("%s: link to the folder %s shown as text", page.file.src_uri, m.group(2))
            return m.group(1)[m.group(1).index("[") + 1 : -2]
        uri = _virtual_uri(path, docs_dir, root)
        if uri is None:
            return m.group(0)
        new = posixpath.relpath(uri, here or ".") + (f"#{anchor}" if anchor else "")
        return m.group(1) + new + m.group(3)

    return "".join(
        _LINK.sub(fix, chunk) if prose else chunk for prose, chunk in _outside_fences(markdown)
    )


# --------------------------------------------------------------------------------------
# reST roles in rendered docstrings


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return _ROLE.sub(r"\1", html)
