"""Gradients and optimizer state live on the factors only; a resample resets them; runs repeat."""
import torch

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample, rosa_layers
from rosa_scale.factorize import choose_indices, window_generator
from tests.tiny import tiny_llama


def _batch(seed):
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps, start=0):
    losses = []
    for i in range(steps):
        ids = _batch(start + i)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_only_adapters_get_grads_and_state_and_resample_resets_it():
    model = apply_rosa(tiny_llama().train(), RosaConfig(rank=4))
    adapters = adapter_parameters(model)
    opt = torch.optim.AdamW(adapters, lr=1e-3)
    ids = _batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if n.endswith((".up", ".down"))}
    opt.step()
    assert set(opt.state) == set(adapters) and all("exp_avg" in opt.state[p] for p in adapters)
    ids_before = [id(p) for p in model.parameters()]
    resample(model, opt)
    assert all(len(opt.state[p]) == 0 for p in adapters)
    assert [id(p) for p in model.parameters()] == ids_before  # written in place, never replaced
    _train(model, opt, 1)
    assert all(opt.state[p]["step"].item() == 1 for p in adapters)


def test_resample_without_optimizer_keeps_state():
    model = apply_rosa(tiny_llama().train(), RosaConfig(rank=4))
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    _train(model, opt, 1)
    resample(model)
    assert all(opt.state[p]["step"].item() == 1 for p in adapter_parameters(model))


def test_same_seed_same_windows_and_loss_curve():
    def run(seed):
        torch.manual_seed(0)
        model = apply_rosa(tiny_llama().train(), RosaConfig(rank=4, seed=seed))
        opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
        losses = _train(model, opt, 3)
        resample(model, opt)
        losses += _train(model, opt, 3, start=3)
        down = {n: l.down.detach().clone() for n, l in rosa_layers(model).items()}
        return losses, down

    losses_a, down_a = run(seed=0)
    losses_b, down_b = run(seed=0)
    losses_c, _ = run(seed=1)
    assert losses_a == losses_b
    assert all(torch.equal(down_a[n], down_b[n]) for n in down_a)
    assert losses_a[3:] != losses_c[3:]


def test_resample_uses_the_window_of_its_index():
    """The subspace trained after resample k is the window drawn from (seed, k, name)."""
    model = apply_rosa(tiny_llama(), RosaConfig(rank=4, seed=5, sampling="random"))
    resample(model)
    resample(model)
    name, layer = next(iter(rosa_layers(model).items()))
    assert model.rosa_state.split_index == 2
    w = layer.merged_weight().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    idx = choose_indices(min(w.shape), 4, "random", window_generator(5, 2, name))
    expect = s[idx].sqrt()[:, None] * vh[idx]
    got = layer.down.detach().double()
    signs = torch.sign((got * expect).sum(1, keepdim=True))
    torch.testing.assert_close(got * signs, expect, rtol=0, atol=1e-4)
