"""Default training text: the docstrings of the running Python's standard library.

Every Python install carries this corpus, so the demo needs no download. It is real
English with a technical register, and it is the same on every machine with the same
Python version. Modules are read with ``ast``, never imported, so nothing runs.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path

from ._cache import atomic_open, cached_dir

MIN_DOCSTRING = 40  # shorter ones are mostly "Return x." and add nothing readable
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # what can hold a def; expressions cannot


def _module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted name, path) of every importable-looking source file under ``root``."""
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if SKIP_DIRS.intersection(parts) or not all(p.isidentifier() for p in parts):
            continue  # tests, third-party packages, and files like python-config.py
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found.append((".".join(parts), path))
    return sorted(found)


def _sections(body: list[ast.AST], prefix: str = "") -> list[str]:
    """'class X:' / 'def X.f(args):' blocks, in source order, including defs nested in if/try."""
    out = []
    for node in body:
        if isinstance(node, _DEFS):
            name = prefix + node.name
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING:
                header = f"class {name}:" if isinstance(node, ast.ClassDef) else f"def {name}({ast.unparse(node.args)}):"
                out.append(f"{header}\n{doc}")
            out += _sections(node.body, name + ".")
        else:
            out += _sections([c for c in ast.iter_child_nodes(node) if isinstance(c, _BLOCKS)], prefix)
    return out


def _document(path: Path) -> str | None:
    """The module's docstrings joined into one text, or None if it has none or does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for old escape sequences
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    doc = ast.get_docstring(tree, clean=True)
    parts = [doc] if doc and len(doc) >= MIN_DOCSTRING else []
    parts += _sections(tree.body)
    return "\n\n".join(parts) or None


def stdlib_documents() -> list[dict]:
    """One ``{"module", "text"}`` per standard-library module with docstrings, sorted by module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = ((module, _document(path)) for module, path in _module_files(root))
    return [{"module": module, "text": text} for module, text in docs if text]


def is_eval_module(module: str, eval_fraction: float) -> bool:
    """Stable across processes and machines (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.sha256(module.encode()).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def write_stdlib_corpus(out_dir: str | os.PathLike, eval_fraction: float = 0.1) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (split by module) into ``out_dir``; return both paths."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents()
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, want_eval in zip(paths, (False, True)):
        with atomic_open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                if is_eval_module(doc["module"], eval_fraction) == want_eval:
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return paths


def stdlib_corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/stdlib-docs-py<major>.<minor>`` holding train.jsonl and eval.jsonl, written once."""
    name = f"stdlib-docs-py{sys.version_info.major}.{sys.version_info.minor}"
    return cached_dir(name, write_stdlib_corpus, cache_dir)
