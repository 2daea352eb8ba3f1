"""Token streams for the quality study, made once on a CPU machine and carried to the GPU.

Two corpora, each with train / validation / test token streams (documents joined by EOS):
- austen: five novels train (the last 5% of each is the validation split), `persuasion.txt` is
  the test set, never seen while choosing anything;
- stdlib: the Python standard-library documentation corpus of the demo; its held-out documents
  are split alternately into validation and test.
Saved as one ``torch.save`` file of int32 tensors, so the GPU side needs no tokenizer or datasets.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

AUSTEN_TRAIN = ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility")
AUSTEN_TEST = "persuasion"
VAL_FRACTION = 0.05


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def austen(tokenizer, folder: Path) -> dict[str, torch.Tensor]:
    """Train on five novels minus their last 5%; validate on those tails; test on Persuasion."""
    train, val = [], []
    for name in AUSTEN_TRAIN:
        ids = _stream(tokenizer, [(folder / f"{name}.txt").read_text()])
        cut = int(len(ids) * (1 - VAL_FRACTION))
        train.append(ids[:cut])
        val.append(ids[cut:])
    test = _stream(tokenizer, [(folder / f"{AUSTEN_TEST}.txt").read_text()])
    return {"train": torch.cat(train), "validation": torch.cat(val), "test": test}


def stdlib(tokenizer) -> dict[str, torch.Tensor]:
    """The demo's corpus: its train documents; its held-out documents alternate validation / test."""
    from rosa_scale.data import BUILTIN_STDLIB, load_documents

    docs = load_documents(BUILTIN_STDLIB)
    held = docs["validation"]["text"]
    return {"train": _stream(tokenizer, docs["train"]["text"]),
            "validation": _stream(tokenizer, held[0::2]), "test": _stream(tokenizer, held[1::2])}


def main() -> None:
    from rosa_scale.loading import load_tokenizer, resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--austen", default="../shared/data/austen", help="folder with the six novels (.txt)")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="whose tokenizer to use")
    parser.add_argument("--out", required=True, help="output .pt file")
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    data = {"austen": austen(tokenizer, Path(args.austen)), "stdlib": stdlib(tokenizer)}
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.rename(out)
    for corpus, splits in data.items():
        print(corpus, {k: len(v) for k, v in splits.items()})


if __name__ == "__main__":
    main()
