"""A resample spread over several steps (resample_stagger): the same windows as one resample, a
cost-balanced share of the matrices per step, and an exact resume from a checkpoint in mid-spread."""
import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample, rosa_layers
from rosa_scale.config import ConfigError, load_config
from rosa_scale.model import rosa_state
from rosa_scale.engines.plan import factorization_cost
from rosa_scale.resample import resample_parts
from tests.test_resume import _args, _losses, _run
from tests.tiny import tiny_llama


def test_parts_give_the_windows_of_one_resample():
    model = apply_rosa(tiny_llama(), RosaConfig(rank=4))
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    spread = model
    opt = torch.optim.AdamW(adapter_parameters(spread))
    spread(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    whole = copy.deepcopy(spread)
    parts = resample_parts(spread, 3)
    assert sorted(n for part in parts for n in part) == sorted(rosa_layers(spread))
    costs = [sum(factorization_cost(rosa_layers(spread)[n].out_features, rosa_layers(spread)[n].in_features)
                 for n in part) for part in parts]
    assert max(costs) <= 1.5 * min(costs)  # 14 matrices of two sizes: about equal work per step
    resample(whole)
    for j in range(3):
        resample(spread, opt, part=(j, 3))
        done = {n for part in parts[:j + 1] for n in part}
        assert {n for n, layer in rosa_layers(spread).items() if layer.up in opt.state} == \
            set(rosa_layers(spread)) - done  # only the resplit matrices' state is reset
        assert rosa_state(spread).split_index == (1 if j == 2 else 0)
    for (name, a), b in zip(whole.state_dict().items(), spread.state_dict().values()):
        assert torch.equal(a, b), name  # the same windows: seeded by (seed, index, name), not by when
    with pytest.raises(ValueError, match="part 3 of a resample in 3 parts"):
        resample(spread, part=(3, 3))
    with pytest.raises(ConfigError, match="'resample_stagger' \\(8\\) must be at most resample_every \\(4\\)"):
        load_config(overrides={"resample_every": 4, "resample_stagger": 8})


def test_resume_in_the_middle_of_a_spread_resample_is_bitwise(tiny_model_dir, tiny_data, tmp_path):
    """Resamples at 7 and 14 spread over 3 steps each (7-9, 14-16); the checkpoint at step 8 holds
    a model with a third of its matrices resplit. Resumed there, the run repeats every loss."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--resample-stagger", "3", "--save-every", "8"]
    proc = _run(_args(tiny_model_dir, tiny_data, straight, 4, 18, [*extra, "--keep-last", "null"]))
    assert "resample every 7 (over 3 steps)" in proc.stdout
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000008", resumed / "checkpoints" / "step-00000008")
    (resumed / "checkpoints" / "latest").write_text("step-00000008\n")
    _run(_args(tiny_model_dir, tiny_data, resumed, 4, 18, [*extra, "--resume", "auto"]))
    a, resampled = _losses(straight)
    b, _ = _losses(resumed)
    assert resampled == {7, 8, 9, 14, 15, 16}
    assert set(b) == set(range(9, 19)) and [b[s] for s in sorted(b)] == [a[s] for s in sorted(b)]
    x, y = load_file(straight / "merged" / "model.safetensors"), load_file(resumed / "merged" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
