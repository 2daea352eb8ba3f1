"""Two DDP processes (gloo) train a tiny Llama over an NF4 base through two resamples, each on its
own data; every rank saves its stacks, frozen and trained factors for the test to compare."""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rosa_scale import RosaConfig, adapter_parameters, apply_rosa, resample, rosa_layers
from tests.tiny import tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama()
    apply_rosa(model, RosaConfig(rank=4, quantize="nf4", seed=3))  # the owners split, then broadcast
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank: DDP averages the gradients
    losses = []
    for step in range(4):
        batch = torch.randint(0, 300, (2, 16), generator=gen)
        loss = ddp(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 2 == 1:
            resample(ddp, optimizer)
    state = {name: {key: getattr(layer, key).detach().clone()
                    for key in ("up", "down", "up0", "down0", "stack_up", "stack_down", "frozen_peak", "windows")}
             for name, layer in rosa_layers(model).items()}
    torch.save({"rank": rank, "world_size": dist.get_world_size(), "layers": state, "losses": losses},
               f"{args.out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
