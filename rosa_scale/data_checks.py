"""Why a data file cannot be used, in one line naming the file: the diagnosis behind `DataError`.

`datasets` reports a bad local file with a long traceback that rarely names it; these functions run
only after it failed (or, for the text column, only when Arrow's metadata shows a problem), so good
data pays nothing for them. Documents whose text is missing, null or not a string are refused rather
than dropped: skipping them would shrink a corpus unnoticed (half of one, once).
"""
from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Value
from datasets.exceptions import DatasetGenerationError

KINDS = {"text": "text", "json": "JSON", "parquet": "Parquet", "csv": "CSV"}
# What `datasets` raises on a local file it cannot read: its wrapper around the reader's error;
# the readers' own errors when they come while it sniffs the schema (pyarrow's, pandas' and
# json's are ValueErrors, an unreadable file an OSError); StopIteration from an empty JSON file.
READ_ERRORS = (DatasetGenerationError, ValueError, OSError, StopIteration)


class DataError(ValueError):
    """Data that cannot be used for training; the message names the problem."""


def find_bad_file(loader: str, files: list[str], spec: str, err: BaseException,
                  read: Callable[[str, list[str]], Dataset]) -> str | None:
    """The first file with a problem we can name, else the first `datasets` cannot read alone, else
    a file whose fields differ from the first file's (`datasets` reads a folder as one table)."""
    for file in files:
        problem = _file_problem(loader, file)
        if problem:
            return f"{file}: {problem}"
    if isinstance(_root(err), OSError) and _root(err).errno is not None:
        return None
    culprit, cause = (files[0], err) if len(files) == 1 else (None, None)
    features = {}
    for file in files if culprit is None else ():
        try:
            features[file] = read(loader, [file]).features
        except READ_ERRORS as file_err:
            culprit, cause = file, file_err
            break
    if culprit is None:
        first = files[0]
        for file in files[1:]:
            extra = [name for name in features[file] if name not in features[first]]
            if extra:
                return (f"{file}: has field(s) {', '.join(extra)} that {first} lacks; "
                        "give every file of a folder the same fields")
            other = [name for name in features[file] if features[file][name] != features[first][name]]
            if other:
                return (f"{file}: field {other[0]!r} holds {_type_name(features[file][other[0]])} but "
                        f"{_type_name(features[first][other[0]])} in {first}; keep one type per field")
        culprit, cause = spec, err
    hint = _json_mixed_types(culprit) if loader == "json" and os.path.isfile(culprit) else ""
    return f"{culprit}: cannot be read as {KINDS[loader]} ({first_line(_root(cause))}){hint}"


def _file_problem(loader: str, file: str) -> str | None:
    """What is wrong with one data file, in words, or None if nothing we can see."""
    try:
        if os.path.getsize(file) == 0:
            return "is empty"
        if loader == "parquet":
            return _parquet_problem(file)
        return _text_problem(file) or {"json": _json_problem, "csv": _csv_problem}.get(loader, lambda _: None)(file)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"


def _text_problem(file: str) -> str | None:
    """Binary, not UTF-8 (what `datasets` decodes with, so say where), or blank."""
    lines, pending, blank = 1, b"", True
    with open(file, "rb") as f:
        head = f.read(8192)
        zero = head.find(b"\0")
        if zero >= 0:
            return f"is binary, not UTF-8 text (a zero byte at offset {zero})"
        f.seek(0)
        while chunk := f.read(1 << 20):
            data = pending + chunk
            try:
                text, used = codecs.utf_8_decode(data, "strict", False)
            except UnicodeDecodeError as err:
                line = lines + data.count(b"\n", 0, err.start)
                return f"is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): convert it to UTF-8"
            blank = blank and not text.strip()
            lines += data.count(b"\n", 0, used)
            pending = data[used:]
    if pending:
        return f"is not UTF-8 text (it ends inside a character, on line {lines}): convert it to UTF-8"
    return "holds only blank space, no text" if blank else None


def _json_problem(file: str) -> str | None:
    """The first line that is not one JSON object (JSON Lines), or what breaks a JSON list."""
    with open(file, encoding="utf-8-sig") as f:
        if f.read(4096).lstrip().startswith("["):
            f.seek(0)
            try:
                docs = json.load(f)
            except json.JSONDecodeError as err:
                return f"is not valid JSON ({err.msg} on line {err.lineno}, column {err.colno})"
            item = next((i for i, doc in enumerate(docs, 1) if not isinstance(doc, dict)), None)
            if item is not None:
                return f"item {item} of its JSON list is not an object like {{\"text\": \"...\"}}"
            return None if docs else "holds an empty JSON list"
        f.seek(0)
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno}); expected one object per line"
            if not isinstance(doc, dict):
                return f"line {number} is not a JSON object; expected one object per line, like {{\"text\": \"...\"}}"
    return None


