"""Causal-LM cross-entropy over chunks of tokens, so the full-vocabulary logits never exist whole.

Why: with Llama-3's 128,256-word vocabulary the logits of B=2, S=2048 are 1 GiB in bf16 and 2 GiB
once upcast to fp32 for the loss, and the backward holds as much again for their gradient: on an
8B model over a 4-bit base that is a third of the peak memory of a training step. Here the LM head
and the loss run on ``chunk_tokens`` tokens at a time under activation checkpointing: the forward
keeps only each chunk's scalar loss sum, the backward recomputes one chunk's logits at a time.
The extra cost is one more LM-head matmul per step (a few ms on an 8B model).

The value equals what a Hugging Face causal LM computes with ``labels=`` (``ForCausalLMLoss``):
logits in the model's dtype, upcast to fp32, labels shifted by one, mean over the tokens whose
label is not ``ignore_index``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _head_function(lm_head: nn.Module | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head as a function of hidden states: a module is called (so a wrapped or adapted head
    works as in the model's own forward), a bare (vocab x hidden) weight is multiplied."""
    if isinstance(lm_head, torch.Tensor):
        return lambda hidden: F.linear(hidden, lm_head)
    return lm_head


def _chunk_loss_sum(head: Callable, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk (the logits live only inside this call)."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module | torch.Tensor, labels: torch.Tensor, *,
                    chunk_tokens: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of ``lm_head(hidden_states)`` against ``labels`` shifted by one.

    ``hidden_states`` (B x S x H) are the decoder's last hidden states, ``labels`` (B x S) the token
    ids (``ignore_index`` where no loss is wanted). Gradients reach ``hidden_states`` and whatever
    parameters ``lm_head`` uses; each chunk's logits are recomputed in the backward
    (non-reentrant checkpointing), so at most one chunk's logits and their gradient are alive.
    With no label left to predict the result is NaN, as for ``F.cross_entropy``'s mean.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} "
                         "must agree on batch and sequence")
    head = _head_function(lm_head)
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    count = (targets != ignore_index).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    # one split node: its backward assembles the chunks' gradients into one tensor, not one per chunk
    for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, h, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, y, ignore_index)
    return total / count


def _check_plain_logits(model: nn.Module) -> None:
    """Refuse models whose forward changes the logits after the head (Gemma-2's soft-capping,
    Cohere's logit scale): the chunked loss would silently differ from theirs."""
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"chunked_causal_lm_loss cannot reproduce {type(model).__name__}'s logits "
                             f"({key}={value}): use the model's own loss")


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                           attention_mask: torch.Tensor | None = None, chunk_tokens: int = 1024,
                           ignore_index: int = -100) -> torch.Tensor:
    """``model(input_ids, labels=labels).loss`` of a Hugging Face causal LM without its full logits.

    Runs the base decoder (``model.get_decoder()``: ``model.model`` for Llama, Qwen2, Mistral; a
    PEFT wrapper passes the call through) for the last hidden states, then ``chunked_lm_loss``
    with ``model.get_output_embeddings()`` as the head.
    """
    _check_plain_logits(model)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_tokens=chunk_tokens,
                           ignore_index=ignore_index)
