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

import contextlib
import inspect
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
                           attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                           chunk_tokens: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """``model(input_ids, labels=labels).loss`` of a Hugging Face causal LM without its full logits.

    Runs the base decoder (``model.get_decoder()``: ``model.model`` for Llama, Qwen2, Mistral; a
    PEFT wrapper passes the call through) for the last hidden states, then ``chunked_lm_loss``
    with ``model.get_output_embeddings()`` as the head.
    """
    _check_plain_logits(model)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_lm_loss(hidden, model.get_output_embeddings(), labels, chunk_tokens=chunk_tokens,
                           ignore_index=ignore_index)


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed fp32 cross-entropy of ``F.linear(hidden, weight, bias)``, chunk by chunk, with the
    gradient for ``hidden`` formed in the forward: the backward only scales it, so it never needs the
    head's weight again (FSDP2 has resharded it by then, ZeRO-3 released it). For a frozen head only.
    The arithmetic is autograd's through the model's own head: logits in the head's dtype, upcast for
    the loss, ``softmax - onehot`` cast back to the logits' dtype and multiplied by the weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, ignore_index: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = [] if ctx.needs_input_grad[0] else None
        for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
            logits = F.linear(h, weight, bias)
            scores = logits.float()
            total += F.cross_entropy(scores, y, ignore_index=ignore_index, reduction="sum")
            if grads is not None:
                probs = scores.softmax(-1)
                keep = y != ignore_index
                probs[keep, y[keep]] -= 1
                probs[~keep] = 0
                grads.append(probs.to(logits.dtype) @ weight.to(logits.dtype))
            del logits, scores
        if grads is not None:
            ctx.save_for_backward(torch.cat(grads).to(hidden.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def frozen_head_loss(hidden_states: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *, chunk_tokens: int = 1024,
                     ignore_index: int = -100) -> torch.Tensor:
    """``chunked_lm_loss`` for a frozen linear head whose weight may be gone by the backward (a
    sharded or partitioned model's head, read inside its forward): the gradient for the hidden
    states is formed chunk by chunk in the forward instead of recomputing the logits."""
    if head.weight.requires_grad:
        raise ValueError("frozen_head_loss needs a frozen LM head; a trained head goes through chunked_lm_loss")
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} "
                         "must agree on batch and sequence")
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    count = (targets != ignore_index).sum()
    with _gathered(head):
        total = _FrozenHeadLoss.apply(hidden, head.weight, head.bias, targets, chunk_tokens, ignore_index)
    return total / count


def _gathered(head: nn.Module):
    """The head's parameters whole: DeepSpeed ZeRO-3 partitions them outside the head's own forward,
    unless they are whole already (persistent small ones, or a tied weight the embedding holds)."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext()


def _takes_logits_to_keep(module: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def check_chunkable(module: nn.Module) -> None:
    """One ``ValueError`` line, before any training, for a model whose loss ``loss_inside_forward``
    cannot compute: scaled logits, or a forward that cannot be asked for the last position only."""
    _check_plain_logits(module)
    if not _takes_logits_to_keep(module):
        raise ValueError(f"{type(module).__name__}.forward takes no logits_to_keep: its loss cannot be chunked "
                         "(loss_chunk_tokens)")


def loss_inside_forward(model: nn.Module, module: nn.Module, input_ids: torch.Tensor, *, chunk_tokens: int,
                        per_sequence: bool = False, labels: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The chunked loss of ``input_ids`` predicting themselves, computed inside ``model``'s own forward.

    ``model`` is what a run calls (a DDP, FSDP2 or DeepSpeed wrapper, or ``module`` itself), ``module``
    the Hugging Face causal LM inside. A forward hook on the decoder takes its last hidden states and
    computes the loss there (``frozen_head_loss``), while the wrapper has the LM head's weight whole
    (FSDP2's root; ZeRO-3's is gathered for it) and its gradient hooks armed; the model itself computes
    logits for the last position only (``logits_to_keep=1``). Returns the mean loss, or with ``per_sequence`` one mean per sequence (no
    gradient: evaluation). ``labels`` (default: the input ids) may hold -100 where nothing is learned;
    ``position_ids`` restarting inside a sequence keep packed documents apart (``rosa_scale.packing``)."""
    check_chunkable(module)
    head, box = module.get_output_embeddings(), {}
    labels = input_ids if labels is None else labels

    def hook(_decoder, _args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if per_sequence:
            box["loss"] = torch.stack([frozen_head_loss(h[None], head, y[None], chunk_tokens=chunk_tokens)
                                       for h, y in zip(hidden, labels)])
        else:
            box["loss"] = frozen_head_loss(hidden, head, labels, chunk_tokens=chunk_tokens)

    handle = module.get_decoder().register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids, position_ids=position_ids, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if per_sequence or not torch.is_grad_enabled():
        return box["loss"]
    # tied to the model's output, so that the wrapper's backward hooks on it run (FSDP2 prepares its
    # root there); the term is 0 unless a logit is not finite, which the run must see anyway
    return box["loss"] + 0.0 * out.logits.float().sum()
