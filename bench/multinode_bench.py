"""rosa-train on one node of N GPUs against two "nodes" of N/2 GPUs each, through the shipped launchers.

    python3 bench/multinode_bench.py --gpus 4 --out multinode-4gpu.json     # nvidia-h200-x4
    python3 bench/multinode_bench.py --gpus 2 --out multinode-2gpu.json     # nvidia-h200-x2: 2 "nodes" of 1

Both runs fine-tune the same Llama-3-8B-shaped model (random bf16 weights, the shipped FSDP2 config
for that many GPUs, ``configs/train/llama3-8b-fsdp2-{2,4}gpu.yaml``, as is, shortened) on the same data; the two-node run
goes through ``launch/multinode.sh`` twice (NODE_RANK 0 and 1, disjoint CUDA_VISIBLE_DEVICES,
c10d rendezvous on this host), the one-node run through ``launch/local.sh``. Reported: the median
tokens/s per GPU over the timed steps (the first steps are warm-up), and their ratio.
``--tiny`` runs the same on CPU (one process per "node") with a tiny model, to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = {2: "configs/train/llama3-8b-fsdp2-2gpu.yaml", 4: "configs/train/llama3-8b-fsdp2-4gpu.yaml"}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def prepare(work: Path, tiny: bool) -> tuple[Path, Path]:
    """A model folder (random weights, a small BPE tokenizer) and a jsonl of text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import corpus, save_tiny_model_dir, tiny_tokenizer, write_jsonl

    model_dir, data = work / "model", work / "train.jsonl"
    if not (model_dir / "config.json").exists():
        if tiny:
            save_tiny_model_dir(model_dir)
        else:  # built on the GPU (fast init), saved once: ~16 GB of bf16
            with torch.device("cuda"):
                torch.manual_seed(0)
                model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, dtype="bfloat16")).to(torch.bfloat16)
            model.save_pretrained(model_dir)
            tiny_tokenizer().save_pretrained(model_dir)
            del model
            torch.cuda.empty_cache()
    if not data.exists():
        write_jsonl(data, corpus(400 if tiny else 40000, seed=0))
    return model_dir, data


def _train_args(model_dir: Path, data: Path, out: Path, args) -> list[str]:
    return ["--config", str(ROOT / CONFIGS[args.gpus]), "--model", str(model_dir), "--dataset", str(data),
            "--max-steps", str(args.steps), "--warmup-steps", "2", "--resample-every", str(10 * args.steps),
            "--grad-accum", "1", "--batch-size", str(args.batch), "--block-size", str(args.seq),
            "--max-eval-blocks", "2", "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps),
            "--save-merged", "false", "--output-dir", str(out),
            *(["--max-train-blocks", "64"] if args.tiny else [])]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", **extra}
    return env


def _per_gpu_tok_s(out: Path, gpus: int, skip: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > skip]
    return {"tok_s_per_gpu": statistics.median(speeds) / gpus, "timed_steps": len(speeds)}


def one_node(model_dir, data, work, args, gpus: int) -> dict:
    out = work / "one-node"
    shutil.rmtree(out, ignore_errors=True)  # the config resumes from any checkpoint found there
    procs = gpus or 2  # --tiny: 2 CPU processes
    env = _env(MASTER_PORT=str(args.port), NPROC=str(procs))
    start = time.perf_counter()
    proc = subprocess.run([str(ROOT / "launch" / "local.sh"), *_train_args(model_dir, data, out, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"one-node run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return {**_per_gpu_tok_s(out, procs, args.skip), "wall_s": time.perf_counter() - start}


def two_nodes(model_dir, data, work, args, gpus_per_node: int) -> dict:
    out = work / "two-nodes"
    shutil.rmtree(out, ignore_errors=True)
    procs = []
    start = time.perf_counter()
    for rank in (0, 1):
        devices = ",".join(str(rank * gpus_per_node + i) for i in range(gpus_per_node))
        env = _env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port + 1),
                   GPUS_PER_NODE=str(gpus_per_node), **({"CUDA_VISIBLE_DEVICES": devices} if gpus_per_node else {}))
        procs.append(subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), *_train_args(model_dir, data, out, args)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(3)  # node 0 hosts the rendezvous on this shared host
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"node {rank} failed ({proc.returncode}): {err[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    world = summary["world_size"]
    return {**_per_gpu_tok_s(out, max(1, world), args.skip), "wall_s": time.perf_counter() - start,
            "world_size": world, "engine": summary["engine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--work", default="/tmp/rosa-multinode-bench", help="scratch folder (model, runs)")
    parser.add_argument("--tiny", action="store_true", help="CPU check with a tiny model, 1 process per node")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--gpus", type=int, choices=sorted(CONFIGS), default=4,
                        help="GPUs in all: one node of all of them against two nodes of half each")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, data = prepare(work, args.tiny)
    result = {"config": CONFIGS[args.gpus], "gpus": 0 if args.tiny else args.gpus, "steps": args.steps, "timed_from_step": args.skip + 1, "batch_per_gpu": args.batch,
              "seq": args.seq, "prepare_s": time.perf_counter() - t0}
    gpus = 0 if args.tiny else args.gpus
    one = one_node(model_dir, data, work, args, gpus)
    two = two_nodes(model_dir, data, work, args, gpus // 2)
    result.update({f"one_node_{k}": v for k, v in one.items()})
    result.update({f"two_nodes_{k}": v for k, v in two.items()})
    result["two_nodes_over_one_node"] = two["tok_s_per_gpu"] / one["tok_s_per_gpu"]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
