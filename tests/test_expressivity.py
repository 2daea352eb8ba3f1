"""The paper's central claim, measured: resampled rank-r factors reach what no rank-r update can.

A linear layer is regressed onto a target that differs from it by a rank-8r matrix. LoRA
trains one rank-r update, so its error is bounded below by the best rank-r approximation
(Eckart-Young). ROSA trains a new rank-r subspace after each resample and goes below it.
"""
import torch
import torch.nn as nn

from rosa_scale import RosaConfig, apply_rosa, resample, rosa_layers

IN, OUT, RANK, PHASES, STEPS = 48, 48, 2, 8, 150


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(OUT, IN, generator=g) / IN ** 0.5
    delta = (torch.randn(OUT, 8 * RANK, generator=g) @ torch.randn(8 * RANK, IN, generator=g)) / IN
    x = torch.randn(1024, IN, generator=g)
    return w0, w0 + delta, x


def _rel_error(w_eff, w0, target):
    return ((w_eff - target).norm() / (target - w0).norm()).item()


def _fit(params, forward, x, y, steps, lr=1e-2):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((forward(x) - y) ** 2).mean().backward()
        opt.step()
    return opt


def _rosa(w0, target, x):
    layer = nn.Linear(IN, OUT, bias=False)
    layer.weight.data.copy_(w0)
    net = apply_rosa(nn.Sequential(layer), RosaConfig(rank=RANK, method="svd", sampling="random", seed=0))
    rosa = rosa_layers(net)["0"]
    opt = None
    for phase in range(PHASES):
        if phase:
            resample(net, opt)
        opt = _fit([rosa.up, rosa.down], net, x, x @ target.T, STEPS)
    return _rel_error(rosa.merged_weight(), w0, target)


def _lora(w0, target, x):
    g = torch.Generator().manual_seed(1)
    down = nn.Parameter(torch.randn(RANK, IN, generator=g) / IN ** 0.5)
    up = nn.Parameter(torch.zeros(OUT, RANK))
    _fit([up, down], lambda v: v @ (w0 + up @ down).T, x, x @ target.T, PHASES * STEPS)
    return _rel_error(w0 + (up @ down).detach(), w0, target)


def test_rosa_beats_lora_and_the_rank_r_bound():
    w0, target, x = _problem()
    s = torch.linalg.svdvals(target - w0)
    bound = (s[RANK:].norm() / s.norm()).item()  # best possible error of any rank-r update
    lora, rosa = _lora(w0, target, x), _rosa(w0, target, x)
    assert lora >= bound - 1e-3, (lora, bound)
    assert rosa < bound, (rosa, bound)
    assert rosa < 0.8 * lora, (rosa, lora)
