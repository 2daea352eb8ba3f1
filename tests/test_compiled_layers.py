"""Compiled decoder layers (rosa-train's fast path) compute what the eager model computes."""
import copy

import pytest
import torch

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample, rosa_layers
from rosa_scale.compiled_layers import compile_decoder_layers, decoder_layers
from rosa_scale.config import ConfigError, TrainConfig
from tests.tiny import tiny_llama

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model):
    for p in adapter_parameters(model):
        p.grad = None
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter_parameters(model)]


def test_compiled_layers_give_the_eager_loss_and_gradients_across_a_resample():
    """Inductor on the CPU; through a resample, which rewrites the frozen weights in place (a graph
    that baked them in as constants would give the old function). Before it, both against float64."""
    torch._dynamo.reset()
    eager = apply_rosa(tiny_llama(), RosaConfig(rank=4))
    fast, reference = copy.deepcopy(eager), copy.deepcopy(eager).double()
    assert compile_decoder_layers(fast, torch.device("cpu")) == len(decoder_layers(fast)) == 2
    loss_r, grads_r = _loss_and_grads(reference)
    for round_ in range(2):
        (loss_e, grads_e), (loss_f, grads_f) = _loss_and_grads(eager), _loss_and_grads(fast)
        torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=0)
        for g_f, g_e in zip(grads_f, grads_e):  # fp32 rounding: ~2e-6 of the largest entry either way
            torch.testing.assert_close(g_f, g_e, rtol=1e-4, atol=1e-4 * g_e.abs().max().item())
        for g, g_r in zip(grads_f if round_ == 0 else [], grads_r):
            assert (g.double() - g_r).abs().max() <= 5e-5 * g_r.abs().max()
        with torch.no_grad():
            for model in (eager, fast):
                for p in adapter_parameters(model):
                    p.add_(p.grad, alpha=-0.5)  # one identical SGD step, then the same new windows
        for model in (eager, fast):
            resample(model)
    assert sorted(fast.state_dict()) == sorted(eager.state_dict())  # the checkpoint keys stay the same


def test_compile_true_where_it_cannot_is_one_line(monkeypatch):
    import rosa_scale.compiled_layers as compiled

    with pytest.raises(ConfigError, match="names no decoder-layer class"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cpu"))
    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: "Triton is not installed (pip install triton)")
    with pytest.raises(ConfigError, match="config key 'compile' is true but Triton is not installed"):
        compiled.compile_decoder_layers(tiny_llama(), torch.device("cuda"))
    assert TrainConfig().compile == "auto"


def test_steps_evaluations_and_resamples_compile_nothing_new_after_the_first_round():
    """Every decoder layer shares one code object, whose compiled versions dynamo caches 8 of: a layer
    whose state differs from one forward to the next (a shared-input group's bookkeeping, say) compiles
    again each time, and past 8 versions the layers silently run uncompiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = apply_rosa(tiny_llama(), RosaConfig(rank=4))
    assert any(layer.shared_input is not None for layer in rosa_layers(model).values())
    compile_decoder_layers(model, torch.device("cpu"))
    graphs = []
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        with torch.no_grad():
            model(input_ids=IDS, labels=IDS, use_cache=False)
        resample(model)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 2, graphs
