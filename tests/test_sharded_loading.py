"""FSDP2 runs read a model folder tensor by tensor into their shards: the values are the folder's,
bit for bit, with no process ever holding the whole model; a folder that does not match is one line."""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from tests.rank_runs import run_ranks
from tests.proc_failure import stderr_report


def test_empty_model_is_filled_shard_by_shard_with_the_folders_values(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model_dir / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "full.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = run_ranks(lambda port: [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "tests.sharded_loading_worker", "--model", str(tiny_model_dir),
        "--bad-model", str(bad), "--out", str(out)], env=env, timeout=300)
    assert proc.returncode == 0, stderr_report(proc)
    report = json.loads(out.with_suffix(".pt.json").read_text())
    assert report["meta_params"] and report["real_buffers"] and report["world_size"] == 2
    assert report["bad"] == ("model.safetensors holds 'model.extra.weight', which LlamaForCausalLM has no parameter "
                             "for (it cannot be read tensor by tensor)")
    full = torch.load(out, weights_only=True)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    layer = "model.layers.0.self_attn.q_proj"
    assert torch.equal(full[f"{layer}.up"], torch.zeros_like(full[f"{layer}.up"]))
    for key, value in reference.items():
        owner, _, leaf = key.rpartition(".")
        name = f"{owner}.base.{leaf}" if f"{owner}.up" in full else key
        assert torch.equal(full[name], value), key  # buffers (rotary frequencies) included


def test_accelerates_fsdp_plugin_refuses_a_model_larger_than_the_gpu_in_one_line(tiny_model_dir, monkeypatch):
    """Under accelerate's plugin each GPU holds the whole model before sharding: beyond its free memory
    rosa-train names the launch that reads shards only, instead of running out of memory."""
    import pytest
    from transformers import AutoModelForCausalLM

    from rosa_scale.config import ConfigError
    from rosa_scale.run_model import _refuse_whole_model_beyond_gpu

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (size - 1, 2 * size))
    with pytest.raises(ConfigError, match=r"whole model \(0\.\d GiB\) would sit on each GPU .*--fsdp true"):
        _refuse_whole_model_beyond_gpu(model, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (size, 2 * size))
    _refuse_whole_model_beyond_gpu(model, torch.device("cuda", 0))  # fits: nothing said
    _refuse_whole_model_beyond_gpu(model, torch.device("cpu"))


def test_the_attention_kernel_asked_for_is_the_one_built(tiny_model_dir):
    from rosa_scale.loading import load_model
    from rosa_scale.sharded_loading import empty_model

    assert load_model(str(tiny_model_dir)).config._attn_implementation == "sdpa"  # transformers' default
    assert load_model(str(tiny_model_dir), attn_implementation="eager").config._attn_implementation == "eager"
    assert empty_model(str(tiny_model_dir), "float32", "flex_attention").config._attn_implementation == "flex_attention"
