"""Text data for causal-LM fine-tuning through `datasets`: load, hold out, tokenize, pack.

Documents are tokenized, joined with the EOS token and cut into blocks of ``block_size``
tokens, so every batch is full and no token is padding.

Bad data stops the run with one `DataError` line that names the file and the problem: a file
`datasets` cannot read (empty, binary, not UTF-8, broken JSON/CSV/Parquet), and documents whose
text is missing, null or not a string (skipping them would shrink the corpus unnoticed). Good
data pays nothing for this: files are examined only after `datasets` failed on them, and the
text column only when its type or null count (Arrow metadata) shows a problem.
"""
from __future__ import annotations

import codecs
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

BUILTIN_STDLIB = "builtin:stdlib-docs"
_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
_KINDS = {"text": "text", "json": "JSON", "parquet": "Parquet", "csv": "CSV"}
_EVAL_SPLITS = ("validation", "valid", "eval", "test")
# What `datasets` raises on a local file it cannot read: its wrapper around the reader's error;
# the readers' own errors when they come while it sniffs the schema (pyarrow's, pandas' and
# json's are ValueErrors, an unreadable file an OSError); StopIteration from an empty JSON file.
_READ_ERRORS = (DatasetGenerationError, ValueError, OSError, StopIteration)


class DataError(ValueError):
    """Data that cannot be used for training; the message names the problem."""


def _looks_like_path(spec: str) -> bool:
    """Hub names look like 'owner/name'; anything else path-like is meant as a local path."""
    return spec.startswith((".", "/", "~")) or Path(spec).suffix in _LOADERS


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _LOADERS)
    if not files:
        raise DataError(f"no .txt/.json/.jsonl/.parquet/.csv files found in {path}")
    loaders = {_LOADERS.get(p.suffix) for p in files}
    if None in loaders:
        raise DataError(f"unsupported data file type {files[0].suffix!r}: use .txt, .json, .jsonl, .parquet or .csv")
    if len(loaders) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(loaders))}); keep one kind per dataset")
    return loaders.pop(), [str(p) for p in files]


def load_documents(spec: str, config_name: str | None = None) -> Dataset | DatasetDict:
    """A local file/folder, `builtin:stdlib-docs`, or a hub dataset name -> datasets object."""
    if spec == BUILTIN_STDLIB:
        from .builtin import stdlib_corpus_dir

        folder = stdlib_corpus_dir()
        return load_dataset("json", data_files={"train": str(folder / "train.jsonl"),
                                                "validation": str(folder / "eval.jsonl")})
    if spec.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {spec!r}; the built-in one is {BUILTIN_STDLIB!r}")
    path = Path(spec).expanduser()
    if path.exists():
        loader, files = _local_files(path)
        return _load_files(loader, files, spec)
    if _looks_like_path(spec):
        raise DataError(f"dataset path not found: {spec}")
    try:
        return load_dataset(spec, config_name)
    except Exception as err:  # the hub raises many kinds; the user needs one line
        raise DataError(f"dataset {spec!r} is not a local path and could not be loaded from the hub: "
                        f"{_first_line(err)}") from None


def _read(loader: str, files: list[str]) -> Dataset:
    # Only an empty CSV cell is missing: by default pandas also reads the documents "NA", "None" or
    # "null" as missing values, which would drop them.
    kwargs = {"text": {"sample_by": "paragraph"},
              "csv": {"keep_default_na": False, "na_values": [""]}}.get(loader, {})
    parquet_log = logging.getLogger("datasets.packaged_modules.parquet.parquet")
    parquet_log.addFilter(_drop_schema_error)  # a bad Parquet file becomes our one DataError line instead
    try:
        return load_dataset(loader, data_files={"train": files}, **kwargs)["train"]
    finally:
        parquet_log.removeFilter(_drop_schema_error)


