"""Packing: several documents or chat examples per block, none seeing another.

The property that matters is checked through a model in float64: every token of a packed block
gets the log-probabilities it gets with its document alone (and, as a control, not without the
position ids). The layout is checked against the documents themselves; ``auto`` follows the model."""
import pytest
import torch
from datasets import Dataset

from rosa_scale.chat_data import to_blocks
from rosa_scale.data import pack
from rosa_scale.data_checks import DataError
from rosa_scale.packing import IGNORE, document_positions, pack_examples, resolve_mode
from tests.test_chat_data import CHAT, CHATML, _tokenizer
from tests.tiny import tiny_llama, tiny_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran far away from home today", "birds sing", "fish swim in the deep sea"]


def test_positions_restart_after_each_eos():
    assert document_positions([5, 6, 0, 7, 0, 0, 8, 9], eos=0) == [0, 1, 2, 0, 1, 0, 0, 1]


def test_examples_fill_blocks_in_order_and_padding_stands_alone():
    examples = [([1, 2, 3], [IGNORE, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [IGNORE, 7, 8, 9])]
    out = pack_examples(examples, block_size=6, pad=0)
    assert out["input_ids"] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    # 4 would be predicted from the end of the example before it: never a target
    assert out["labels"] == [[IGNORE, 2, 3, IGNORE, 5, IGNORE], [IGNORE, 7, 8, 9, IGNORE, IGNORE]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


def _alone_and_packed(model, block: dict, pieces: list[slice]):
    """Per-token log-probabilities of each piece of ``block`` run alone, and of the block packed
    with its position ids and without them."""
    ids = block["input_ids"][None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=block["position_ids"][None], use_cache=False).logits[0]
        joined = model(input_ids=ids, use_cache=False).logits[0]
        alone = [model(input_ids=ids[:, s], use_cache=False).logits[0] for s in pieces]
    return alone, [packed[s] for s in pieces], [joined[s] for s in pieces]


def _pieces(positions: torch.Tensor) -> list[slice]:
    starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(positions)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_text_documents_see_only_themselves(attention):
    tok = tiny_tokenizer()
    docs = Dataset.from_dict({"text": TEXTS * 3})
    joined = pack(docs, tok, "text", 32)
    packed = pack(docs, tok, "text", 32, mode="documents")
    assert packed[:]["input_ids"].tolist() == joined[:]["input_ids"].tolist()  # same blocks, now kept apart
    flex = attention == "flex_attention"  # compiled; float32 at most on a CPU
    model = tiny_llama(len(tok)).to(torch.float32 if flex else torch.float64).eval()
    model.set_attn_implementation(attention)
    block = packed[1]
    pieces = _pieces(block["position_ids"])
    assert len(pieces) >= 3 and all(block["input_ids"][s.stop - 1] == tok.eos_token_id for s in pieces[:-1])
    assert "labels" not in packed.column_names  # every token is a target, as in one stream
    alone, apart, seen = _alone_and_packed(model, block, pieces)
    for a, b in zip(alone, apart):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5 if flex else 1e-10)
    assert not torch.allclose(seen[1], alone[1], atol=1e-3)  # without position ids the second document sees the first


def test_padded_text_gives_each_document_its_own_blocks():
    tok = tiny_tokenizer()
    docs = Dataset.from_dict({"text": TEXTS})
    blocks = pack(docs, tok, "text", 8, mode="padded")[:]
    got = []
    for ids, labels in zip(blocks["input_ids"].tolist(), blocks["labels"].tolist()):
        real = [i for i, label in zip(ids, labels) if label != IGNORE]
        assert ids[:len(real)] == real and all(label == IGNORE for label in labels[len(real):])
        got.append(real)
    docs_ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    # each document cut into blocks of its own; a last piece of one token has nothing to predict
    want = [d[i:i + 8] for d in docs_ids for i in range(0, len(d), 8) if len(d[i:i + 8]) > 1]
    assert got == want and len(want) > len(TEXTS)


def test_packed_chat_examples_learn_only_answers_and_see_only_themselves():
    tok = _tokenizer(CHATML)
    rows = [{"messages": CHAT}, {"messages": CHAT[:3]}, {"messages": CHAT[1:3]}] * 2
    docs = Dataset.from_list(rows)
    padded = to_blocks(docs, tok, 256, None, source="chat.jsonl")
    packed = to_blocks(docs, tok, 256, None, source="chat.jsonl", mode="documents")
    assert len(packed) < len(padded)
    # the same examples, answers and order: strip each padded block's padding, cut the packed ones
    want = [(ids[:n], labels[:n]) for ids, labels, n in
            ((b["input_ids"].tolist(), b["labels"].tolist(), len(tok.apply_chat_template(r["messages"])["input_ids"]))
             for b, r in zip(padded, rows))]
    got = []
    for block in packed:
        for s in _pieces(block["position_ids"]):
            ids, labels = block["input_ids"][s].tolist(), block["labels"][s].tolist()
            if any(label != IGNORE for label in labels):
                got.append((ids, labels))
    assert got == want
    model = tiny_llama(len(tok)).double().eval()
    block = packed[0]
    pieces = _pieces(block["position_ids"])
    assert len(pieces) >= 3  # two examples and the padding
    alone, apart, _ = _alone_and_packed(model, block, pieces)
    for a, b in zip(alone, apart):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_auto_follows_the_model(tmp_path):
    from transformers import LlamaConfig, OPTConfig

    llama, opt = tmp_path / "llama", tmp_path / "opt"
    LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64).save_pretrained(llama)
    OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
              word_embed_proj_dim=32).save_pretrained(opt)
    assert resolve_mode("auto", str(llama), plain_text=True) == "documents"
    assert resolve_mode("auto", str(opt), plain_text=False) == "padded"
    assert resolve_mode("padded", None, plain_text=True) == "padded"
    with pytest.raises(DataError, match="packing 'documents' needs a model whose attention keeps packed documents"):
        resolve_mode("documents", str(opt), plain_text=True)
    with pytest.raises(DataError, match="packing 'concatenated' joins plain text only"):
        resolve_mode("concatenated", str(llama), plain_text=False)
    # flex attention builds its block mask there too; flash attention's packed path needs a batch of one
    assert resolve_mode("auto", str(llama), plain_text=True, attn_implementation="flex_attention") == "documents"
    assert resolve_mode("auto", str(llama), plain_text=True, attn_implementation="flash_attention_2") == "padded"
    with pytest.raises(DataError, match=r"\(llama with flash_attention_2 does not\): use 'padded'"):
        resolve_mode("documents", str(llama), plain_text=True, attn_implementation="flash_attention_2")