def _json_mixed_types(file: str) -> str:
    """A hint for JSON Lines `datasets` could not read: a field whose type changes between lines."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    seen: dict[str, tuple[str, int]] = {}
    with open(file, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            try:
                doc = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                return ""
            for key, value in doc.items() if isinstance(doc, dict) else ():
                if value is None:
                    continue
                kind = names.get(type(value), type(value).__name__)
                first = seen.setdefault(key, (kind, number))
                if first[0] != kind:
                    return f"; field {key!r} is {first[0]} on line {first[1]} but {kind} on line {number}"
    return ""


def _csv_problem(file: str) -> str | None:
    import pandas as pd  # what `datasets` reads CSV with

    try:
        rows = sum(len(part) for part in pd.read_csv(file, chunksize=1 << 16))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return f"is not valid CSV ({first_line(err)})"
    return None if rows else "has a header but no rows"


def _parquet_problem(file: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except (pa.ArrowException, OSError) as err:  # pyarrow reports some corruption as OSError
        return f"is not a readable Parquet file ({first_line(err)})"
    return None if rows else "holds no rows"


def _root(err: BaseException) -> BaseException:
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return err


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _type_name(feature) -> str:
    return feature.dtype if isinstance(feature, Value) else type(feature).__name__


def positions(loader: str, file: str) -> Iterator[str]:
    """Where each document of a file is, in the order `datasets` reads them (for error messages)."""
    if loader == "json":
        with open(file, encoding="utf-8-sig") as f:
            if f.read(1) == "[":  # as `datasets` tells a JSON list from JSON Lines
                f.seek(0)
                yield from (f"item {i}" for i in range(1, len(json.load(f)) + 1))
                return
        with open(file, "rb") as f:  # blank lines hold no document
            yield from (f"line {number}" for number, line in enumerate(f, 1) if line.strip())
    elif loader == "csv":
        import pandas as pd

        rows = sum(len(part) for part in pd.read_csv(file, chunksize=1 << 16))
        yield from (f"row {i} below the header" for i in range(1, rows + 1))
    elif loader == "parquet":
        import pyarrow.parquet as pq

        yield from (f"row {i}" for i in range(1, pq.ParquetFile(file).metadata.num_rows + 1))


def check_text(docs: Dataset, text_field: str, source: str = "the dataset",
               where: Callable[[int], str] | None = None) -> None:
    """Refuse documents whose ``text_field`` is missing, null or not a string.

    Such documents would otherwise be dropped without a word (half a corpus, once). Free on good
    data: the column's type and null count are Arrow metadata. Empty and blank strings are
    documents without tokens, skipped by `pack` as before. ``where`` turns a row index into a
    place the user can find ('line 7 of b.jsonl').
    """
    if text_field not in docs.column_names:
        raise DataError(f"{source}: text field {text_field!r} not in the dataset "
                        f"(columns: {', '.join(docs.column_names)})")
    feature = docs.features[text_field]
    is_string = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    if is_string and docs.data.column(text_field).null_count == 0:
        return
    column = docs.select_columns([text_field]).with_format("arrow")[:][text_field]  # the selected rows only
    if isinstance(column.type, pa.BaseExtensionType):  # datasets' Json feature: JSON text in a string column
        column = pa.chunked_array([chunk.storage for chunk in column.chunks], column.type.storage_type)
    json_feature = getattr(datasets, "Json", None)
    if is_string:
        bad = column.is_null()
    elif json_feature is not None and isinstance(feature, json_feature):  # mixed JSON types, kept as JSON text
        bad = pc.invert(pc.fill_null(pc.starts_with(column, '"'), False))
    else:
        bad = pa.repeat(True, len(column))
    count = pc.sum(bad).as_py() or 0
    if count == 0:
        return
    first = pc.index(bad, True).as_py()
    value = docs[first][text_field]
    parts = [f"{column.null_count} missing or null" if column.null_count else "",
             f"{count - column.null_count} not a string" if count > column.null_count else ""]
    shown = "missing or null" if value is None else f"{type(value).__name__} {_short(value)}"
    place = where(first) if where else f"document {first + 1}"
    raise DataError(f"{source}: {count} of {len(docs)} documents have no text in field {text_field!r} "
                    f"({', '.join(p for p in parts if p)}); the first is {place} ({shown}): fix or remove them, "
                    "or name the field that holds the text with --text-field")


def _short(value, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."
