"""apply_rosa / resample / merge_rosa on real architectures: function preserved, shapes restored."""
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from rosa_scale import RosaConfig, apply_rosa, merge_rosa, resample, rosa_layers
from rosa_scale.layer import RosaLinear
from tests.tiny import tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _signature(model):
    return [(n, tuple(p.shape), type(model.get_submodule(n.rsplit(".", 1)[0])).__name__)
            for n, p in model.named_parameters()]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["svd", "eigh", "qr"])
def test_function_is_preserved_through_apply_resample_merge(kind, method):
    model = MODELS[kind]()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    before, signature = _logits(model, ids), _signature(model)
    apply_rosa(model, RosaConfig(rank=4, method=method))
    assert len(rosa_layers(model)) == (14 if kind == "llama" else 8)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    for _ in range(3):
        # move the factors as training would, then check a resample keeps that function
        with torch.no_grad():
            for layer in rosa_layers(model).values():
                layer.up.add_(0.01 * torch.randn_like(layer.up))
        trained = _logits(model, ids)
        resample(model)
        torch.testing.assert_close(_logits(model, ids), trained, rtol=1e-5, atol=1e-5)
    merge_rosa(model)
    torch.testing.assert_close(_logits(model, ids), trained, rtol=1e-5, atol=1e-5)
    assert _signature(model) == signature
    assert not any(isinstance(m, RosaLinear) for m in model.modules())
    assert not hasattr(model, "rosa_state")


def test_conv1d_weight_is_handled_transposed():
    model = tiny_gpt2()
    original = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (64, 192)
    apply_rosa(model, RosaConfig(rank=4))
    layer = rosa_layers(model)["transformer.h.0.attn.c_attn"]
    assert isinstance(layer.base, Conv1D)
    assert layer.up.shape == (192, 4) and layer.down.shape == (4, 64)
    torch.testing.assert_close(layer.merged_weight(), original.T, rtol=0, atol=1e-6)


def test_all_linear_excludes_the_lm_head_and_freezes_the_rest():
    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=2))
    assert "lm_head" not in rosa_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".up", ".down")) for n in trainable)
    assert len(trainable) == 2 * len(rosa_layers(model))


def test_merge_restores_requires_grad():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    merge_rosa(apply_rosa(model, RosaConfig(rank=2)))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("target,expected", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r"model\.layers\.1\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
    (["self_attn.o_proj"], {"o_proj"}),
])
def test_target_modules_by_name_and_regex(target, expected):
    model = apply_rosa(tiny_llama(), RosaConfig(rank=2, target_modules=target))
    assert {n.rsplit(".", 1)[-1] for n in rosa_layers(model)} == expected


def test_exclude_modules():
    model = apply_rosa(tiny_llama(), RosaConfig(rank=2, exclude_modules=["down_proj", "layers.0.self_attn.q_proj"]))
    names = set(rosa_layers(model))
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names


def test_fractional_rank():
    model = apply_rosa(tiny_llama(), RosaConfig(rank=0.25))
    layer = rosa_layers(model)["model.layers.0.self_attn.k_proj"]  # 32 x 64
    assert layer.rank == 8


@pytest.mark.parametrize("cfg,message", [
    (RosaConfig(rank=64), "rank 64 is too large"),
    (RosaConfig(target_modules=["qkv_proj"]), "target module 'qkv_proj' not found"),
    (RosaConfig(target_modules=["mlp"]), "not a linear layer"),
    (RosaConfig(target_modules="nothing.*"), "matches no linear layer"),
    (RosaConfig(target_modules=["lm_head"]), None),
])
def test_bad_targets_and_ranks_are_refused(cfg, message):
    model = tiny_llama()
    if message is None:  # an untied LM head is a valid target
        apply_rosa(model, cfg)
        assert list(rosa_layers(model)) == ["lm_head"]
        return
    with pytest.raises(ValueError, match=message):
        apply_rosa(model, cfg)


def test_tied_head_cannot_be_split():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="shares its weight"):
        apply_rosa(model, RosaConfig(rank=2, target_modules=["lm_head"]))


def test_apply_twice_is_refused():
    model = apply_rosa(tiny_llama(), RosaConfig(rank=2))
    with pytest.raises(ValueError, match="already applied"):
        apply_rosa(model, RosaConfig(rank=2))


def test_plain_module_tree():
    """apply_rosa works on any module with nn.Linear layers, not only transformers models."""
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 16)
    y = net(x).detach()
    apply_rosa(net, RosaConfig(rank=3))
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-6)
    assert isinstance(net[0], RosaLinear) and isinstance(net[2], RosaLinear)
