"""rosa-train under `accelerate launch` on CPU processes with accelerate's DeepSpeed plugin in effect.

accelerate takes its multi-process branch only for an accelerator backend; on a CPU it would
silently run each process alone. This entry point makes it use gloo instead, then runs rosa-train.
"""
import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_GPU
    return _prepare_backend(self, cpu, sagemaker_dp, backend)


PartialState._prepare_backend = _gloo_backend
os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

if __name__ == "__main__":
    from rosa_scale.train import main

    sys.exit(main())
