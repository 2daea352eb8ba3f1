"""chunked_lm_loss equals the plain causal-LM cross-entropy, in value and gradient.

The reference is the loss as a Hugging Face causal LM computes it (full logits, shifted labels,
mean over non-ignored tokens) in float64; the chunked loss runs in fp32 with chunk sizes that do
and do not divide the token count, with ignored labels, and through a tiny Llama end to end.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rosa_scale.chunked_loss import chunked_causal_lm_loss, chunked_lm_loss
from tests.proc_failure import stderr_report

B, S, H, V = 2, 9, 16, 37  # 16 shifted tokens


def _reference(hidden, weight, labels):
    """The plain loss: every logit at once, shift, mean over non-ignored labels (float64)."""
    logits = F.linear(hidden.double(), weight.double())
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3:6] = -100  # ignored tokens inside a chunk and across a chunk boundary
    labels[1, -1] = -100
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, labels):
    hidden = hidden.clone().requires_grad_(True)
    weight = nn.Parameter(weight.clone())  # a leaf a module can hold as it is
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
@pytest.mark.parametrize("head_kind", ["weight", "module"])
def test_value_and_gradients_match_float64_reference(chunk, head_kind):
    hidden, weight, labels = _inputs()
    ref = _value_and_grads(_reference, hidden.double(), weight.double(), labels)

    def chunked(h, w, y):
        if head_kind == "module":
            head = nn.Linear(H, V, bias=False)
            head.weight = w  # the leaf itself, so its .grad is the one read below
            return chunked_lm_loss(h, head, y, chunk_tokens=chunk)
        return chunked_lm_loss(h, w, y, chunk_tokens=chunk)

    got = _value_and_grads(chunked, hidden, weight, labels)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "d hidden", "d head weight"), got, ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), name
    assert ref[1][0, 3:6].abs().sum() > 0  # the hidden state before an ignored label still gets a gradient...
    assert ref[1][:, -1].abs().sum() == 0  # ...the last position predicts nothing: zero gradient
    assert torch.equal(got[1][:, -1], torch.zeros_like(got[1][:, -1]))


def test_ignored_labels_are_left_out_of_the_mean():
    hidden, weight, labels = _inputs()
    plain = chunked_lm_loss(hidden, weight, labels, chunk_tokens=4)
    kept = labels[:, 1:] != -100
    per_token = F.cross_entropy(F.linear(hidden[:, :-1], weight)[kept], labels[:, 1:][kept], reduction="none")
    assert torch.allclose(plain, per_token.mean(), rtol=1e-6)
    assert not torch.allclose(plain, per_token.sum() / labels[:, 1:].numel(), rtol=1e-3)  # not over all tokens


def test_no_label_left_gives_nan_and_bad_arguments_are_refused():
    hidden, weight, labels = _inputs()
    assert torch.isnan(chunked_lm_loss(hidden, weight, torch.full_like(labels, -100)))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="agree"):
        chunked_lm_loss(hidden, weight, labels[:, :-1])


def test_hf_causal_lm_loss_and_gradients_match_its_own():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float()
    ids = torch.randint(0, 101, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run(lambda: model(input_ids=ids, labels=labels).loss)
    loss, grads = run(lambda: chunked_causal_lm_loss(model, ids, labels, chunk_tokens=5))
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name
    assert grads["lm_head.weight"].abs().sum() > 0


def test_models_with_scaled_logits_are_refused():
    model = nn.Module()
    model.config = type("Config", (), {"final_logit_softcapping": 30.0})()
    with pytest.raises(ValueError, match="softcapping"):
        chunked_causal_lm_loss(model, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_frozen_head_loss_matches_float64_reference():
    """The loss and the hidden states' gradient, formed chunk by chunk in the forward, against autograd
    through the whole logits in float64 (labels partly ignored, chunks not dividing the tokens)."""
    from rosa_scale.chunked_loss import frozen_head_loss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(16, 50, bias=True).double().requires_grad_(False)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, 3] = labels[1, 8] = -100
    loss = frozen_head_loss(hidden, head, labels, chunk_tokens=5)
    loss.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden)[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1))
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-6 * want.item()  # the loss is summed in fp32, as HF's
    torch.testing.assert_close(got, hidden.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="needs a frozen LM head"):
        frozen_head_loss(hidden, nn.Linear(16, 50).double(), labels)


def test_rosa_train_with_loss_chunks_trains_the_same(tiny_model_dir, tiny_data, tmp_path):
    """rosa-train --loss-chunk-tokens (chunks of 40 of the 4 x 32 tokens, through a resample) under
    FSDP2 on 2 processes logs the losses of the model's own loss in one process up to fp32 summation
    order (measured: 1.4e-6 for one process, FSDP2, DDP and ZeRO-3 alike), evaluation included."""
    import json
    import subprocess
    import sys

    from tests.ports import free_port
    from tests.test_resume import ENV, _args

    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port())]
    runs = {"whole": ([sys.executable], 4, []), "fsdp2": (two, 2, ["--loss-chunk-tokens", "40", "--fsdp", "true"])}
    losses, evals = {}, {}
    for name, (launch, batch, extra) in runs.items():
        out = tmp_path / name
        proc = subprocess.run([*launch, *_args(tiny_model_dir, tiny_data, out, batch, 8, extra)],
                              capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, stderr_report(proc)
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
        evals[name] = json.loads((out / "summary.json").read_text())["eval_loss_after"]
    assert len(losses["whole"]) == 8
    assert max(abs(a - b) for a, b in zip(losses["whole"], losses["fsdp2"])) < 1e-5
    assert abs(evals["fsdp2"] - evals["whole"]) < 1e-5
