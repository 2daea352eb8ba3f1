"""Sibling layers called on one input (q, k, v; gate, up) share their thin products: same function."""
import pytest
import torch

from rosa_scale import RosaConfig, apply_rosa
from rosa_scale.layer import RosaLinear
from rosa_scale.run_model import enable_checkpointing
from tests.tiny import tiny_llama


def _model(shared: bool, dtype=torch.float64, rank=4, seed=0, **overrides):
    model = tiny_llama(seed=seed, **overrides).to(dtype)
    apply_rosa(model, RosaConfig(rank=rank, adapter_dtype="float32", **({} if shared else {"shared_inputs": []})))
    model.to(dtype)
    with torch.no_grad():  # factors away from the split's exact values, so every gradient term shows
        for layer in model.modules():
            if isinstance(layer, RosaLinear):
                layer.up.add_(0.1 * torch.randn_like(layer.up))
                layer.down.add_(0.1 * torch.randn_like(layer.down))
    return model


def _loss_and_grads(model, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_q_k_v_and_gate_up_are_grouped_and_o_and_down_are_not():
    model = _model(True)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
    assert attn.q_proj.shared_input is not mlp.up_proj.shared_input
    assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    assert model.model.layers[1].self_attn.q_proj.shared_input is not attn.q_proj.shared_input
    assert all(m.shared_input is None for m in _model(False).modules() if isinstance(m, RosaLinear))


@pytest.mark.parametrize("checkpointing,bias", [(False, False), (True, False), (False, True)])
def test_grouped_model_has_the_loss_and_gradients_of_the_ungrouped_one_in_float64(checkpointing, bias):
    batch = torch.randint(0, 300, (2, 16))
    results = []
    for shared in (True, False):
        model = _model(shared, attention_bias=bias, mlp_bias=bias)  # biased q, k, v: as Qwen2's
        if checkpointing:
            enable_checkpointing(model)
            model.train()
        loss, grads = _loss_and_grads(model, batch)
        if shared:  # the group's node is in the graph, and it holds nothing once the layer is done
            group = model.model.layers[0].self_attn.q_proj.shared_input
            assert group._x is None and group._outs is None
        results.append((loss, grads))
    (loss_g, grads_g), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_g, loss_u, rtol=1e-12, atol=1e-12)
    assert grads_g.keys() == grads_u.keys() and any("k_proj.down" in n for n in grads_g)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_u[name], rtol=1e-10, atol=1e-12)


