"""On CUDA GPUs (skipped elsewhere): factorizers on device, FSDP2 over NCCL, rosa-train with
accelerate's FSDP2 plugin and bf16. Run on the device machine: pytest -m gpu."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosa_scale.factorize import merge, split
from tests.ports import free_port
from tests.proc_failure import stderr_report

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("method", ["svd", "eigh", "qr"])
def test_split_on_gpu_preserves_a_large_weight(method):
    w = torch.randn(4096, 1024, device="cuda") * 0.02
    w_fixed, up, down = split(w, 16, method=method, generator=torch.Generator().manual_seed(0))
    assert w_fixed.is_cuda and up.is_cuda
    torch.testing.assert_close(merge(w_fixed, up, down), w, rtol=0, atol=1e-6)


def test_eigh_matches_svd_subspace_on_gpu():
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.float64)
    _, up_s, down_s = split(w, 8, method="svd", generator=torch.Generator().manual_seed(1))
    _, up_e, down_e = split(w, 8, method="eigh", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(up_e @ down_e, up_s @ down_s, rtol=0, atol=1e-8)


def _worker(tmp_path, mode, nproc):
    out = tmp_path / f"{mode}.pt"
    cmd = [sys.executable, "-m", "tests.engine_worker", "--mode", mode, "--device", "cuda", "--out", str(out)]
    if nproc:
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, stderr_report(proc)
    return torch.load(out, weights_only=False)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_fsdp2_over_nccl_matches_one_gpu(tmp_path):
    local, fsdp = _worker(tmp_path, "local", None), _worker(tmp_path, "fsdp2", 2)
    assert fsdp["engine"] == "fsdp2" and fsdp["world_size"] == 2
    assert fsdp["losses"] == pytest.approx(local["losses"], rel=1e-5)
    for name, value in local["merged"].items():
        torch.testing.assert_close(fsdp["merged"][name], value, rtol=0, atol=1e-4, msg=name)
    assert max(fsdp["resample_logit_diff"]) < 1e-4


def _train_args(tmp_path, out):
    from tests.tiny import corpus, save_tiny_model_dir, write_jsonl

    model = save_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", corpus(400))
    held = write_jsonl(tmp_path / "eval.jsonl", corpus(40, seed=1))
    return ["--model", str(model), "--dataset", str(data), "--eval-dataset", str(held), "--block-size", "32",
            "--batch-size", "4", "--max-steps", "30", "--resample-every", "10", "--lr", "3e-2",
            "--rosa.rank", "8", "--output-dir", str(out)]


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_rosa_train_with_accelerate_fsdp2_plugin(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "rosa_scale.train", *_train_args(tmp_path, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, stderr_report(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed_type"] == "FSDP" and summary["engine"] == "fsdp2"
    assert summary["num_processes"] == summary["world_size"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(summary["merged"])  # plain transformers loads the export


def test_rosa_train_one_gpu_bf16(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rosa_scale.train", *_train_args(tmp_path, out), "--mixed-precision", "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, stderr_report(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "local" and summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5


def test_rosa_train_with_accelerate_zero3_and_resume(tmp_path):
    """configs/accelerate/zero3.yaml on 2 GPUs, or on 1 where only one is present (bf16, leaf decoder
    layers fetched on DeepSpeed's fast path), then an exact resume from its step-10 checkpoint."""
    pytest.importorskip("deepspeed")
    import shutil

    nproc = min(GPUS, 2)

    def launch(out, extra=()):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--num_processes", str(nproc),
               "--main_process_port", str(free_port()), "-m", "rosa_scale.train", *_train_args(tmp_path, out),
               "--mixed-precision", "bf16", "--save-every", "10", "--keep-last", "null", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, stderr_report(proc)
        return json.loads((out / "summary.json").read_text())

    straight = launch(tmp_path / "straight")
    assert straight["distributed_type"] == "DEEPSPEED" and straight["engine"] == "zero3"
    assert straight["num_processes"] == straight["world_size"] == nproc
    assert straight["zero3_fast_leaf_fetch"] is True
    assert straight["eval_loss_after"] < straight["eval_loss_before"] - 0.5
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000010", resumed_dir / "step-00000010")
    (resumed_dir / "latest").write_text("step-00000010\n")
    resumed = launch(tmp_path / "resumed", ["--resume", "auto"])
    assert resumed["eval_loss_after"] == pytest.approx(straight["eval_loss_after"], rel=1e-3)


@pytest.mark.parametrize("method", ["svd", "eigh", "qr"])
def test_factorize_device_cpu_matches_gpu_split(method):
    """RosaConfig.factorize_device='cpu' decomposes on CPU and hands back CUDA tensors with the
    same merged weight and the same trained subspace as the decomposition on the GPU."""
    from rosa_scale import RosaConfig
    from rosa_scale.factorize import window_generator
    from rosa_scale.layer import resplit_values

    w = torch.randn(1536, 576, device="cuda", dtype=torch.float64) * 0.02
    up0, down0 = torch.zeros(1536, 8, device="cuda", dtype=torch.float64), torch.zeros(8, 576, device="cuda",
                                                                                      dtype=torch.float64)
    out = {}
    for where in ("weight", "cpu"):
        cfg = RosaConfig(rank=8, method=method, factorize_device=where)
        out[where] = resplit_values(w, up0, down0, transposed=False, rank=8, generator=window_generator(0, 1, "m"),
                                    config=cfg)
        assert all(t.is_cuda for t in out[where])
        torch.testing.assert_close(merge(*out[where]), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["cpu"][1] @ out["cpu"][2], out["weight"][1] @ out["weight"][2], rtol=0, atol=1e-9)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_rosa_train_fsdp2_over_an_nf4_base_matches_one_gpu(tmp_path):
    """FSDP2 over NCCL with the NF4 base whole on each GPU and the factors sharded, against one GPU
    (fp32 compute, so only reduction order differs); its sharded checkpoint consolidates to its export."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    args = [*_train_args(tmp_path, tmp_path / "x"), "--rosa.quantize", "nf4", "--lr", "1e-2", "--max-steps", "20"]
    runs = {"one": [sys.executable, "-m", "rosa_scale.train", *args],
            "fsdp2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      str(free_port()), "-m", "rosa_scale.train", *args, "--fsdp", "true", "--batch-size", "2",
                      "--save-every", "20"]}
    for name, cmd in runs.items():
        cmd[cmd.index("--output-dir") + 1] = str(tmp_path / name)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, stderr_report(proc)
    one, fsdp = (json.loads((tmp_path / n / "summary.json").read_text()) for n in runs)
    assert fsdp["engine"] == "fsdp2" and fsdp["world_size"] == 2
    assert fsdp["eval_loss_after"] == pytest.approx(one["eval_loss_after"], rel=1e-3)
    assert one["eval_loss_after"] < one["eval_loss_before"] - 0.3
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for n in runs]
    assert max(abs(x - y) for x, y in zip(losses[0][:6], losses[1][:6])) < 1e-5  # before Adam amplifies order
    a, b = (load_file(tmp_path / n / "merged" / "model.safetensors") for n in runs)
    start = load_file(tmp_path / "model" / "model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in start)
    apart = max((b[k] - a[k]).abs().max().item() for k in a)
    assert moved > 0.05 and apart < 0.1 * moved, (moved, apart)  # reduction order, amplified by 20 Adam steps
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "rosa_scale.consolidate", str(tmp_path / "fsdp2"), str(out),
                           "--no-progress"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = load_file(out / "model.safetensors")
    for key, value in b.items():  # the export merged on the GPU, this on the CPU
        torch.testing.assert_close(c[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_loss_chunks_under_zero3_with_a_partitioned_head(tmp_path):
    """--loss-chunk-tokens through accelerate's ZeRO-3 on the GPUs, with every parameter partitioned
    (the untied LM head too: persistence threshold 0), logs the same losses as the model's own loss."""
    pytest.importorskip("deepspeed")
    ds = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    acc = (ROOT / "configs" / "accelerate" / "zero3.yaml").read_text()
    (tmp_path / "acc.yaml").write_text(acc.replace("configs/deepspeed/zero3.json", str(tmp_path / "ds.json")))
    nproc, losses = min(GPUS, 2), {}
    for name, extra in {"whole": [], "chunked": ["--loss-chunk-tokens", "40"]}.items():
        out = tmp_path / name
        args = _train_args(tmp_path, out)
        args[args.index("--max-steps") + 1] = "12"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "acc.yaml"),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "rosa_scale.train",
               *args, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, stderr_report(proc)
        assert json.loads((out / "summary.json").read_text())["engine"] == "zero3"
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    assert len(losses["whole"]) == 12
    assert max(abs(a - b) for a, b in zip(losses["whole"], losses["chunked"])) < 1e-4


