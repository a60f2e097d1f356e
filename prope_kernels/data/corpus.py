"""Text corpora: the bundled default (built offline from text that ships with Python) and user
data (a text file, a directory of text files, or JSONL with a "text" field)."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sysconfig
from pathlib import Path

from .. import env

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@functools.lru_cache(maxsize=2)
def _builtin(max_chars: int) -> tuple:
    return tuple(_builtin_docs(max_chars))


def builtin_corpus(max_chars: int = 4_000_000) -> list[str]:
    """The bundled default corpus (see :func:`_builtin_docs`), built once per process."""
    return list(_builtin(max_chars))


def _builtin_docs(max_chars: int) -> list[str]:
    """Real English text available offline on any machine with Python, under the PSF license:
    the reference-manual topics of ``pydoc_data`` plus the docstrings of the standard library's
    modules, classes and functions (read with ``ast``, nothing is imported). Deterministic:
    files are visited in sorted order and the corpus is capped at ``max_chars``."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    total = sum(map(len, docs))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:  # keep prose, skip one-liners
                    docs.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    return docs


def load_documents(path: str) -> list[str]:
    """Documents from a text file (the whole file is one document), a directory (every
    .txt/.md/.rst/.jsonl file under it) or a .jsonl file (one document per line, field "text")."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and
                       (f.suffix.lower() in TEXT_SUFFIXES or f.suffix.lower() == ".jsonl"))
        if not files:
            raise ValueError(f"no .txt/.md/.rst/.jsonl files under {path!r}")
        return [d for f in files for d in load_documents(str(f))]
    if p.suffix.lower() == ".jsonl":
        docs = []
        with open(p, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{i}: expected an object with a string 'text' field")
                docs.append(obj["text"])
        return docs
    return [p.read_text(encoding="utf-8", errors="replace")]


def fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = env.cache_dir()
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)
