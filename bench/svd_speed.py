"""Seconds to factorize one resample's matrices, by factorizer, cuSOLVER driver and device.

Why: a resample of SmolLM2-135M (210 small matrices) took ~37 s on a shared H200 with the GPU
``svd``, half of a 2M-token ROSA run. This times ``rosa_scale.factorize.split`` (what a resample
calls) and the raw ``torch.linalg.svd`` drivers on the shapes of SmolLM2-135M and Llama-3-8B, on
the GPU and on CPU threads, so the default can be chosen from numbers.

    python bench/svd_speed.py --out svd_speed.json [--cpu-threads 1,4] [--skip-8b]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rosa_scale.factorize import split

# (out, in): count per model. SmolLM2-135M: 30 layers of q, k, v, o, gate, up, down.
SMOL = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30}
LLAMA8B = {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(device: str) -> dict:
    """Name -> function of a fp32 matrix, for one device."""
    out = {f"split_{m}": (lambda w, m=m: split(w, 16, method=m, generator=torch.Generator().manual_seed(0)))
           for m in ("svd", "eigh", "qr")}
    if device == "cuda":
        for driver in ("gesvd", "gesvdj", "gesvda"):
            out[f"linalg_svd_{driver}"] = (
                lambda w, d=driver: torch.linalg.svd(w if w.shape[0] >= w.shape[1] else w.T,
                                                     full_matrices=False, driver=d))
    return out


def measure(shapes: dict, device: str, reps: int, model: str) -> dict:
    result = {}
    for (rows, cols), count in shapes.items():
        w = torch.randn(rows, cols, device=device) * 0.02
        for name, fn in variants(device).items():
            try:
                sec = timed(lambda: fn(w), device, reps)
            except RuntimeError as err:  # a driver that refuses a shape is recorded, not fatal
                result[f"{model}_{rows}x{cols}_{name}_error"] = str(err).splitlines()[0]
                continue
            result[f"{model}_{rows}x{cols}_{name}_ms"] = round(sec * 1e3, 3)
            key = f"{model}_model_{name}_s"
            result[key] = round(result.get(key, 0.0) + sec * count, 3)
        del w
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-threads", default="1,4")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-8b", action="store_true")
    args = parser.parse_args()
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        res.update({f"cuda_{k}": v for k, v in measure(SMOL, "cuda", args.reps, "smollm2").items()})
        if not args.skip_8b:
            res.update({f"cuda_{k}": v for k, v in measure(LLAMA8B, "cuda", 1, "llama8b").items()})
    for threads in (int(t) for t in args.cpu_threads.split(",") if t):
        torch.set_num_threads(threads)
        res.update({f"cpu{threads}_{k}": v for k, v in measure(SMOL, "cpu", args.reps, "smollm2").items()})
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1, sort_keys=True)
    for key, value in sorted(res.items()):
        if "_model_" in key:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
