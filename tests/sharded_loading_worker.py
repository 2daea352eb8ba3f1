"""Under torchrun: build a model folder's model empty, ROSA-wrap and shard it, fill it from the folder;
rank 0 writes what the test checks (every full tensor, and the error line of a foreign tensor)."""
import argparse
import json
import os

import torch
import torch.distributed as dist

from rosa_scale import RosaConfig, apply_rosa
from rosa_scale.engines.fsdp2 import shard_model
from rosa_scale.loading import ModelLoadError
from rosa_scale.sharded_loading import empty_model, fill


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bad-model", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    model = empty_model(args.model, "float32")
    report = {"meta_params": all(t.is_meta for t in model.parameters()),
              "real_buffers": all(not b.is_meta for b in model.buffers())}
    apply_rosa(model, RosaConfig(rank=4), split=False)
    shard_model(model, param_dtype=None, reduce_dtype=None)
    fill(model, args.model, torch.device("cpu"))
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in model.state_dict().items()}
    try:
        other = empty_model(args.bad_model, "float32")
        apply_rosa(other, RosaConfig(rank=4), split=False)
        shard_model(other, param_dtype=None, reduce_dtype=None)
        fill(other, args.bad_model, torch.device("cpu"))
        report["bad"] = None
    except ModelLoadError as err:
        report["bad"] = str(err)
    if dist.get_rank() == 0:
        torch.save(full, args.out)
        with open(args.out + ".json", "w") as f:
            json.dump({**report, "world_size": dist.get_world_size()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
