"""Sharded checkpoint of a Llama-3-8B-shaped ROSA model under FSDP2: save, resume, consolidate.

    torchrun --nproc_per_node 2 bench/checkpoint_bench.py --out result.json --dir /tmp/ckpt-bench

Every rank builds the model (random bf16 weights), wraps it with ROSA, shards it, makes the
first split and one optimizer step (so there is optimizer state to save). Then it times
`rosa_scale.checkpoint.save_checkpoint` and `load_checkpoint` (max over ranks), leaves the process
group, and rank 0 runs `rosa-consolidate` on the checkpoint as a child process, reporting its
seconds and peak host memory (measured apart from the rank's own: `bench/peak_rss.py`).
CPU smoke check: `--device cpu --tiny` (gloo).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import fsdp2_bench as fb  # noqa: E402
from bench.peak_rss import run_measured  # noqa: E402

fb.LOG_NAME = "checkpoint_bench"


def _extra(parser) -> None:
    parser.add_argument("--dir", required=True, help="scratch folder for the checkpoint and the consolidated model")
    parser.add_argument("--dtype", default="bfloat16", help="rosa-consolidate --dtype")


def _du_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30


def main(argv=None) -> int:
    from rosa_scale.checkpoint import load_checkpoint, save_checkpoint

    args = fb.parse_args(argv, modes=("rosa",), methods="", extra=_extra,
                         description="Time a sharded checkpoint's save, resume and consolidation.")
    dev = fb.init_distributed(args.device)
    scratch = Path(args.dir)
    result = fb.header(args, dev)
    model, opt, extra = fb.setup_rosa(args, dev)
    result.update(extra)
    fb.train_step(model, opt, fb.make_batch(args, dev))
    fb.sync(dev)
    state = {"epoch": 0, "batches_in_epoch": 0, "resamples": 0, "eval_loss_before": None, "scheduler": {},
             "engine": "fsdp2", "model_dtype": "bfloat16" if dev.type == "cuda" else "float32", "config": {}}
    if dist.get_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    start = time.perf_counter()
    path = save_checkpoint(scratch, 1, model=model, module=model, optimizer=opt, tokenizer=None, trainer_state=state)
    fb.sync(dev)
    result["ckpt_save_s"] = fb.all_max([time.perf_counter() - start], dev)[0]
    result["ckpt_gib_on_disk"] = _du_gib(path)
    fb.log(f"saved {path} ({result['ckpt_gib_on_disk']:.1f} GiB) in {result['ckpt_save_s']:.1f} s")
    fb.write(result, args.out)
    dist.barrier()
    start = time.perf_counter()
    load_checkpoint(path, model=model, module=model, optimizer=opt, expect={})
    fb.sync(dev)
    result["ckpt_resume_s"] = fb.all_max([time.perf_counter() - start], dev)[0]
    fb.log(f"resumed in {result['ckpt_resume_s']:.1f} s")
    fb.write(result, args.out)
    del model, opt
    fb.free_memory(dev)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return 0
    out = scratch / "hf"
    start = time.perf_counter()
    proc, peak_mib = run_measured([sys.executable, "-m", "rosa_scale.consolidate", str(path), str(out),
                                   "--dtype", args.dtype, "--no-progress"])
    result["consolidate_s"] = time.perf_counter() - start
    result["consolidate_peak_host_gib"] = peak_mib / 1024
    result["consolidate_rc"] = proc.returncode
    if proc.returncode != 0:
        result["consolidate_error"] = proc.stderr[-3000:]
    else:
        result["consolidated_gib"] = _du_gib(out)
    print(f"[checkpoint_bench] consolidated in {result['consolidate_s']:.1f} s, peak host "
          f"{result['consolidate_peak_host_gib']:.2f} GiB, rc {proc.returncode}", flush=True)
    Path(args.out).write_text(__import__("json").dumps(result, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
