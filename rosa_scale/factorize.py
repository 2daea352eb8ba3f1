"""Pure math of ROSA on full tensors: choose singular indices, split a weight, merge it back.

A weight ``W`` (out x in) is split into a frozen residual and two trainable factors::

    up   = U_J S_J^1/2            (out x r)
    down = S_J^1/2 V_J^T          (r x in)
    w_fixed = W - up @ down       (computed by subtraction in fp32 or wider)

Because ``w_fixed`` is obtained by subtraction, ``w_fixed + up @ down`` equals ``W`` up to one
rounding whatever the factorizer's accuracy, so a split never changes the layer's function.
Nothing here knows about modules or processes.
"""
from __future__ import annotations

import hashlib

import torch

METHODS = ("svd", "eigh", "qr")
SAMPLINGS = ("random", "random-subset", "top", "bottom")


def window_generator(seed: int, resample_index: int, name: str) -> torch.Generator:
    """A CPU generator seeded by (seed, resample index, matrix name): same windows on any world size."""
    digest = hashlib.sha256(f"{seed}:{resample_index}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def choose_indices(n: int, rank: int, sampling: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted, into singular values in descending order) of the ``rank`` triplets to train."""
    if not 0 < rank < n:
        raise ValueError(f"rank {rank} must be between 1 and {n - 1} for a matrix whose smaller side is {n}")
    if sampling == "random":
        start = int(torch.randint(0, n - rank + 1, (1,), generator=generator))
        return torch.arange(start, start + rank)
    if sampling == "random-subset":
        return torch.randperm(n, generator=generator)[:rank].sort().values
    if sampling == "top":
        return torch.arange(rank)
    if sampling == "bottom":
        return torch.arange(n - rank, n)
    raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _factors_svd(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin SVD; a wide matrix is decomposed as its tall transpose (measured 1.8x faster on CPU for
    576 x 1536, the same triplets)."""
    if w.shape[0] < w.shape[1]:
        v, s, uh = torch.linalg.svd(w.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    idx = idx.to(w.device)
    root = s[idx].sqrt()
    return u[:, idx] * root, root[:, None] * vh[idx]


def _factors_eigh(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular triplets from the eigen-decomposition of the smaller gram matrix (fast on GPUs).

    The eigenvalues only rank the directions: deep in the spectrum an fp32 gram's eigenvalues are
    noise (below eps * s_max^2, even negative), so each singular value is measured as the norm of
    ``W v`` instead, which keeps ``up`` and ``down`` balanced (norms sqrt(s) each) and
    ``up @ down`` the exact projection of W on the chosen directions. Exactness of the split does
    not depend on it: ``w_fixed`` is formed by subtraction whatever the factors.
    """
    tall = w.shape[0] >= w.shape[1]
    # Summed in float64; decomposed in the input's precision (fp32 halves the eigensolver's memory).
    gram = _gram64(w if tall else w.T).to(w.dtype)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    del gram
    order = torch.argsort(evals.double(), descending=True)
    vecs = evecs[:, order[idx.to(w.device)]]
    del evecs
    image = w @ vecs if tall else (vecs.T @ w).T  # W V_J (out x r), or W^T U_J (in x r)
    s = image.double().norm(dim=0)
    root = s.sqrt().to(w.dtype)
    # A zero singular value has no defined partner vector; its image is ~0 anyway.
    inv_root = (1.0 / s.clamp_min(torch.finfo(torch.float64).tiny ** 0.5).sqrt()).to(w.dtype)
    if tall:  # vecs are right singular vectors V_J
        return image * inv_root, root[:, None] * vecs.T
    return vecs * root, (image * inv_root).T  # vecs are left singular vectors U_J


def _gram64(w: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """``w.T @ w`` accumulated in float64 a block of rows at a time (never a float64 copy of ``w``)."""
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].double()
        gram.addmm_(block.T, block)
    return gram


def _factors_qr(w: torch.Tensor, rank: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Project W onto a random rank-r input subspace Q: up @ down = W Q Q^T, in O(out * in * r).

    A thin SVD of the small (out x r) product balances the two factors like the SVD route.
    """
    gauss = torch.randn(w.shape[1], rank, generator=generator, dtype=torch.float64).to(w.device, w.dtype)
    q, _ = torch.linalg.qr(gauss)
    u, s, vh = torch.linalg.svd(w @ q, full_matrices=False)
    root = s.sqrt()
    return u * root, root[:, None] * (vh @ q.T)


def split(
    w: torch.Tensor,
    rank: int,
    *,
    method: str = "svd",
    sampling: str = "random",
    generator: torch.Generator | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``w`` (out x in) into ``(w_fixed, up, down)``, all in fp32 (fp64 if ``w`` is fp64).

    ``overwrite=True`` computes ``w_fixed`` in the storage of ``w`` when it is already fp32/fp64
    (saves one matrix of memory; the caller must not need ``w`` afterwards).
    """
    if w.dim() != 2:
        raise ValueError(f"split needs a 2-D weight, got shape {tuple(w.shape)}")
    work = w.to(_work_dtype(w))
    n = min(work.shape)
    if method == "qr":
        if sampling != "random":
            raise ValueError(f"method 'qr' draws a random subspace; sampling {sampling!r} does not apply to it")
        if not 0 < rank < n:
            raise ValueError(f"rank {rank} must be between 1 and {n - 1} for a matrix whose smaller side is {n}")
        up, down = _factors_qr(work, rank, generator)
    else:
        idx = choose_indices(n, rank, sampling, generator)
        if method == "svd":
            up, down = _factors_svd(work, idx)
        elif method == "eigh":
            up, down = _factors_eigh(work, idx)
        else:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if overwrite and work is w:
        w_fixed = work.addmm_(up, down, alpha=-1)
    else:
        w_fixed = torch.addmm(work, up, down, alpha=-1)  # W - up @ down without a product temporary
    return w_fixed, up.contiguous(), down.contiguous()


def merge(w_fixed: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``w_fixed + up @ down`` in fp32 (fp64 if any input is fp64), whatever the storage dtypes."""
    dtype = torch.float64 if torch.float64 in (w_fixed.dtype, up.dtype, down.dtype) else torch.float32
    return torch.addmm(w_fixed.to(dtype), up.to(dtype), down.to(dtype))


def round_to(x: torch.Tensor, dtype: torch.dtype, *, stochastic: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Cast fp32 ``x`` to ``dtype``; to bfloat16 optionally with stochastic rounding.

    Stochastic rounding is unbiased per element. Measured on ROSA resamples it adds more noise
    than round-to-nearest and removes no bias (bench/results/bf16-merge-survival-*.md).
    """
    if not stochastic or dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32).to(x.device)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # clear the 16 low bits of the sum
    return bits.view(torch.float32).to(torch.bfloat16)