@pytest.mark.parametrize("launch", ["one GPU", pytest.param("FSDP2 on 2 GPUs", marks=pytest.mark.skipif(
    GPUS < 2, reason="needs 2 GPUs"))])
def test_rosa_train_compiles_its_layers_by_default_and_trains_the_same(tmp_path, launch):
    """compile: auto compiles each decoder layer on a GPU (before fully_shard under fsdp: true); the run
    logs the losses of the eager run (bf16: fused kernels round differently) through its resamples."""
    losses, summaries = {}, {}
    for name, extra in {"compiled": [], "eager": ["--compile", "false"]}.items():
        out = tmp_path / name
        start = [sys.executable, "-m", "rosa_scale.train"]
        if launch != "one GPU":
            start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), "-m", "rosa_scale.train"]
            extra = [*extra, "--fsdp", "true", "--batch-size", "2"]
        cmd = [*start, *_train_args(tmp_path, out), "--mixed-precision", "bf16", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, stderr_report(proc)
        summaries[name] = json.loads((out / "summary.json").read_text())
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
    assert summaries["compiled"]["compiled_layers"] == 2 and summaries["eager"]["compiled_layers"] == 0
    assert len(losses["compiled"]) == 30
    assert max(abs(a - b) / b for a, b in zip(losses["compiled"], losses["eager"])) < 2e-2, losses
    assert summaries["compiled"]["eval_loss_after"] == pytest.approx(summaries["eager"]["eval_loss_after"], rel=2e-2)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_replicated_factors_train_what_sharded_factors_do_on_two_gpus(tmp_path):
    """fsdp_factors: replicated under NCCL, bf16, compiled layers: the factors stay whole (summary), their
    gradients are averaged by one all-reduce, and the run logs the sharded run's losses through resamples."""
    losses, summaries = {}, {}
    for factors in ("sharded", "replicated"):
        out = tmp_path / factors
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "rosa_scale.train", *_train_args(tmp_path, out), "--mixed-precision", "bf16",
               "--fsdp", "true", "--batch-size", "2", "--fsdp-factors", factors]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, stderr_report(proc)
        summaries[factors] = json.loads((out / "summary.json").read_text())
        losses[factors] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                           if '"loss"' in line]
    assert summaries["replicated"]["replicated_factors"] and not summaries["sharded"]["replicated_factors"]
    assert len(losses["replicated"]) == 30
    assert max(abs(a - b) / b for a, b in zip(losses["replicated"], losses["sharded"])) < 2e-2, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_documents_see_only_themselves_under_cuda_sdpa(dtype):
    """The masked sdpa kernel CUDA picks for a block of several documents gives each document the
    logits it gets alone (the causal kernel), up to the dtype's rounding; without position ids the
    second document's logits move by far more."""
    from tests.tiny import tiny_llama

    model = tiny_llama(300).to("cuda", dtype).eval()
    assert model.config._attn_implementation == "sdpa"
    a, b = (torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).cuda() for n in (40, 88))
    row = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(40), torch.arange(88)])[None].cuda()
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
        alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in (a, b)]).float()
        joined = model(input_ids=row, use_cache=False).logits[0].float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(packed, alone, rtol=0, atol=tol)
    assert (joined[40:] - alone[40:]).abs().max() > 10 * tol
