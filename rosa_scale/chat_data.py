"""Instruction and chat data: the loss on the answers only.

A dataset with a ``messages`` column (lists of ``{"role", "content"}``) is rendered with the
tokenizer's chat template; one with ``prompt`` and ``completion`` columns is the prompt's tokens
followed by the completion's and EOS. ``labels`` are the input ids on the assistant's (completion's)
tokens and -100 everywhere else, so only the answers are learned. An example longer than
``block_size`` is cut at the end. Examples share blocks without seeing each other where the model
allows it (``rosa_scale.packing``); otherwise each fills one block, padded after it with labels -100:
under causal attention the padding after an example is never seen by it, so no attention mask is needed.
"""
from __future__ import annotations

from datasets import Dataset

from .data_checks import DataError
from .packing import IGNORE, pack_examples
FORMATS = ("messages", "prompt_completion")


def data_format(docs: Dataset) -> str:
    """``messages``, ``prompt_completion`` or ``text``, from the dataset's columns."""
    columns = set(docs.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    return "text"


def _render(tokenizer, messages: list, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding in transformers 5


def messages_example(tokenizer, messages, where: str) -> tuple[list[int], list[int]]:
    """Input ids of a rendered conversation and labels that keep the assistant turns' tokens only.

    Each assistant turn's tokens are found by rendering the conversation up to it (with the
    template's generation prompt) and up to its end: what the template adds in between is the
    turn, its end-of-turn marker included. A template whose renderings are not prefixes of one
    another cannot be split so, and is refused."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: 'messages' data needs one (or use prompt/completion)")
    ids = _render(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[:i + 1])
        if ids[:len(upto)] != upto or start > len(upto):
            raise DataError(f"{where}: the tokenizer's chat template renders a conversation's beginning "
                            "differently from the whole: cannot tell the assistant's tokens apart")
        labels[start:len(upto)] = ids[start:len(upto)]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return ids, labels


def prompt_completion_example(tokenizer, prompt, completion, where: str) -> tuple[list[int], list[int]]:
    """The prompt's tokens (no loss), then the completion's and EOS (learned)."""
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: 'prompt' and 'completion' must be strings, the completion non-empty")
    head = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


def to_blocks(docs: Dataset, tokenizer, block_size: int, max_blocks: int | None, *, source: str,
              mode: str = "padded") -> Dataset:
    """Blocks of ``input_ids`` and ``labels``: one example each (``mode`` ``padded``), or as many as
    fit, with ``position_ids`` restarting at each (``documents``, ``rosa_scale.packing``). Examples
    whose answer lies wholly past ``block_size`` are left out, and if that leaves none, one
    ``DataError`` line says so."""
    kind = data_format(docs)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to pad chat examples with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(batch, indices):
        examples = []
        for k, index in enumerate(indices):
            where = f"{source}: example {index + 1}"
            if kind == "messages":
                ids, labels = messages_example(tokenizer, batch["messages"][k], where)
            else:
                ids, labels = prompt_completion_example(tokenizer, batch["prompt"][k], batch["completion"][k], where)
            ids, labels = ids[:block_size], labels[:block_size]
            if all(label == IGNORE for label in labels[1:]):  # nothing left to predict in this block
                continue
            examples.append((ids, labels))
        if mode == "documents":
            return pack_examples(examples, block_size, pad)
        return {"input_ids": [ids + [pad] * (block_size - len(ids)) for ids, _ in examples],
                "labels": [labels + [IGNORE] * (block_size - len(labels)) for _, labels in examples]}

    blocks = docs.map(encode, batched=True, batch_size=256, with_indices=True, remove_columns=docs.column_names,
                      desc="tokenizing")
    return torch_blocks(blocks, max_blocks, f"{source}: no example has an answer within block_size={block_size} tokens")


def torch_blocks(blocks: Dataset, max_blocks: int | None, empty: str) -> Dataset:
    """The first ``max_blocks`` blocks as torch tensors; ``empty`` is the ``DataError`` line when there are none."""
    if len(blocks) == 0:
        raise DataError(empty)
    if max_blocks is not None and len(blocks) > max_blocks:
        blocks = blocks.select(range(max_blocks))
    return blocks.with_format("torch")
