"""Architectures, each on a tiny random config: apply_rosa, a training step, a resample and
merge_rosa keep the function; FSDP2's decoder-layer class is found; the export reloads in plain
transformers with the trained outputs; tied embeddings stay tied and unsplit; mixture-of-experts
blocks stored as 3-D tensors stay frozen with a warning; documents packed in one row with restarting
position ids see only themselves exactly where ``rosa_scale.packing`` says so. README's coverage table is this test's
output (``python -m tests.test_model_coverage`` prints it) and is checked against it."""
import warnings
from pathlib import Path

import pytest
import torch

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, merge_rosa, resample, rosa_layers
from rosa_scale.compiled_layers import decoder_layers
from rosa_scale.packing import keeps_documents_apart

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
# name -> (config class, model class, config values over SMALL or, with "own", instead of it)
ARCHS = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "Mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "Gemma 3 (text)": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel", {"own": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                            n_positions=64, bos_token_id=0, eos_token_id=0)}),
    "GPT-NeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "OPT": ("OPTConfig", "OPTForCausalLM", {"own": dict(vocab_size=128, hidden_size=32, ffn_dim=48,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        max_position_embeddings=64, word_embed_proj_dim=32,
                                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)}),
    "Falcon": ("FalconConfig", "FalconForCausalLM", {"own": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, bos_token_id=0,
                                                                 eos_token_id=0)}),
    "Mixtral (MoE)": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "Qwen2-MoE": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                                          "moe_intermediate_size": 24,
                                                          "shared_expert_intermediate_size": 24}),
}


def build(name: str):
    import transformers

    config_cls, model_cls, values = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**values.get("own", {**SMALL, **values}))
    return getattr(transformers, model_cls)(config).eval()


def packed_apart(model) -> bool:
    """Whether two documents packed in one row with restarting position ids get the logits each gets
    alone; the same row without position ids must differ (the second document sees the first)."""
    a, b = IDS[0, :5], IDS[1, :7]
    row = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=a[None], use_cache=False).logits[0],
                           model(input_ids=b[None], use_cache=False).logits[0]])
        joined = model(input_ids=row, use_cache=False).logits[0]
    assert not torch.allclose(joined[5:], alone[5:], atol=1e-4)  # the comparison can tell
    return torch.allclose(packed, alone, rtol=0, atol=1e-5)


def check(name: str, tmp_path: Path) -> str:
    """Every property the module docstring names, for one architecture; returns its README row."""
    from transformers import AutoModelForCausalLM

    model = build(name)
    before = model(IDS).logits
    apart = packed_apart(model)
    assert keeps_documents_apart(model.config) == apart, \
        "rosa_scale.packing's answer for this model differs from what it does"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_rosa(model, RosaConfig(rank=2))
    frozen_experts = any("mixture-of-experts blocks" in str(w.message) for w in caught)
    layers = rosa_layers(model)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-5)
    assert model.get_output_embeddings() not in layers.values()  # the head (tied or not) is never split
    opt = torch.optim.SGD(adapter_parameters(model), lr=0.5)
    first = model(IDS, labels=IDS).loss
    first.backward()
    opt.step()
    trained = model(IDS).logits
    assert model(IDS, labels=IDS).loss < first  # one step learned something
    resample(model, opt)
    torch.testing.assert_close(model(IDS).logits, trained, rtol=0, atol=1e-4)
    assert decoder_layers(model), "no decoder-layer class for FSDP2 to shard by"
    merge_rosa(model).save_pretrained(tmp_path / name.replace(" ", "_"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name.replace(" ", "_")).eval()
    torch.testing.assert_close(reloaded(IDS).logits, trained, rtol=0, atol=1e-4)
    if tied:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    kinds = ", ".join(f"`{k}`" for k in sorted({n.rsplit(".", 1)[-1] for n in layers}))
    return (f"| {name} | {kinds} | {'yes' if tied else 'no'} | "
            f"{'experts frozen (3-D tensors), warned' if frozen_experts else '-'} | "
            f"{'yes' if apart else 'no (padded)'} | yes |")


HEADER = ["| architecture | adapted (all-linear) | tied head kept | mixture of experts | packed documents kept apart | "
          "apply / train / resample / merge / FSDP2 class / reload |", "|---|---|---|---|---|---|"]


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture(name, tmp_path):
    row = check(name, tmp_path)
    assert row in (ROOT / "README.md").read_text(), f"README's coverage table lacks or differs in: {row}"


def test_targeting_experts_is_one_clear_error():
    model = build("Mixtral (MoE)")
    with pytest.raises(ValueError, match="mixture-of-experts weights stored as one tensor per layer cannot be adapted"):
        apply_rosa(model, RosaConfig(rank=2, target_modules=["experts"]))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print("\n".join([*HEADER, *(check(name, Path(folder)) for name in ARCHS)]))
