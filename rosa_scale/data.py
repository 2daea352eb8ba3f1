"""Text data for causal-LM fine-tuning through `datasets`: load, hold out, tokenize, pack.

Documents are tokenized, each ended with the EOS token, and packed into blocks of ``block_size``
tokens as ``rosa_scale.packing`` says: several documents per block that do not see each other
(position ids restarting per document), one document per block with padding, or one stream.

Bad data stops the run with one `DataError` line that names the file and the problem: a file
`datasets` cannot read (empty, binary, not UTF-8, broken JSON/CSV/Parquet), and documents whose
text is missing, null or not a string (skipping them would shrink the corpus unnoticed). Good
data pays nothing for this: files are examined only after `datasets` failed on them, and the
text column only when its type or null count (Arrow metadata) shows a problem.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .chat_data import data_format, to_blocks, torch_blocks
from .data_checks import READ_ERRORS, DataError, check_text, find_bad_file, first_line, positions
from .packing import IGNORE, document_positions, resolve_mode

__all__ = ["DataError", "build_datasets", "check_text", "load_documents", "pack", "train_eval_split"]

BUILTIN_STDLIB = "builtin:stdlib-docs"
_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
_EVAL_SPLITS = ("validation", "valid", "eval", "test")


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
                        f"{first_line(err)}") from None


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
    except READ_ERRORS as err:
        problem = find_bad_file(loader, files, spec, err, _read)
        if problem is None:  # not the data (a full disk, an unwritable cache): the real error is clearer
            raise
        raise DataError(problem) from None
    if len(docs) == 0:
        raise DataError(f"{spec}: holds no documents")
    return docs


def _file_locator(spec: str) -> Callable[[int], str]:
    """Document index -> 'line 7' (one file) or 'line 7 of dir/b.jsonl' (a folder), 'document 8' if not local."""
    def where(index: int) -> str:
        path = Path(spec).expanduser()
        if path.exists():
            loader, files = _local_files(path)
            rows = ((file, label) for file in files for label in positions(loader, file))
            found = next(itertools.islice(rows, index, None), None)
            if found is not None:
                return found[1] if len(files) == 1 else f"{found[1]} of {found[0]}"
        return f"document {index + 1}"

    return where


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
         *, source: str = "the data", mode: str = "concatenated") -> Dataset:
    """Tokenize ``docs[text_field]``, end each document with EOS and cut blocks of ``block_size``.

    ``mode`` (``rosa_scale.packing``): ``concatenated`` joins the documents into one stream cut into
    full blocks of ``input_ids``; ``documents`` does the same and adds ``position_ids`` restarting at
    each document, so none attends to another (a document's first token stays the target of the
    EOS before it, as in one stream: every token counts, so each block weighs the same); ``padded`` cuts each document alone, padding its last
    block (``labels`` -100 there). ``source`` names the data in error messages.
    """
    check_text(docs, text_field, source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate packed documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def documents(batch) -> list[list[int]]:
        return [tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
                for text in batch[text_field] if text and text.strip()]

    def joined(batch):
        ids = [token for doc in documents(batch) for token in doc]
        usable = len(ids) // block_size * block_size
        blocks = {"input_ids": [ids[i:i + block_size] for i in range(0, usable, block_size)]}
        if mode == "documents":
            blocks["position_ids"] = [document_positions(block, eos) for block in blocks["input_ids"]]
        return blocks

    def padded(batch):
        out = {"input_ids": [], "labels": []}
        for doc in documents(batch):
            for i in range(0, len(doc), block_size):
                piece = doc[i:i + block_size]
                if len(piece) < 2:  # nothing to predict
                    continue
                fill = block_size - len(piece)
                out["input_ids"].append(piece + [pad] * fill)
                out["labels"].append(piece + [IGNORE] * fill)
        return out

    blocks = docs.map(padded if mode == "padded" else joined, batched=True, batch_size=256,
                      remove_columns=docs.column_names, desc="tokenizing")
    return torch_blocks(blocks, max_blocks, f"{source} holds fewer than block_size={block_size} tokens: nothing to train on")


def build_datasets(cfg, tokenizer, model_path: str | None = None) -> tuple[Dataset, Dataset]:
    """Train and eval blocks for a TrainConfig, packed as ``cfg.packing`` says (``auto`` and
    ``documents`` ask the model at ``model_path`` whether it keeps packed documents apart); bad
    documents are refused before the hold-out shuffles them, so a message can point at the file and line."""
    train_docs = load_documents(cfg.dataset, cfg.dataset_config)
    eval_docs = load_documents(cfg.eval_dataset) if cfg.eval_dataset else None
    for spec, docs in ((cfg.dataset, train_docs), (cfg.eval_dataset, eval_docs)):
        if isinstance(docs, Dataset) and data_format(docs) == "text":
            check_text(docs, cfg.text_field, spec, _file_locator(spec))
    train_docs, eval_docs = train_eval_split(train_docs, eval_docs, cfg.eval_fraction, cfg.seed, source=cfg.dataset)
    held_source = cfg.eval_dataset or f"the held-out part of {cfg.dataset}"
    kind = data_format(train_docs)
    mode = resolve_mode(cfg.packing, model_path, plain_text=kind == "text", attn_implementation=cfg.attn_implementation)
    if kind != "text":  # chat or instruction data: the loss on the answers only
        if data_format(eval_docs) != kind:
            raise DataError(f"{held_source} is not {kind} data like {cfg.dataset}")
        return (to_blocks(train_docs, tokenizer, cfg.block_size, cfg.max_train_blocks, source=cfg.dataset, mode=mode),
                to_blocks(eval_docs, tokenizer, cfg.block_size, cfg.max_eval_blocks, source=held_source, mode=mode))
    train = pack(train_docs, tokenizer, cfg.text_field, cfg.block_size, cfg.max_train_blocks, source=cfg.dataset,
                 mode=mode)
    held = pack(eval_docs, tokenizer, cfg.text_field, cfg.block_size, cfg.max_eval_blocks, source=held_source,
                mode=mode)
    return train, held