def _drop_schema_error(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to read schema from")


def _load_files(loader: str, files: list[str], spec: str) -> Dataset:
    """Local files through `datasets`; where it fails, a DataError naming the file at fault and why."""
    try:
        docs = _read(loader, files)
    except _READ_ERRORS as err:
        problem = _find_bad_file(loader, files, spec, err)
        if problem is None:  # not the data (a full disk, an unwritable cache): the real error is clearer
            raise
        raise DataError(problem) from None
    if len(docs) == 0:
        raise DataError(f"{spec}: holds no documents")
    return docs


def _find_bad_file(loader: str, files: list[str], spec: str, err: BaseException) -> str | None:
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
            features[file] = _read(loader, [file]).features
        except _READ_ERRORS as file_err:
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
    return f"{culprit}: cannot be read as {_KINDS[loader]} ({_first_line(_root(cause))}){hint}"


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
        return f"is not valid CSV ({_first_line(err)})"
    return None if rows else "has a header but no rows"


def _parquet_problem(file: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except (pa.ArrowException, OSError) as err:  # pyarrow reports some corruption as OSError
        return f"is not a readable Parquet file ({_first_line(err)})"
    return None if rows else "holds no rows"


def _root(err: BaseException) -> BaseException:
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _type_name(feature) -> str:
    return feature.dtype if isinstance(feature, Value) else type(feature).__name__


def _positions(loader: str, file: str) -> Iterator[str]:
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


def _file_locator(spec: str) -> Callable[[int], str]:
    """Document index -> 'line 7' (one file) or 'line 7 of dir/b.jsonl' (a folder), 'document 8' if not local."""
    def where(index: int) -> str:
        path = Path(spec).expanduser()
        if path.exists():
            loader, files = _local_files(path)
            rows = ((file, label) for file in files for label in _positions(loader, file))
            found = next(itertools.islice(rows, index, None), None)
            if found is not None:
                return found[1] if len(files) == 1 else f"{found[1]} of {found[0]}"
        return f"document {index + 1}"

    return where


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


def train_eval_split(train: Dataset | DatasetDict, eval_: Dataset | DatasetDict | None,
                     eval_fraction: float, seed: int, *, source: str = "dataset") -> tuple[Dataset, Dataset]:
    """Pick the train split and a held-out split: given, named validation/test, or carved out."""
    held = None
    if isinstance(train, DatasetDict):
        held = next((train[s] for s in _EVAL_SPLITS if s in train), None)
        if "train" not in train:
            raise DataError(f"dataset has no 'train' split (it has: {', '.join(train)})")
        train = train["train"]
    if isinstance(eval_, DatasetDict):
        held = next((eval_[s] for s in _EVAL_SPLITS if s in eval_), eval_[next(iter(eval_))])
    elif eval_ is not None:
        held = eval_
    if held is None:
        if len(train) < 2:
            raise DataError(f"{source} has fewer than 2 documents: cannot hold any out for evaluation "
                            "(give --eval-dataset)")
        parts = train.train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
        train, held = parts["train"], parts["test"]
    return train, held


def pack(docs: Dataset, tokenizer, text_field: str, block_size: int, max_blocks: int | None = None,
         *, source: str = "the data") -> Dataset:
    """Tokenize ``docs[text_field]``, join with EOS, cut into ``block_size`` blocks of ``input_ids``.

    ``source`` names the data in error messages.
    """
    check_text(docs, text_field, source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate packed documents")

    def tokenize_and_pack(batch):
        ids: list[int] = []
        for text in batch[text_field]:
            if text and text.strip():
                ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                ids.append(eos)
        usable = len(ids) // block_size * block_size
        return {"input_ids": [ids[i:i + block_size] for i in range(0, usable, block_size)]}

    blocks = docs.map(tokenize_and_pack, batched=True, batch_size=256, remove_columns=docs.column_names,
                      desc="tokenizing")
    if len(blocks) == 0:
        raise DataError(f"{source} holds fewer than block_size={block_size} tokens: nothing to train on")
    if max_blocks is not None and len(blocks) > max_blocks:
        blocks = blocks.select(range(max_blocks))
    return blocks.with_format("torch")


def build_datasets(cfg, tokenizer) -> tuple[Dataset, Dataset]:
    """Packed train and eval blocks for a TrainConfig; bad documents are refused before the hold-out
    shuffles them, so a message can point at the file and line."""
    train_docs = load_documents(cfg.dataset, cfg.dataset_config)
    eval_docs = load_documents(cfg.eval_dataset) if cfg.eval_dataset else None
    for spec, docs in ((cfg.dataset, train_docs), (cfg.eval_dataset, eval_docs)):
        if isinstance(docs, Dataset):
            check_text(docs, cfg.text_field, spec, _file_locator(spec))
    train_docs, eval_docs = train_eval_split(train_docs, eval_docs, cfg.eval_fraction, cfg.seed, source=cfg.dataset)
    train = pack(train_docs, tokenizer, cfg.text_field, cfg.block_size, cfg.max_train_blocks, source=cfg.dataset)
    held = pack(eval_docs, tokenizer, cfg.text_field, cfg.block_size, cfg.max_eval_blocks,
                source=cfg.eval_dataset or f"the held-out part of {cfg.dataset}")
    return train, held
