"""Which rank factorizes which matrix: one owner per matrix, balanced by factorization cost."""
from __future__ import annotations


def factorization_cost(out_features: int, in_features: int) -> int:
    """Flops of an SVD-like factorization, up to a constant: m * n * min(m, n)."""
    return out_features * in_features * min(out_features, in_features)


def plan_owners(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Assign each matrix to a rank, largest first onto the least-loaded rank (ties: lowest rank).

    Deterministic from the shapes and names alone, so every rank computes the same plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owners = {}
    for name in sorted(shapes, key=lambda n: (-factorization_cost(*shapes[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += factorization_cost(*shapes[name])
    return owners


def plan_loads(shapes: dict[str, tuple[int, int]], owners: dict[str, int], world_size: int) -> list[int]:
    """Total cost given to each rank by a plan."""
    load = [0] * world_size
    for name, rank in owners.items():
        load[rank] += factorization_cost(*shapes[name])
    return load


def owner_queues(shapes: dict[str, tuple[int, int]], world_size: int) -> list[list[str]]:
    """Each rank's matrices, most expensive first.

    Sharded engines work in rounds that pair the ranks' i-th matrices; sorting every queue by
    cost pairs matrices of similar cost, so no rank idles while another factorizes a big one.
    """
    owners = plan_owners(shapes, world_size)
    queues: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(shapes, key=lambda n: (-factorization_cost(*shapes[n]), n)):
        queues[owners[name]].append(name)
    return queues
