"""Chat and instruction data: labels keep exactly the answers' tokens, blocks are padded after each
example, and rosa-train learns from prompt/completion data."""
import json

import pytest

from rosa_scale.chat_data import IGNORE, messages_example, prompt_completion_example, to_blocks
from rosa_scale.data_checks import DataError
from tests.tiny import tiny_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MARKERS = {CHATML: ["<|im_start|>", "<|im_end|>"],
           LLAMA3: ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris, on the Seine."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def _tokenizer(template):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": MARKERS[template]})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_labels_are_the_assistant_turns_exactly(template):
    """Against the characters: a token is learned iff it lies in an assistant turn, from its content's
    first character to the end of its end-of-turn marker (found in the rendered text, not by the code)."""
    tok = _tokenizer(template)
    ids, labels = messages_example(tok, CHAT, "chat.jsonl: example 1")
    text = tok.apply_chat_template(CHAT, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    end_marker = MARKERS[template][-1] if template == LLAMA3 else "<|im_end|>\n"
    spans, pos = [], 0
    for m in CHAT:
        start = text.index(m["content"], pos)
        end = text.index(end_marker, start) + len(end_marker)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end
    learned = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
    assert [label != IGNORE for label in labels] == learned
    assert all(label in (IGNORE, i) for label, i in zip(labels, ids))
    assert "Paris" in tok.decode([i for i, keep in zip(ids, learned) if keep])
    assert "France" not in tok.decode([i for i, keep in zip(ids, learned) if keep])


def test_prompt_completion_and_blocks():
    from datasets import Dataset

    tok = tiny_tokenizer()
    ids, labels = prompt_completion_example(tok, "Translate: cat ->", " chat", "x")
    prompt = tok("Translate: cat ->")["input_ids"]
    assert labels[:len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id
    docs = Dataset.from_list([{"prompt": "Translate: cat ->", "completion": " chat"},
                              {"prompt": "x " * 80, "completion": " lost past the block"}])
    blocks = to_blocks(docs, tok, 32, None, source="pc.jsonl")
    assert len(blocks) == 1  # the second one's answer lies wholly past 32 tokens
    row = blocks[0]
    assert row["input_ids"].shape == (32,) and row["labels"][len(ids):].eq(IGNORE).all()
    assert row["labels"][:len(ids)].tolist() == labels
    with pytest.raises(DataError, match="no example has an answer within block_size=4"):
        to_blocks(docs.select([1]), tok, 4, None, source="pc.jsonl")
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        to_blocks(Dataset.from_list([{"messages": CHAT}]), tok, 32, None, source="chat.jsonl")
    with pytest.raises(DataError, match="chat.jsonl: example 1: 'messages' must be a non-empty list"):
        to_blocks(Dataset.from_list([{"messages": [{"role": "user", "content": None}]}]), _tokenizer(CHATML), 32,
                  None, source="chat.jsonl")


def test_rosa_train_learns_the_completions(tiny_model_dir, tmp_path):
    from rosa_scale.train import main

    rows = [{"prompt": f"Q{i % 7}: what follows {i % 7}?", "completion": f" {(i % 7) + 1}"} for i in range(120)]
    for name, part in (("train", rows[:100]), ("eval", rows[100:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset",
                 str(tmp_path / "eval.jsonl"), "--block-size", "24", "--batch-size", "8", "--max-steps", "30",
                 "--resample-every", "10", "--lr", "3e-2", "--rosa.rank", "4", "--output-dir", str(out),
                 "--save-merged", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 1.0  # the answers' loss only