def _shared_nodes(out: torch.Tensor) -> set:
    """The SharedInputLinears nodes ``out``'s gradient passes through."""
    seen, todo, found = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "SharedInputLinears" in type(node).__name__:
            found.add(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_the_shared_product_is_in_the_autograd_graph():
    model = _model(True)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert len(_shared_nodes(q)) == 1
    assert _shared_nodes(q) == _shared_nodes(k) == _shared_nodes(v)  # one GEMM made all three
    assert not _shared_nodes(attn.o_proj(x))


def _separate(layer, x):
    return layer.base(x) + x @ layer.down.t().double() @ layer.up.t().double()


def test_a_member_called_again_computes_alone_and_its_siblings_keep_the_shared_outputs():
    model = _model(True)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.shared_input
    x, y = (torch.randn(3, 64, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attn.q_proj(x), _separate(attn.q_proj, x))
    again = attn.q_proj(x)
    assert not _shared_nodes(again)
    torch.testing.assert_close(again, _separate(attn.q_proj, x))
    k = attn.k_proj(x)
    assert _shared_nodes(k) and group._left == 1
    torch.testing.assert_close(k, _separate(attn.k_proj, x))
    torch.testing.assert_close(attn.v_proj(x), _separate(attn.v_proj, x))
    assert group._outs is None and not group.disabled
    with torch.no_grad():
        attn.v_proj.down.mul_(2)  # a member's factor changed: the next pass sees it
    outs = [getattr(attn, n)(y) for n in ("q_proj", "k_proj", "v_proj")]
    assert len(set().union(*map(_shared_nodes, outs))) == 1
    for name, out in zip(("q_proj", "k_proj", "v_proj"), outs):
        torch.testing.assert_close(out, _separate(getattr(attn, name), y))


def test_members_fed_different_tensors_turn_the_group_off_and_each_computes_alone():
    """Cross-attention's q reads the decoder's states, k and v the encoder's: not a shared input."""
    model = _model(True)
    attn = model.model.layers[0].self_attn
    decoder, encoder = (torch.randn(3, 64, dtype=torch.float64) for _ in range(2))
    for _ in range(2):
        outs = [attn.q_proj(decoder), attn.k_proj(encoder), attn.v_proj(encoder)]
        assert attn.q_proj.shared_input.disabled
        for name, out, x in zip(("q_proj", "k_proj", "v_proj"), outs, (decoder, encoder, encoder)):
            torch.testing.assert_close(out, _separate(getattr(attn, name), x))
    assert not any(_shared_nodes(out) for out in outs)  # the second pass: each alone from the start


def test_a_hooked_member_sends_the_group_back_to_each_layer_alone():
    model = _model(True)
    attn = model.model.layers[0].self_attn
    attn.k_proj.register_forward_pre_hook(lambda module, args: None)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    assert not _shared_nodes(attn.q_proj(x))
    assert attn.q_proj.shared_input._x is None


def test_under_cpu_autocast_grouped_and_ungrouped_agree():
    batch = torch.randint(0, 300, (2, 16))
    results = []
    for shared in (True, False):
        model = _model(shared, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, batch))
    (loss_g, grads_g), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_g, loss_u, rtol=1e-2, atol=1e-2)
    for name in grads_g:
        scale = grads_u[name].abs().max()
        assert (grads_g[name] - grads_u[name]).abs().max() <= 3e-2 * scale, name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_decoder_layer_traces_the_group_whole_and_computes_what_it_does_eagerly(backend):
    """A graph break here would split every compiled decoder layer (rosa-train compiles them by default)."""
    models = [_model(True, dtype=torch.float32, seed=1) for _ in range(2)]
    layers = [m.model.layers[0] for m in models]
    hidden = torch.randn(2, 8, 64)
    position = torch.arange(8)[None].expand(2, 8)
    outs = []
    for model, layer, run in zip(models, layers, (torch.compile(layers[0], fullgraph=True, backend=backend),
                                                  layers[1])):
        embeddings = model.model.rotary_emb(hidden, position)
        xi = hidden.clone().requires_grad_()
        out = run(xi, position_embeddings=embeddings, attention_mask=None, position_ids=position)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        attn = layer.self_attn
        assert attn.q_proj.shared_input._x is None
        outs.append([out, xi.grad, attn.k_proj.down.grad, attn.v_proj.up.grad, layer.mlp.gate_proj.down.grad])
    for compiled, eager in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_bf16_on_cuda_is_as_accurate_as_ungrouped_against_float64():
    """Rank 16 x 3 = 48: the grouped backward runs thin_grads' kernel at a padded rank."""
    torch.manual_seed(0)
    x = torch.randn(2, 512, 64, device="cuda", dtype=torch.float64)
    errors = {}
    reference = _model(True, dtype=torch.float64, rank=16).cuda()
    ref_attn = reference.model.layers[0].self_attn
    xr = x.clone().requires_grad_()
    ref = sum(getattr(ref_attn, n)(xr).square().sum() for n in ("q_proj", "k_proj", "v_proj"))
    ref.backward()
    for shared in (True, False):
        model = _model(True, dtype=torch.float64, rank=16).cuda()
        model.to(torch.bfloat16)
        attn = model.model.layers[0].self_attn
        if not shared:
            for n in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, n).shared_input = None
        xi = x.to(torch.bfloat16).requires_grad_()
        step = torch.compile(lambda t: sum(getattr(attn, n)(t).float().square().sum() for n in ("q_proj", "k_proj",
                                                                                               "v_proj")))
        step(xi).backward()
        pairs = [(xi.grad, xr.grad)] + [(getattr(getattr(attn, n), f).grad, getattr(getattr(ref_attn, n), f).grad)
                                        for n in ("q_proj", "k_proj", "v_proj") for f in ("up", "down")]
        errors[shared] = [((got.double() - want).abs().max() / want.abs().max()).item() for got, want in pairs]
    assert all(e < 3e-2 for e in errors[True]), errors
    assert all(g <= 1.5 * u + 1e-3 for g, u in zip(errors[True], errors[False])), errors
