"""Tiny models and text built offline for tests: a byte-level BPE tokenizer and few-MB LMs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.",
    "A journey of a thousand miles begins with a single step taken in the morning light.",
    "Rivers run to the sea, and the sea returns the rain that feeds the rivers again.",
    "She read the letter twice, folded it carefully, and put it back into the drawer.",
    "Numbers are added, multiplied and divided; the result is printed on the screen.",
    "Every function returns a value, and every value has a type that tells what it is.",
]


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    """Documents of shuffled real sentences: learnable structure, no download."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        order = torch.randperm(len(TEXT), generator=gen).tolist()
        docs.append(" ".join(TEXT[i] for i in order[:3]))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(vocab_size: int = 300, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False, initializer_range=0.15, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(vocab_size: int = 300, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def save_tiny_model_dir(path: Path, kind: str = "llama") -> Path:
    """A Hugging Face folder (model + tokenizer) that rosa-train can load like any other.

    Weights are drawn wider than a real init so the frozen random head can express a peaked
    distribution: fine-tuning the adapters then visibly lowers the loss in a few steps.
    """
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer)) if kind == "llama" else tiny_gpt2(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
