"""Bad data files: one line naming the file and the problem, exit status 2, nothing written.

Each case is a file a user really fed to rosa-train (empty, binary, not UTF-8, broken JSON, a
number or nothing where the text should be). Documents without text are refused with a count and
the line of the first one rather than dropped unseen; blank paragraphs of a .txt stay skipped.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset

import rosa_scale.train as train_mod
from rosa_scale.data import DataError, build_datasets, load_documents, pack
from tests.tiny import TEXT, tiny_tokenizer, write_jsonl

TO_FIX = "fix or remove them, or name the field that holds the text with --text-field"


def _lines(*docs) -> bytes:
    return b"".join((d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n" for d in docs)


def _random_bytes(n: int) -> bytes:
    return random.Random(0).randbytes(n)  # holds zero bytes, and is not UTF-8


UNREADABLE = {  # file name: (content, what the user is told after "<path>: ")
    "empty.jsonl": (b"", "is empty"),
    "empty.txt": (b"", "is empty"),
    "blank.jsonl": (b"\n  \n\n", "holds only blank space, no text"),
    "random.jsonl": (_random_bytes(4096), "is binary, not UTF-8 text (a zero byte at offset "),
    "random.txt": (_random_bytes(4096), "is binary, not UTF-8 text (a zero byte at offset "),
    "high-bytes.txt": (bytes(range(128, 256)) * 8, "is not UTF-8 text (byte 0x80 on line 1): convert it to UTF-8"),
    "latin1.txt": ("A first paragraph.\n\nCafé au lait, naïve.\n".encode("latin-1"),
                   "is not UTF-8 text (byte 0xe9 on line 3): convert it to UTF-8"),
    "garbage.jsonl": (_lines({"text": TEXT[0]}, b"this line is not json", {"text": TEXT[1]}),
                      "line 2 is not valid JSON (Expecting value, column 1); expected one object per line"),
    "cut-short.jsonl": (_lines({"text": TEXT[0]}) + b'{"text": "half a docu',
                        "line 2 is not valid JSON (Unterminated string starting at, column 10)"),
    "numbers.jsonl": (_lines({"text": TEXT[0]}, b"5"),
                      'line 2 is not a JSON object; expected one object per line, like {"text": "..."}'),
    "broken-list.json": (b'[{"text": "a"}, {"text": ', "is not valid JSON (Expecting value on line 1, column 26)"),
    "random.parquet": (_random_bytes(4096), "is not a readable Parquet file (Parquet magic bytes not found"),
    "header-only.csv": (b"text,source\n", "has a header but no rows"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_file_is_one_line_naming_it(tmp_path, name):
    content, told = UNREADABLE[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_documents(str(path))
    assert str(err.value).startswith(f"{path}: {told}"), str(err.value)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == content  # the user's file is left as it was


def _cfg(train, eval_=None, **overrides):
    return SimpleNamespace(**{
        "dataset": str(train), "dataset_config": None, "eval_dataset": eval_ and str(eval_), "eval_fraction": 0.05,
        "seed": 0, "text_field": "text", "block_size": 16, "max_train_blocks": None, "max_eval_blocks": 64,
        "packing": "concatenated",
        **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def good_eval(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("good") / "eval.jsonl", TEXT)


def test_missing_and_null_text_is_refused_with_count_and_line(tmp_path, tokenizer, good_eval):
    path = tmp_path / "half.jsonl"  # half a corpus without text was once dropped without a word
    path.write_bytes(_lines({"text": TEXT[0]}, {"body": TEXT[1]}, {"text": None}, {"text": TEXT[2]}))
    with pytest.raises(DataError) as err:
        build_datasets(_cfg(path, good_eval), tokenizer)
    assert str(err.value) == (f"{path}: 2 of 4 documents have no text in field 'text' (2 missing or null); "
                              f"the first is line 2 (missing or null): {TO_FIX}")


def test_integer_text_is_refused_not_an_attribute_error(tmp_path, tokenizer, good_eval):
    mixed, numbers = tmp_path / "mixed.jsonl", tmp_path / "numbers.jsonl"
    mixed.write_bytes(_lines({"text": TEXT[0]}, {"text": 7}, {"text": [1, 2]}, {"text": None}))
    numbers.write_bytes(_lines({"text": 1}, {"text": 2}))
    with pytest.raises(DataError) as err:
        build_datasets(_cfg(mixed, good_eval), tokenizer)
    assert str(err.value) == (f"{mixed}: 3 of 4 documents have no text in field 'text' (1 missing or null, "
                              f"2 not a string); the first is line 2 (int 7): {TO_FIX}")
    with pytest.raises(DataError, match=r"2 of 2 documents .* \(2 not a string\); the first is line 1 \(int 1\)"):
        build_datasets(_cfg(numbers, good_eval), tokenizer)


def test_pack_refuses_null_text_of_any_dataset(tokenizer):
    docs = Dataset.from_dict({"text": [TEXT[0], None, TEXT[1]]})
    with pytest.raises(DataError) as err:
        pack(docs, tokenizer, "text", 16, source="my documents")
    assert str(err.value) == (f"my documents: 1 of 3 documents have no text in field 'text' (1 missing or null); "
                              f"the first is document 2 (missing or null): {TO_FIX}")


def test_empty_and_blank_documents_stay_skipped_quietly(tmp_path, tokenizer):
    txt = tmp_path / "paragraphs.txt"
    txt.write_text(f"{TEXT[0]}\n\n   \n\n\n\n{TEXT[1]}\n\n \t \n\n{TEXT[2]}\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(_lines({"text": TEXT[0]}, {"text": ""}, {"text": "  \n "}, {"text": TEXT[1]}, {"text": TEXT[2]}))
    expected = pack(Dataset.from_dict({"text": TEXT[:3]}), tokenizer, "text", 8)[:]["input_ids"].tolist()
    for path in (txt, jsonl):
        assert pack(load_documents(str(path)), tokenizer, "text", 8)[:]["input_ids"].tolist() == expected


def test_a_folder_names_the_bad_file(tmp_path, tokenizer, good_eval):
    broken, holes = tmp_path / "broken", tmp_path / "holes"
    write_jsonl(broken / "a.jsonl", TEXT)
    (broken / "b.jsonl").write_bytes(_lines({"text": TEXT[0]}, b"{oops"))
    with pytest.raises(DataError, match=r"^" + str(broken / "b.jsonl") + r": line 2 is not valid JSON"):
        load_documents(str(broken))
    write_jsonl(holes / "a.jsonl", TEXT)
    (holes / "sub").mkdir()
    (holes / "sub" / "b.jsonl").write_bytes(_lines({"text": TEXT[0]}, b"", {"text": TEXT[1]}, {"text": None}))
    with pytest.raises(DataError) as err:
        build_datasets(_cfg(holes, good_eval), tokenizer)
    assert str(err.value) == (f"{holes}: 1 of 9 documents have no text in field 'text' (1 missing or null); "
                              f"the first is line 4 of {holes / 'sub' / 'b.jsonl'} (missing or null): {TO_FIX}")
    fields = tmp_path / "fields"
    write_jsonl(fields / "a.jsonl", TEXT)
    (fields / "b.jsonl").write_bytes(_lines({"text": TEXT[0], "url": "https://example.org"}))
    with pytest.raises(DataError, match=r"^" + str(fields / "b.jsonl") + r": has field\(s\) url that "):
        load_documents(str(fields))


def test_eval_dataset_gets_the_same_checks(tmp_path, tokenizer, good_eval):
    latin, nulls = tmp_path / "heldout.txt", tmp_path / "heldout.jsonl"
    latin.write_bytes("déjà vu\n".encode("latin-1"))
    nulls.write_bytes(_lines({"text": TEXT[0]}, {"text": None}))
    with pytest.raises(DataError, match=r"^" + str(latin) + r": is not UTF-8 text \(byte 0xe9 on line 1\)"):
        build_datasets(_cfg(good_eval, latin), tokenizer)
    with pytest.raises(DataError, match=r"^" + str(nulls) + r": 1 of 2 documents .* the first is line 2"):
        build_datasets(_cfg(good_eval, nulls), tokenizer)


def test_csv_keeps_the_words_na_and_none_as_text(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("text,n\nhello there,1\nNA,2\nNone,3\nnull,4\n")
    assert load_documents(str(path))[:]["text"] == ["hello there", "NA", "None", "null"]
    path.write_text("text,n\nhello there,1\n,2\n")
    with pytest.raises(DataError, match=r"1 of 2 documents .* the first is row 2 below the header"):
        build_datasets(_cfg(path), tiny_tokenizer())


# Through the command line: main() as the rosa-train entry point runs it, then once as a real process.

def _run_main(args, capsys):
    code = train_mod.main(args)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("rosa-train: error:")], err


@pytest.mark.parametrize("fault", ["binary-train", "null-eval", "folder"])
def test_rosa_train_one_error_line_exit_2_nothing_written(fault, tmp_path, tiny_model_dir, good_eval, capsys,
                                                          monkeypatch):
    monkeypatch.delenv("ROSA_SCALE_DEBUG", raising=False)
    train, held = tmp_path / "train.jsonl", good_eval
    if fault == "binary-train":
        train.write_bytes(_random_bytes(2048))
        bad, told = train, "is binary, not UTF-8 text"
    elif fault == "null-eval":
        write_jsonl(train, TEXT * 20)
        held = tmp_path / "held.jsonl"
        held.write_bytes(_lines({"text": TEXT[0]}, {"text": None}, {"text": None}))
        bad, told = held, "2 of 3 documents have no text in field 'text'"
    else:
        train = tmp_path / "corpus"
        write_jsonl(train / "a.jsonl", TEXT * 20)
        (train / "c.jsonl").write_bytes(_lines({"text": TEXT[0]}) + b"<html>not json</html>\n")
        bad, told = train / "c.jsonl", "line 2 is not valid JSON"
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model.safetensors").write_bytes(b"an earlier good run")
    code, errors, err = _run_main(["--model", str(tiny_model_dir), "--dataset", str(train), "--eval-dataset",
                                   str(held), "--block-size", "32", "--max-steps", "1", "--output-dir", str(out)],
                                  capsys)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"rosa-train: error: {bad}: ") and told in errors[0], errors[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["merged", "merged/model.safetensors"]
    assert (out / "merged" / "model.safetensors").read_bytes() == b"an earlier good run"


def test_rosa_train_process_latin1_text(tmp_path, tiny_model_dir, good_eval):
    train = tmp_path / "notes.txt"
    train.write_bytes("Première ligne.\n\nDeuxième paragraphe.\n".encode("latin-1"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rosa_scale.train", "--model", str(tiny_model_dir), "--dataset",
                           str(train), "--eval-dataset", str(good_eval), "--block-size", "32", "--max-steps", "1",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1],
                          env={**{k: v for k, v in os.environ.items() if k != "ROSA_SCALE_DEBUG"},
                               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rosa-train: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [f"rosa-train: error: {train}: is not UTF-8 text (byte 0xe8 on line 1): convert it to UTF-8"]
    assert not out.exists() or not any(out.iterdir())
