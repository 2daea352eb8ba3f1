"""rosa-consolidate: a sharded training checkpoint -> one plain Hugging Face folder.

Checkpoints are written by ``rosa_scale.checkpoint.save_checkpoint`` (one process here; FSDP2 and
DeepSpeed ZeRO-3 on 2 gloo processes in ``tests/ds_checkpoint_worker.py``; rosa-train itself in the
end-to-end test). The merged folder must load with plain transformers and compute what the ROSA
model computed, with the original architecture's tensor names and shapes, in bounded memory,
atomically; bad input gets one error line, exit 2 and nothing written.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                          MixtralForCausalLM)

import rosa_scale.consolidate as consolidate_mod
from bench.peak_rss import run_measured
from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, rosa_layers
from rosa_scale.checkpoint import save_checkpoint
from rosa_scale.consolidate import main
from rosa_scale.export import merged_state_dict
from tests.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from tests.rank_runs import run_ranks
from tests.proc_failure import stderr_report

ERROR = "rosa-consolidate: error:"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


# --------------------------------------------------------------------------- helpers

def _trained_rosa(model, tokenizer, seed=0):
    """ROSA on every linear layer, then one Adam step, so the factors and optimizer state are real."""
    apply_rosa(model, RosaConfig(rank=4, seed=seed))
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(seed))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model.eval(), opt


def _write_run(root: Path, model, opt, tokenizer, step=3, model_dtype="float32") -> dict:
    save_checkpoint(root, step, model=model, module=model, optimizer=opt, tokenizer=tokenizer,
                    trainer_state={"engine": "local", "model_dtype": model_dtype, "config": {}})
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"root": root, "ckpt": root / "checkpoints" / f"step-{step:08d}", "ids": ids, "logits": logits,
            "merged": merged_state_dict(model)}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (one file or an index of shards)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _plain_saved(model, folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    model.save_pretrained(folder, **kwargs)
    return _tensors(folder)


def _logits(folder: Path, ids, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, model


def _consolidate(*args) -> int:
    return main([*map(str, args), "--no-progress"])


def _assert_error(capsys, args, fragment, out: Path):
    """One line on stderr naming the problem, exit 2, nothing at OUT and no temp folder beside it."""
    code = _consolidate(*args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tokenizer):
    model, opt = _trained_rosa(tiny_llama(len(tokenizer)), tokenizer)
    return _write_run(tmp_path_factory.mktemp("llama-run"), model, opt, tokenizer)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tokenizer):
    model, opt = _trained_rosa(tiny_gpt2(len(tokenizer)), tokenizer, seed=1)
    assert all(layer.transposed for layer in rosa_layers(model).values())  # Conv1D: stored (in, out)
    return _write_run(tmp_path_factory.mktemp("gpt2-run"), model, opt, tokenizer)


@pytest.fixture(scope="module")
def multi_rank_runs(tmp_path_factory):
    """FSDP2 (DCP from 2 ranks) and DeepSpeed ZeRO-3 checkpoints from one 2-process launch (~10 s)."""
    outs = []

    def command(port: int) -> list[str]:
        outs.append(tmp_path_factory.mktemp("multi-rank"))  # a fresh folder for each start
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), "-m", "tests.ds_checkpoint_worker", "--out", str(outs[-1])]

    proc = run_ranks(command, env=ENV, timeout=300)
    assert proc.returncode == 0, stderr_report(proc)
    out = outs[-1]
    return {kind: {"root": out / kind, **torch.load(out / kind / "reference.pt")} for kind in ("fsdp2", "zero3")}


# --------------------------------------------------------------------------- the merged folder

def test_llama_merged_folder_is_the_plain_model(llama_run, tokenizer, tmp_path):
    out = tmp_path / "merged"
    assert _consolidate(llama_run["root"], out) == 0  # a run's output_dir: its checkpoints/latest

    logits, loaded = _logits(out, llama_run["ids"])
    assert type(loaded) is LlamaForCausalLM
    torch.testing.assert_close(logits, llama_run["logits"], rtol=0, atol=1e-5)

    written = _tensors(out)
    plain = _plain_saved(tiny_llama(len(tokenizer)), tmp_path / "plain")
    assert len(written) == len(plain) == 3 + 2 * 9
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in plain.items()}
    for name, value in llama_run["merged"].items():  # the same fp32 fold as the live export
        assert torch.equal(written[name], value), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert "rosa" not in (out / "config.json").read_text().lower()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert AutoTokenizer.from_pretrained(out)("a quick fox")["input_ids"] == tokenizer("a quick fox")["input_ids"]


@pytest.mark.parametrize("form", ["checkpoints", "step"])
def test_checkpoint_can_be_named_three_ways(llama_run, tmp_path, form):
    path = llama_run["root"] / "checkpoints" if form == "checkpoints" else llama_run["ckpt"]
    assert _consolidate(path, tmp_path / "out") == 0
    assert _tensors(tmp_path / "out").keys() == llama_run["merged"].keys()


def test_gpt2_conv1d_layers_and_tied_head(gpt2_run, tokenizer, tmp_path):
    """Conv1D weights are (in, out): the fold is transposed back; the tied lm_head is not written."""
    out = tmp_path / "merged"
    assert _consolidate(gpt2_run["ckpt"], out) == 0
    logits, _ = _logits(out, gpt2_run["ids"])
    torch.testing.assert_close(logits, gpt2_run["logits"], rtol=0, atol=1e-5)
    written = _tensors(out)
    plain = _plain_saved(tiny_gpt2(len(tokenizer)), tmp_path / "plain")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in plain.items()}
    assert "lm_head.weight" not in written and written["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    for name, value in gpt2_run["merged"].items():
        if name in written:
            assert torch.equal(written[name], value), name


def test_moe_experts_are_written_back_per_expert(tokenizer, tmp_path):
    """transformers 5 fuses Mixtral's experts into one tensor per layer and writes them back per
    expert on saving (renaming mlp.gate too): the merged folder must do the same."""
    cfg = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        initializer_range=0.15)
    model, opt = _trained_rosa(MixtralForCausalLM(cfg), tokenizer)
    run = _write_run(tmp_path / "run", model, opt, tokenizer)
    assert _consolidate(run["root"], tmp_path / "merged") == 0
    logits, _ = _logits(tmp_path / "merged", run["ids"])
    torch.testing.assert_close(logits, run["logits"], rtol=0, atol=1e-5)
    written = _tensors(tmp_path / "merged")
    plain = _plain_saved(MixtralForCausalLM(cfg), tmp_path / "plain")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in plain.items()}
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in written


def test_small_max_shard_size_writes_transformers_shards(llama_run, tokenizer, tmp_path):
    out = tmp_path / "merged"
    assert _consolidate(llama_run["ckpt"], out, "--max-shard-size", "100KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)

    # The same files, index and sizes as save_pretrained of the plain model built from its config
    # (module order; rosa_scale.export writes that order too).
    plain = tiny_llama(len(tokenizer))
    plain.load_state_dict(llama_run["merged"])
    plain.save_pretrained(tmp_path / "plain", max_shard_size="100KB")
    assert index == json.loads((tmp_path / "plain" / "model.safetensors.index.json").read_text())
    logits, _ = _logits(out, llama_run["ids"])
    torch.testing.assert_close(logits, llama_run["logits"], rtol=0, atol=1e-5)


def test_bfloat16_output(llama_run, tmp_path):
    out = tmp_path / "merged"
    assert _consolidate(llama_run["ckpt"], out, "--dtype", "bfloat16") == 0
    written = _tensors(out)
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    for name, value in llama_run["merged"].items():  # merged in fp32, rounded once
        assert torch.equal(written[name], value.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits, loaded = _logits(out, llama_run["ids"])
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), llama_run["logits"], rtol=0, atol=0.15)  # |logits| ~4


def test_auto_dtype_is_the_runs_model_dtype(llama_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(llama_run["root"], run)
    state_file = run / "checkpoints" / llama_run["ckpt"].name / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "model_dtype": "bfloat16"}))
    assert _consolidate(run, tmp_path / "merged") == 0
    assert {v.dtype for v in _tensors(tmp_path / "merged").values()} == {torch.bfloat16}


def test_rosa_layers_found_from_the_tensors_when_not_recorded(llama_run, tmp_path):
    ckpt = tmp_path / "step-00000003"
    shutil.copytree(llama_run["ckpt"], ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["rosa_layers"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert _consolidate(ckpt, tmp_path / "merged") == 0
    written = _tensors(tmp_path / "merged")
    assert all(torch.equal(written[k], v) for k, v in llama_run["merged"].items())


def test_rosa_train_checkpoint_equals_its_merged_export(tiny_model_dir, tiny_data, tmp_path):
    """A real rosa-train run: its last checkpoint consolidates to exactly the merged model it exported."""
    import rosa_scale.train as train_mod
    from rosa_scale.config import load_config

    cfg = load_config(None, {
        "model": str(tiny_model_dir), "dataset": str(tiny_data["train"]), "eval_dataset": str(tiny_data["eval"]),
        "block_size": 32, "batch_size": 4, "max_steps": 4, "resample_every": 2, "save_every": 4,
        "max_train_blocks": 32, "max_eval_blocks": 4, "output_dir": str(tmp_path / "run"), "rosa.rank": 4})
    summary = train_mod.train(cfg)
    assert _consolidate(tmp_path / "run", tmp_path / "merged") == 0
    ours, exported = _tensors(tmp_path / "merged"), _tensors(Path(summary["merged"]))
    assert ours.keys() == exported.keys()
    for name, value in exported.items():
        assert torch.equal(ours[name], value), name


# --------------------------------------------------------------------------- multi-rank checkpoints

@pytest.mark.parametrize("kind", ["fsdp2", "zero3"])
def test_two_rank_checkpoints(multi_rank_runs, tokenizer, tmp_path, kind):
    """DCP shards of 2 FSDP2 ranks, and DeepSpeed ZeRO-3 fragments + fp32 masters of 2 ranks (tied head)."""
    run = multi_rank_runs[kind]
    out = tmp_path / "merged"
    assert _consolidate(run["root"], out) == 0
    logits, _ = _logits(out, run["ids"])
    torch.testing.assert_close(logits, run["logits"], rtol=0, atol=1e-5)
    plain = tiny_llama(len(tokenizer), tie_word_embeddings=kind == "zero3")
    assert {k: v.shape for k, v in _tensors(out).items()} == \
        {k: v.shape for k, v in _plain_saved(plain, tmp_path / "plain").items()}


def test_dcp_rank_file_missing(multi_rank_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(multi_rank_runs["fsdp2"]["root"], run)
    (next(run.glob("checkpoints/step-*")) / "state" / "__1_0.distcp").unlink()
    _assert_error(capsys, [run, tmp_path / "out"], "checkpoint incomplete: ", tmp_path / "out")
    _consolidate(run, tmp_path / "out")
    assert "__1_0.distcp is missing" in capsys.readouterr().err


@pytest.mark.parametrize("lost", ["model_states", "optim_states"])
def test_deepspeed_rank_file_missing(multi_rank_runs, tmp_path, capsys, lost):
    run = tmp_path / "run"
    shutil.copytree(multi_rank_runs["zero3"]["root"], run)
    next(run.glob(f"checkpoints/step-*/deepspeed/state/*zero_pp_rank_1_mp_rank_00_{lost}.pt")).unlink()
    _assert_error(capsys, [run, tmp_path / "out"], "checkpoint incomplete: ", tmp_path / "out")


# --------------------------------------------------------------------------- bad input

def test_checkpoint_not_found(tmp_path, capsys):
    _assert_error(capsys, [tmp_path / "nope", tmp_path / "out"], "checkpoint not found", tmp_path / "out")


def test_trainer_state_missing(llama_run, tmp_path, capsys):
    ckpt = tmp_path / "step-00000003"
    shutil.copytree(llama_run["ckpt"], ckpt)
    (ckpt / "trainer_state.json").unlink()
    _assert_error(capsys, [ckpt, tmp_path / "out"], "checkpoint incomplete: ", tmp_path / "out")


@pytest.mark.parametrize("change, fragment", [
    ({"intermediate_size": 128}, "12 shapes differ (model.layers.0.mlp.gate_proj."),
    ({"num_hidden_layers": 1}, "7 ROSA layers that are not linear layers of the model (model.layers.1."),
    ({"tie_word_embeddings": True}, "lm_head.weight differs from model.embed_tokens.weight, which the config ties"),
])
def test_checkpoint_that_does_not_match_its_config(llama_run, tmp_path, capsys, change, fragment):
    ckpt = tmp_path / "step-00000003"
    shutil.copytree(llama_run["ckpt"], ckpt)
    config = json.loads((ckpt / "model" / "config.json").read_text())
    (ckpt / "model" / "config.json").write_text(json.dumps({**config, **change}))
    _assert_error(capsys, [ckpt, tmp_path / "out"], "checkpoint does not match its model config", tmp_path / "out")
    _consolidate(ckpt, tmp_path / "out")
    assert fragment in capsys.readouterr().err


def test_existing_output_needs_force(llama_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _consolidate(llama_run["ckpt"], out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(ERROR) and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _consolidate(llama_run["ckpt"], out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left


def test_failure_while_writing_leaves_nothing(llama_run, tmp_path, capsys, monkeypatch):
    """An error after some tensors were written: OUT is neither created nor (with --force) replaced."""
    real_write, calls = consolidate_mod.SafetensorsWriter.write, []

    def failing_write(self, name, value):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real_write(self, name, value)

    monkeypatch.setattr(consolidate_mod.SafetensorsWriter, "write", failing_write)
    _assert_error(capsys, [llama_run["ckpt"], tmp_path / "new"], "No space left on device", tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    calls.clear()
    assert _consolidate(llama_run["ckpt"], old, "--force") == 2
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_console_script_exit_code_and_single_line(tmp_path):
    script = Path(sys.executable).parent / "rosa-consolidate"
    assert script.is_file(), "run `pip install -e .` so the rosa-consolidate script exists"
    proc = subprocess.run([str(script), str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith(ERROR), proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- memory

def _peak_rss_mb(*args) -> float:
    """Peak RSS (MiB) of the installed rosa-consolidate script, measured by a parent that runs only it."""
    script = Path(sys.executable).parent / "rosa-consolidate"
    proc, peak_mib = run_measured([str(script), *map(str, args), "--no-progress"], env=ENV, timeout=300)
    assert proc.returncode == 0, stderr_report(proc)
    return peak_mib


@pytest.mark.slow
def test_peak_memory_stays_far_below_the_model(llama_run, tmp_path):
    """A 106M-parameter Llama (410 MiB in fp32, written as one 406 MiB shard): the peak RSS must stay under

        baseline + 4 x largest matrix + 64 MiB,

    where baseline is the same script's peak on the tiny checkpoint (interpreter, torch,
    transformers: ~350 MiB here) and the largest matrix is the 8000 x 1024 fp32 embedding (31 MiB).
    Reading a tensor costs up to 3 copies of it (DCP's read buffer, its unpickled copy, the target);
    the output shard is never held (its tensors are appended as they are merged). Loading the
    model whole would need the baseline + 406 MiB. Measured: baseline + ~75 MiB.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=7,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    apply_rosa(model, RosaConfig(rank=8), split=False)  # no SVDs: factors drawn below
    with torch.no_grad():
        for layer in rosa_layers(model).values():
            layer.up.normal_(0, 0.02)
            layer.down.normal_(0, 0.02)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    largest_mb = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    probe = {n: model.get_parameter(n + ".base.weight") for n in ("model.layers.3.mlp.down_proj",)}
    expected = {n: (w + model.get_parameter(n + ".up") @ model.get_parameter(n + ".down")).detach()
                for n, w in probe.items()}
    save_checkpoint(tmp_path / "big", 1, model=model, module=model, tokenizer=None,
                    optimizer=torch.optim.AdamW(adapter_parameters(model)),
                    trainer_state={"engine": "local", "model_dtype": "float32", "config": {}})
    del model, probe

    baseline = _peak_rss_mb(llama_run["ckpt"], tmp_path / "tiny-out")
    peak = _peak_rss_mb(tmp_path / "big", tmp_path / "big-out")
    bound = baseline + 4 * largest_mb + 64
    print(f"\nmodel {model_mb:.0f} MiB fp32, largest matrix {largest_mb:.0f} MiB; peak RSS {peak:.0f} MiB, "
          f"baseline {baseline:.0f} MiB (+{peak - baseline:.0f} MiB), bound {bound:.0f} MiB")
    assert model_mb > 400
    assert peak < bound, (peak, baseline, bound)
    with safe_open(tmp_path / "big-out" / "model.safetensors", "pt") as f:
        assert len(list(f.keys())) == 3 + 7 * 9
        for name, value in expected.items():
            torch.testing.assert_close(f.get_tensor(name + ".weight"), value, rtol=0, atol=1e-6)
