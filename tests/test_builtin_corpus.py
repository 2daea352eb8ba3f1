"""The built-in stdlib-docstring corpus: deterministic, split by module, no tests, written atomically."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rosa_scale
from rosa_scale.builtin import _cache, stdlib_docs
from rosa_scale.builtin.stdlib_docs import is_eval_module, stdlib_corpus_dir, write_stdlib_corpus

PACKAGE_PARENT = str(Path(rosa_scale.__file__).resolve().parent.parent)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def both_corpora(tmp_path_factory) -> tuple[tuple[Path, Path], Path]:
    """The corpus written here, and (concurrently, to save time) by a process with another hash seed."""
    other = tmp_path_factory.mktemp("other")
    code = "import sys; from rosa_scale.builtin.stdlib_docs import write_stdlib_corpus; write_stdlib_corpus(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": PACKAGE_PARENT}
    proc = subprocess.Popen([sys.executable, "-c", code, str(other)], env=env)
    paths = write_stdlib_corpus(tmp_path_factory.mktemp("corpus"))
    assert proc.wait(timeout=60) == 0
    return paths, other


@pytest.fixture(scope="module")
def corpus(both_corpora) -> tuple[Path, Path]:
    return both_corpora[0]


def test_same_bytes_in_another_process_with_another_hash_seed(both_corpora):
    paths, other = both_corpora
    for path in paths:
        assert (other / path.name).read_bytes() == path.read_bytes()


def test_split_is_disjoint_by_module_and_sorted(corpus):
    train, eval_ = (read_jsonl(p) for p in corpus)
    train_mods, eval_mods = [d["module"] for d in train], [d["module"] for d in eval_]
    assert train_mods == sorted(set(train_mods)) and eval_mods == sorted(set(eval_mods))
    assert not set(train_mods) & set(eval_mods)
    assert all(not is_eval_module(m, 0.1) for m in train_mods)
    assert all(is_eval_module(m, 0.1) for m in eval_mods)
    assert 0.03 < len(eval_mods) / (len(train_mods) + len(eval_mods)) < 0.2
    assert len(train_mods) + len(eval_mods) > 300


def test_no_test_or_third_party_modules(corpus):
    modules = {d["module"] for p in corpus for d in read_jsonl(p)}
    for module in modules:
        parts = module.split(".")
        assert not {"test", "tests", "idle_test"} & set(parts), module
        assert all(p.isidentifier() for p in parts), module
    assert {"json", "collections", "unittest.case"} <= modules
    assert "pip" not in modules and "torch" not in modules


def test_only_complete_files_are_left(corpus):
    assert sorted(p.name for p in corpus[0].parent.iterdir()) == ["eval.jsonl", "train.jsonl"]
    for path in corpus:
        assert all(set(d) == {"module", "text"} for d in read_jsonl(path))


def test_documents_are_english_prose(corpus):
    docs = [d for p in corpus for d in read_jsonl(p)]
    assert all(len(d["text"]) >= stdlib_docs.MIN_DOCSTRING for d in docs)
    text = "\n".join(d["text"] for d in docs)
    assert len(text) > 1_000_000
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "of", "to", "a", "and", "is", "in", "if", "be", "for", "this", "that", "or", "an"}
    assert sum(w in common for w in words) / len(words) > 0.18  # 0.23 here; Python source with comments: ~0.13
    json_doc = next(d["text"] for d in docs if d["module"] == "json")
    assert json_doc.startswith("JSON (JavaScript Object Notation)")
    assert "\n\nclass JSONDecoder:" in next(d["text"] for d in docs if d["module"] == "json.decoder")


def test_cached_corpus_dir_is_built_once(tmp_path, monkeypatch):
    fake = [{"module": f"m{i}", "text": f"Document number {i} about nothing in particular."} for i in range(50)]
    monkeypatch.setenv("ROSA_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(stdlib_docs, "stdlib_documents", lambda: fake)
    folder = stdlib_corpus_dir()
    assert folder == tmp_path / f"stdlib-docs-py{sys.version_info.major}.{sys.version_info.minor}"
    rows = read_jsonl(folder / "train.jsonl") + read_jsonl(folder / "eval.jsonl")
    assert sorted(r["module"] for r in rows) == sorted(d["module"] for d in fake)
    monkeypatch.setattr(stdlib_docs, "stdlib_documents", lambda: pytest.fail("rebuilt a cached corpus"))
    assert stdlib_corpus_dir() == folder
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken():
        raise OSError("disk full")

    monkeypatch.setattr(stdlib_docs, "stdlib_documents", broken)
    (tmp_path / f".stdlib-docs-py{sys.version_info.major}.{sys.version_info.minor}.tmp-1-dead").mkdir()  # killed build
    with pytest.raises(OSError, match="disk full"):
        stdlib_corpus_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with _cache.atomic_open(path) as f:
            f.write("new")
            raise RuntimeError
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
